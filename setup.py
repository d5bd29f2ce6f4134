"""Build qlora_ext: the Python package, plus the qlora_ext._C CUDA extension when it can be built.

Documented install (isolation would build against a different torch than the one you run):

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .

Environment:
  CUDA_HOME              toolkit root (the directory holding bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST   e.g. "8.0;8.6;8.9;9.0a" (the default), "9.0a", "8.6+PTX", "native".
  MAX_JOBS               parallel compile jobs (default: min(CPUs, available GiB / 4), so nvcc
                         cannot run the machine out of memory).
  NVCC_THREADS           nvcc --threads: arch targets of one unit compiled in parallel (default 1).
  QLORA_EXT_SKIP_CUDA=1  install the pure-Python package only (reference path everywhere).
  CUTLASS_DIR            CUTLASS headers root (has include/cute); else the nvidia-cutlass wheel's
                         headers when installed. See third_party/README.md.

Metadata lives in pyproject.toml; this file only decides whether and how to compile the extension.
The translation units come from csrc/sources.txt, the flags and arch rules from csrc/build_flags.txt.
CMakeLists.txt builds the same thing: it asks this file for the resolved build (`--cmake-config`).
Every nvcc call goes through this file too (`--nvcc`, see run_nvcc), in both builds.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def read_config(name):
    """Lines of csrc/<name> without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / "csrc" / name).read_text().splitlines())
    return [line for line in lines if line]


FLAGS = dict(line.split(":", 1) for line in read_config("build_flags.txt"))
FLAGS = {key.strip(): value.strip() for key, value in FLAGS.items()}


def run_nvcc(cmd):
    """Run one nvcc command, print its output, and fail it when the output says ptxas serialized wgmma."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    sys.stdout.write(proc.stdout)
    if proc.returncode == 0 and FLAGS["nvcc_fail_on"] in proc.stdout:
        print(f"qlora_ext: error: nvcc printed '{FLAGS['nvcc_fail_on']}' (see above); failing this unit.")
        if "-o" in cmd:  # a failed command must leave no object behind, or ninja would consider it built
            Path(cmd[cmd.index("-o") + 1]).unlink(missing_ok=True)
        return 1
    return proc.returncode


if __name__ == "__main__" and sys.argv[1:2] == ["--nvcc"]:  # before importing torch: runs once per unit
    sys.exit(run_nvcc(sys.argv[2:]))

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("qlora_ext: torch must be installed before building (pip install torch), then run "
             "`pip install --no-build-isolation .` so the build uses that torch.")


def note(msg):
    print(f"qlora_ext: {msg}", flush=True)


def read_sources():
    """csrc/sources.txt; fails on listed-but-missing and present-but-unlisted files."""
    listed = read_config("sources.txt")
    on_disk = sorted(p.relative_to(ROOT).as_posix() for ext in ("cu", "cpp") for p in ROOT.glob(f"csrc/**/*.{ext}"))
    problems = [f"listed in csrc/sources.txt but missing: {s}" for s in listed if not (ROOT / s).is_file()]
    problems += [f"present but not listed in csrc/sources.txt (it would never be compiled): {s}"
                 for s in on_disk if s not in listed]
    if problems:
        sys.exit("qlora_ext: source list out of date:\n  " + "\n  ".join(problems) +
                 "\nEdit csrc/sources.txt, or keep unfinished files outside csrc/.")
    return listed


def parse_arch_list(spec):
    """TORCH_CUDA_ARCH_LIST -> {arch: its -gencode flags}, e.g. {"9.0a": ["-gencode=arch=compute_90a,code=sm_90a"]}."""
    if spec.strip() == "native":
        if not torch.cuda.is_available():
            sys.exit("qlora_ext: TORCH_CUDA_ARCH_LIST=native needs a visible GPU; name the archs instead.")
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        # A Hopper seen natively gets 9.0a: the binary targets exactly this GPU, so use its fast path.
        spec = ";".join(f"{a}.{b}{'a' if (a, b) == (9, 0) else ''}" for a, b in caps)
    archs = {}
    for item in spec.replace(" ", ";").split(";"):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if not m:
            sys.exit(f"qlora_ext: cannot parse TORCH_CUDA_ARCH_LIST entry {item!r}: expected entries like "
                     "8.0, 8.6, 9.0a or 8.9+PTX, separated by ';'.")
        if int(m[1]) < 8:
            sys.exit(f"qlora_ext: compute capability {item} is not supported: the kernels need bf16 "
                     "tensor cores (8.0 or newer). Remove it from TORCH_CUDA_ARCH_LIST.")
        num = m[1] + m[2] + m[3]
        gencode = archs.setdefault(f"{m[1]}.{m[2]}{m[3]}", [f"-gencode=arch=compute_{num},code=sm_{num}"])
        if m[4] and len(gencode) == 1:
            gencode.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not archs:
        sys.exit("qlora_ext: TORCH_CUDA_ARCH_LIST is empty.")
    return archs


def cuda_build_blocker():
    """None when the extension can be compiled, else the reason it is skipped (pure-Python install)."""
    if os.environ.get("QLORA_EXT_SKIP_CUDA", "0") == "1":
        return "QLORA_EXT_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME to the directory that holds bin/nvcc)"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        # torch guessed CUDA_HOME from an nvcc on PATH that is not inside a toolkit (a wrapper script).
        sys.exit(f"qlora_ext: CUDA_HOME={home!r} has bin/nvcc but no include/cuda_runtime.h. Set CUDA_HOME to "
                 "the toolkit root, or QLORA_EXT_SKIP_CUDA=1 to install without kernels.")
    return None


def find_cutlass_includes():
    """Include dirs of CUTLASS/CuTe: $CUTLASS_DIR, else the nvidia-cutlass wheel. [] when absent."""
    import importlib.util

    env = os.environ.get("CUTLASS_DIR")
    spec = importlib.util.find_spec("cutlass_library")
    root = Path(env) if env else Path(spec.submodule_search_locations[0], "source") if spec else None
    if root and (root / "include" / "cute" / "tensor.hpp").is_file():
        return [str(d) for d in (root / "include", root / "tools" / "util" / "include") if d.is_dir()]
    if env:
        sys.exit(f"qlora_ext: CUTLASS_DIR={env!r} has no include/cute/tensor.hpp; point it at a CUTLASS "
                 "checkout or the nvidia-cutlass wheel's cutlass_library/source directory.")
    return []


def library_header_dirs():
    """Where cusparse.h & co. are when the toolkit was installed without its math libraries.

    ATen/cuda/CUDAContext.h includes cusparse.h, cublas_v2.h and cusolverDn.h; torch's own nvidia-* wheels
    ship them. They are added with -idirafter (searched last), so every header the toolkit has still comes
    from the toolkit that matches nvcc."""
    if os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    headers = (h for r in (spec.submodule_search_locations if spec else []) for h in Path(r).glob("*/include/cu*.h"))
    return sorted({str(h.parent) for h in headers if h.name in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")})


def default_max_jobs(nvcc_threads):
    """Parallel nvcc jobs that fit in memory: ~4 GiB per job and nvcc thread for template-heavy units."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return max(1, min(cpus, int(avail_kib / 2**20 / (4 * nvcc_threads))))
    except (OSError, StopIteration):
        return cpus


