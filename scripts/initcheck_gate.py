"""The initcheck gate: sort the reports of `compute-sanitizer --tool initcheck python scripts/sanitize_kernels.py`
into reads of tensors a cuBLAS call wrote last (the tool's blind spot on an H200, shown with no code of ours by
`sanitize_kernels.py --cublas-control`) and everything else, which fails the gate.

    python scripts/initcheck_gate.py LOG [--control CONTROL_LOG]

sanitize_kernels.py prints, per configuration, a `config` line and one `cublas-written NAME START END` line per
such tensor; a report belongs to the configuration whose block it appears in (each configuration synchronizes
before the next begins). Exit status 0 when every report is explained and the log is complete (the run finished
and the tool printed every report it counted), 3 otherwise."""
import argparse
import re
import sys
from collections import Counter

CONFIG = re.compile(r"^sanitize_kernels: config (.*)$")
RANGE = re.compile(r"^sanitize_kernels: cublas-written (\S+) 0x([0-9a-f]+) 0x([0-9a-f]+)$")
REPORT = re.compile(r"^========= Uninitialized __global__ memory read of size (\d+) bytes")
KERNEL = re.compile(r"^=========     at (.+?)(\+0x[0-9a-f]+)?( in .*)?$")
ADDRESS = re.compile(r"^=========     Address 0x([0-9a-f]+)")
SUMMARY = re.compile(r"^========= ERROR SUMMARY: (\d+) errors?$")


def parse(lines):
    """-> (blocks, errors counted by the tool or None, finished): blocks are
    [config, {name: (start, end)}, [(address, size, kernel)]]."""
    blocks = [["(before the first configuration)", {}, []]]
    counted, finished, pending = None, False, None
    for line in lines:
        line = line.rstrip("\n")
        if m := CONFIG.match(line):
            blocks.append([m.group(1), {}, []])
        elif m := RANGE.match(line):
            blocks[-1][1][m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
        elif m := REPORT.match(line):
            pending = [None, int(m.group(1)), None]
        elif pending is not None and pending[2] is None and (m := KERNEL.match(line)):
            pending[2] = m.group(1)
        elif pending is not None and (m := ADDRESS.match(line)):
            pending[0] = int(m.group(1), 16)
            blocks[-1][2].append(tuple(pending))
            pending = None
        elif m := SUMMARY.match(line):
            counted = int(m.group(1))
        elif line.startswith("sanitize_kernels: all kernels ran"):
            finished = True
    return blocks, counted, finished


def explain(block):
    """Reports of one block -> (explained: Counter of (tensor, kernel), unexplained: list of reports)."""
    _, ranges, reports = block
    explained, unexplained = Counter(), []
    for address, size, kernel in reports:
        name = next((n for n, (a, b) in ranges.items() if a <= address and address + size <= b), None)
        if name is None:
            unexplained.append((address, size, kernel))
        else:
            explained[(name, kernel)] += 1
    return explained, unexplained


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--control", help="the --cublas-control run's log: its report count is shown beside the gate")
    a = ap.parse_args()
    with open(a.log, errors="replace") as f:
        blocks, counted, finished = parse(f)
    parsed = sum(len(b[2]) for b in blocks)
    n_explained, bad = 0, 0
    for block in blocks:
        explained, unexplained = explain(block)
        n_explained += sum(explained.values())
        bad += len(unexplained)
        for (name, kernel), n in sorted(explained.items()):
            print(f"explained   {n:6d}  read of cuBLAS-written {name} by {kernel[:100]}  [{block[0]}]")
        for address, size, kernel in unexplained[:10]:
            print(f"UNEXPLAINED {size}-byte read at {address:#x} by {kernel[:100]}  [{block[0]}]")
    ok = finished and counted is not None and counted == parsed and bad == 0
    print(f"initcheck gate: {parsed} reports (the tool counted {counted}); {n_explained} reads of tensors cuBLAS wrote, "
          f"{bad} unexplained; run {'finished' if finished else 'DID NOT FINISH'} -> {'PASS' if ok else 'FAIL'}")
    if a.control:
        with open(a.control, errors="replace") as f:
            _, control, _ = parse(f)
        print(f"cuBLAS control (no code of ours): the tool reported {control} reads of cuBLAS products")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
