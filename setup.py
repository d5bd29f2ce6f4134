"""Build qlora_ext: the Python package, plus the qlora_ext._C CUDA extension when it can be built.

Documented install (isolation would build against a different torch than the one you run):

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .

Environment:
  CUDA_HOME              toolkit root (the directory holding bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST   e.g. "8.0;8.6;8.9;9.0a" (the default), "9.0a", "8.6+PTX", "native".
                         9.0a (not 9.0) is what enables the Hopper wgmma/TMA units (*_sm90.cu).
  MAX_JOBS               parallel compile jobs (default: min(CPUs, available GiB / 4), so nvcc
                         cannot run the machine out of memory).
  NVCC_THREADS           nvcc --threads: arch targets of one unit compiled in parallel (default 1).
  QLORA_EXT_SKIP_CUDA=1  install the pure-Python package only (reference path everywhere).
  CUTLASS_DIR            CUTLASS checkout/headers root (has include/cute); else the nvidia-cutlass
                         wheel's headers are used when installed. See third_party/README.md.

Metadata (name, version, dependencies, extras) lives in pyproject.toml; this file only decides
whether and how to compile the extension. The translation units come from csrc/sources.txt, the
one list CMakeLists.txt reads too.
"""
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCES_TXT = "csrc/sources.txt"
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0a"
SM90_SUFFIX = "_sm90.cu"  # arch-specific units: compiled for sm_90a only (csrc/sources.txt explains)


def note(msg):
    print(f"qlora_ext: {msg}", flush=True)


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit("qlora_ext: torch must be installed before building (pip install torch), then run "
             "`pip install --no-build-isolation .` so the build uses that torch.")


# ---------------------------------------------------------------------------------------------
# Source list
# ---------------------------------------------------------------------------------------------
def read_sources():
    """csrc/sources.txt minus comments; fails on listed-but-missing and present-but-unlisted files."""
    listed = []
    for line in (ROOT / SOURCES_TXT).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            listed.append(line)
    on_disk = sorted(p.relative_to(ROOT).as_posix()
                     for pattern in ("csrc/**/*.cu", "csrc/**/*.cpp") for p in ROOT.glob(pattern))
    missing = [s for s in listed if not (ROOT / s).is_file()]
    unlisted = [s for s in on_disk if s not in listed]
    problems = [f"listed in {SOURCES_TXT} but missing: {s}" for s in missing]
    problems += [f"present but not listed in {SOURCES_TXT} (it would never be compiled): {s}"
                 for s in unlisted]
    if problems:
        sys.exit("qlora_ext: source list out of date:\n  " + "\n  ".join(problems) + f"\nEdit {SOURCES_TXT} "
                 "(setup.py and CMakeLists.txt both read it), or keep unfinished files outside csrc/.")
    return listed


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    major: int
    minor: int
    suffix: str  # "" or "a" (arch-specific features: sm_90a wgmma/TMA)
    ptx: bool    # also embed PTX for JIT on newer GPUs

    @property
    def num(self):
        return f"{self.major}{self.minor}{self.suffix}"

    def gencode(self):
        flags = [f"-gencode=arch=compute_{self.num},code=sm_{self.num}"]
        if self.ptx:
            flags.append(f"-gencode=arch=compute_{self.num},code=compute_{self.num}")
        return flags


def native_arch_list():
    if not torch.cuda.is_available():
        sys.exit("qlora_ext: TORCH_CUDA_ARCH_LIST=native needs a visible GPU; name the archs instead, "
                 f"e.g. TORCH_CUDA_ARCH_LIST=\"{DEFAULT_ARCH_LIST}\".")
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    # A Hopper seen natively gets 9.0a: the binary targets exactly this GPU, so use its fast path.
    return ";".join(f"{a}.{b}a" if (a, b) == (9, 0) else f"{a}.{b}" for a, b in caps)