def cuda_extension():
    """The extension, plus its arch list as a string."""
    sources = read_sources()
    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or FLAGS["default_arch_list"])
    sm90 = FLAGS["sm90_arch"] in archs
    if not sm90:
        sources = [s for s in sources if not s.endswith(FLAGS["sm90_suffix"])]
    cxx = FLAGS["cxx"].split()
    nvcc = FLAGS["nvcc"].split()
    cutlass_includes = find_cutlass_includes()
    if sm90:
        if not cutlass_includes and any(s.endswith(FLAGS["sm90_suffix"]) for s in sources):
            sys.exit(f"qlora_ext: the sm_90a units ({FLAGS['sm90_arch']} is in the arch list) build on CUTLASS, and "
                     "no CUTLASS headers were found. Install them with `pip install --no-deps "
                     "nvidia-cutlass==4.2.0.0`, or set CUTLASS_DIR to a CUTLASS checkout, or leave "
                     f"{FLAGS['sm90_arch']} out of TORCH_CUDA_ARCH_LIST (the portable kernels still run on Hopper).")
        cxx += FLAGS["sm90_defines"].split()
        nvcc += FLAGS["sm90_defines"].split()
    nvcc_threads = int(os.environ.get("NVCC_THREADS") or 1)
    if nvcc_threads > 1:
        nvcc.append(f"--threads={nvcc_threads}")
    for d in library_header_dirs():
        cxx.append(f"-idirafter{d}")
        nvcc.append(f"-Xcompiler=-idirafter{d}")
    for gencode in archs.values():
        nvcc += gencode  # explicit -gencode: torch then adds no arch flags of its own
    ext = cpp_extension.CUDAExtension(
        name="qlora_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + cutlass_includes,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=FLAGS["ldflags"].split() if sys.platform.startswith("linux") else [],
    )
    arch_list = ";".join(a + ("+PTX" if len(g) > 1 else "") for a, g in archs.items())
    return ext, arch_list