def parse_arch_list(spec):
    if spec.strip() == "native":
        spec = native_arch_list()
    archs = []
    for item in filter(None, (s.strip() for s in spec.replace(" ", ";").split(";"))):
        m = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", item)
        if not m:
            sys.exit(f"qlora_ext: cannot parse TORCH_CUDA_ARCH_LIST entry {item!r}: expected entries like "
                     "8.0, 8.6, 8.9, 9.0a or 8.9+PTX, separated by ';'.")
        arch = Arch(int(m[1]), int(m[2]), m[3], bool(m[4]))
        if (arch.major, arch.minor) < (8, 0):
            sys.exit(f"qlora_ext: compute capability {item} is not supported: the kernels need bf16 "
                     "tensor cores (8.0 or newer). Remove it from TORCH_CUDA_ARCH_LIST.")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        sys.exit("qlora_ext: TORCH_CUDA_ARCH_LIST is empty.")
    return archs


# ---------------------------------------------------------------------------------------------
# Toolchain
# ---------------------------------------------------------------------------------------------
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
        # Happens when nvcc on PATH is a wrapper script and torch guesses CUDA_HOME from its location:
        # compiling would fail later with a missing header or -lcudart, so stop with the fix instead.
        sys.exit(f"qlora_ext: CUDA_HOME resolved to {home!r}, which has bin/nvcc but no include/cuda_runtime.h. "
                 "Set CUDA_HOME to the toolkit root (e.g. CUDA_HOME=/usr/local/cuda), or QLORA_EXT_SKIP_CUDA=1 "
                 "to install without kernels.")
    return None


def ensure_ninja_on_path():
    # `venv/bin/pip install` without an activated venv leaves venv/bin (where the ninja wheel puts its
    # binary) off PATH; torch then silently falls back to a serial distutils build that takes hours.
    if shutil.which("ninja"):
        return True
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja
        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in candidates:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return True
    note("ninja not found: the build falls back to one file at a time (slow). `pip install ninja` fixes it.")
    return False


def default_max_jobs(nvcc_threads):
    """Parallel nvcc jobs that fit in memory: ~4 GiB per job per nvcc thread is a safe budget for
    template-heavy units, so a small machine does not swap or get OOM-killed."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = int(avail_kib / 2**20 / (4 * nvcc_threads))
    except (OSError, StopIteration, ValueError):
        by_memory = cpus
    return max(1, min(cpus, by_memory))


def find_cutlass_includes():
    """Include dirs of CUTLASS/CuTe: $CUTLASS_DIR, else the nvidia-cutlass wheel. [] when absent."""
    import importlib.util

    roots = []
    env = os.environ.get("CUTLASS_DIR")
    if env:
        roots.append(Path(env))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))) / "source")
    for root in roots:
        if (root / "include" / "cute" / "tensor.hpp").is_file():
            dirs = [root / "include", root / "tools" / "util" / "include"]
            return [str(d) for d in dirs if d.is_dir()]
    if env:
        sys.exit(f"qlora_ext: CUTLASS_DIR={env!r} has no include/cute/tensor.hpp; point it at a CUTLASS "
                 "checkout or the nvidia-cutlass wheel's cutlass_library/source directory.")
    return []


def library_header_fallback():
    """Include dirs for CUDA *library* headers (cusparse.h, cublas_v2.h, ...) missing from the toolkit.

    ATen/cuda/CUDAContext.h includes them. A toolkit installed without the math libraries lacks them,
    while torch's own pip dependencies (nvidia-cusparse, nvidia-cublas, ...) ship them under
    site-packages/nvidia. They are appended after the toolkit's include dir, so every header the
    toolkit does have (cuda_runtime.h, ...) still comes from the toolkit matching nvcc.
    """
    import importlib.util

    if os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    dirs = []
    for root in map(Path, roots):
        # CUDA 13 wheels: nvidia/cu13/include; CUDA 12 wheels: nvidia/<library>/include.
        for sub in ("cu13", "cu12", "cublas", "cusparse", "cusolver", "curand", "cufft"):
            d = root / sub / "include"
            if d.is_dir() and any(d.glob("cu*.h")) and str(d) not in dirs:
                dirs.append(str(d))
    if dirs:
        note(f"{cpp_extension.CUDA_HOME}/include has no cusparse.h; using library headers from {', '.join(dirs)}")
    return dirs


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
class BuildPyNoCuda(build_py):
    """Pure-Python install: say once, in the build output, why there are no kernels."""

    reason = ""

    def run(self):
        note(f"building WITHOUT CUDA kernels ({self.reason}); CUDA tensors will use the PyTorch "
             "reference path. Install a CUDA build of torch, set CUDA_HOME and rebuild to get the kernels.")
        super().run()


def make_build_ext(arch_list, sm90, max_jobs, nvcc_threads, cutlass):
    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus per-file arch flags: *_sm90.cu units get sm_90a only.

        torch compiles all .cu files of an extension with one flag set, so the sm90 units are
        compiled in a separate ninja pass (its own build dir) and linked in as extra objects.
        """

        def build_extension(self, ext):
            note(f"compiling qlora_ext._C for {arch_list} with {cpp_extension.CUDA_HOME}/bin/nvcc "
                 f"(MAX_JOBS={max_jobs}, NVCC_THREADS={nvcc_threads}, sm90 units: "
                 f"{'on' if sm90 else 'off'}, CUTLASS: {cutlass[0] if cutlass else 'not found'})")
            arch_units = [s for s in ext.sources if s.endswith(SM90_SUFFIX)]
            if not arch_units:
                return super().build_extension(ext)
            nvcc = [f for f in ext.extra_compile_args["nvcc"] if not f.startswith("-gencode")]
            args = dict(ext.extra_compile_args, nvcc=nvcc + Arch(9, 0, "a", False).gencode())
            objects = self.compiler.compile(
                arch_units, output_dir=os.path.join(self.build_temp, "sm90"), macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args, depends=ext.depends)
            portable, extra = ext.sources, ext.extra_objects
            ext.sources = [s for s in portable if s not in arch_units]
            ext.extra_objects = list(extra or []) + objects
            try:
                super().build_extension(ext)
            finally:
                ext.sources, ext.extra_objects = portable, extra

    return BuildExt


def cuda_extension():
    sources = read_sources()
    archs = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST)
    arch_list = ";".join(f"{a.major}.{a.minor}{a.suffix}{'+PTX' if a.ptx else ''}" for a in archs)
    sm90 = any((a.major, a.minor, a.suffix) == (9, 0, "a") for a in archs)
    if not sm90:
        sources = [s for s in sources if not s.endswith(SM90_SUFFIX)]

    nvcc_threads = int(os.environ.get("NVCC_THREADS") or 1)
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(default_max_jobs(nvcc_threads))  # read by torch's ninja runner
    max_jobs = os.environ["MAX_JOBS"]
    ensure_ninja_on_path()
    cutlass = find_cutlass_includes()

    # No -std here on purpose: when none is given, torch appends the standard its own headers require
    # (torch 2.14's headers #error below C++20; older releases build with C++17).
    cxx = ["-O3"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if nvcc_threads > 1:
        nvcc += ["--threads", str(nvcc_threads)]
    for a in archs:
        nvcc += a.gencode()  # explicit -gencode: torch then adds no arch flags of its own
    macros = [("QLORA_EXT_HAS_SM90", "1")] if sm90 else []

    ext = cpp_extension.CUDAExtension(
        name="qlora_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + cutlass,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )
    ext.include_dirs += library_header_fallback()  # after torch's and the toolkit's include dirs
    return ext, make_build_ext(arch_list, sm90, max_jobs, nvcc_threads, cutlass)


blocker = cuda_build_blocker()
if blocker is None:
    ext, build_ext_cls = cuda_extension()
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext_cls})
else:
    BuildPyNoCuda.reason = blocker
    setup(ext_modules=[], cmdclass={"build_py": BuildPyNoCuda})