def sm90_nvcc(nvcc):
    """An sm90 unit's nvcc flags: the portable unit's, with sm90_arch as the only target."""
    return [f for f in nvcc if not f.startswith("-gencode=")] + parse_arch_list(FLAGS["sm90_arch"])[FLAGS["sm90_arch"]]


def nvcc_launcher():
    """The command every unit's nvcc call goes through (run_nvcc), as a list."""
    nvcc = os.environ.get("PYTORCH_NVCC") or os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    return [sys.executable, str(ROOT / "setup.py"), "--nvcc"] + shlex.split(nvcc)


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the sm90 rule: torch compiles all .cu files of an extension with one
    nvcc flag set, so the sm90 units are compiled first, in their own ninja pass with sm_90a-only flags,
    and linked in as extra objects."""

    arch_list = ""

    def build_extension(self, ext):
        note(f"compiling qlora_ext._C for {self.arch_list} with {cpp_extension.CUDA_HOME}/bin/nvcc "
             f"(MAX_JOBS={os.environ['MAX_JOBS']})")
        sm90_units = [s for s in ext.sources if s.endswith(FLAGS["sm90_suffix"])]
        sources, objects = ext.sources, ext.extra_objects
        if sm90_units:
            args = dict(ext.extra_compile_args, nvcc=sm90_nvcc(ext.extra_compile_args["nvcc"]))
            ext.extra_objects = list(objects or []) + self.compiler.compile(
                sm90_units, output_dir=os.path.join(self.build_temp, "sm90"), macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args, depends=ext.depends)
            ext.sources = [s for s in sources if s not in sm90_units]
        try:
            super().build_extension(ext)
        finally:
            ext.sources, ext.extra_objects = sources, objects


class BuildPyNoCuda(build_py):
    """Pure-Python install: say once, in the build output, why there are no kernels."""

    reason = ""

    def run(self):
        note(f"building WITHOUT CUDA kernels ({self.reason}); CUDA tensors will use the PyTorch "
             "reference path. Install a CUDA build of torch, set CUDA_HOME and rebuild to get the kernels.")
        super().run()


def write_cmake_config(path):
    """The resolved build as CMake variables, for CMakeLists.txt: the same units, flags and libraries.
    The flags include what torch's BuildExtension adds to every unit when setup.py builds."""
    blocker = cuda_build_blocker()
    if blocker:
        sys.exit(f"qlora_ext: cannot configure the CUDA build: {blocker}")
    ext, arch_list = cuda_extension()
    torch_defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    nvcc = cpp_extension.COMMON_NVCC_FLAGS + ext.extra_compile_args["nvcc"] + torch_defines
    sm90 = [s for s in ext.sources if s.endswith(FLAGS["sm90_suffix"])]
    values = {
        "ARCH_LIST": [arch_list],
        "CXX_SOURCES": [str(ROOT / s) for s in ext.sources if not s.endswith(".cu")],
        "CUDA_SOURCES": [str(ROOT / s) for s in ext.sources if s.endswith(".cu") and s not in sm90],
        "SM90_SOURCES": [str(ROOT / s) for s in sm90],
        "CXX_FLAGS": ext.extra_compile_args["cxx"] + torch_defines,
        "CUDA_FLAGS": nvcc,
        "SM90_CUDA_FLAGS": sm90_nvcc(nvcc),
        "INCLUDE_DIRS": ext.include_dirs,
        "LIBRARY_DIRS": ext.library_dirs,
        "LIBRARIES": ext.libraries,
        "LINK_OPTIONS": ext.extra_link_args,
        "NVCC_LAUNCHER": nvcc_launcher()[:3],
    }

    def quote(value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'

    Path(path).write_text("".join(f"set(QLORA_EXT_{k} {' '.join(map(quote, v))})\n" for k, v in values.items()))


if __name__ == "__main__" and sys.argv[1:2] == ["--cmake-config"]:
    write_cmake_config(sys.argv[2])
elif (blocker := cuda_build_blocker()) is not None:
    BuildPyNoCuda.reason = blocker
    setup(cmdclass={"build_py": BuildPyNoCuda})
else:
    ext, BuildExt.arch_list = cuda_extension()
    # Without ninja torch falls back to compiling one file at a time, bypassing the nvcc launcher. A pip run
    # from a venv that is not activated does not have the venv's bin (where the ninja wheel puts it) on PATH.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    if not shutil.which("ninja"):
        sys.exit("qlora_ext: ninja is required to build the CUDA extension: pip install ninja")
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(default_max_jobs(int(os.environ.get("NVCC_THREADS") or 1)))
    os.environ["PYTORCH_NVCC"] = shlex.join(nvcc_launcher())  # torch's nvcc command in build.ninja
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
