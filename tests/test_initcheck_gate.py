"""CPU checks of scripts/initcheck_gate.py: a report is explained only by a cuBLAS-written range of its own
configuration's block, and an incomplete log never passes."""
import subprocess
import sys
from pathlib import Path

GATE = Path(__file__).resolve().parents[1] / "scripts" / "initcheck_gate.py"


def _report(address: int, size: int = 16, kernel: str = "qlora_ext::cp_async_16_zfill(unsigned int, const void *, int)"):
    return [f"========= Uninitialized __global__ memory read of size {size} bytes",
            f"=========     at {kernel}+0xe10 in mma_sm80.cuh:25",
            "=========     by thread (0,0,0) in block (4,0,0)",
            f"=========     Address {address:#x}",
            "========= "]


def _run(tmp_path, lines):
    log = tmp_path / "initcheck.log"
    log.write_text("\n".join(lines) + "\n")
    res = subprocess.run([sys.executable, str(GATE), str(log)], capture_output=True, text=True)
    return res.returncode, res.stdout


def _log(reports_a, reports_b, counted, finished=True):
    return (["========= COMPUTE-SANITIZER",
             "sanitize_kernels: config decode_gemm torch.bfloat16 double_quant=False m=3 k=256 n=1000 r=16",
             *sum((_report(a) for a in reports_a), []),
             "sanitize_kernels: cublas-written u 0x1000 0x1060",
             "sanitize_kernels: config fused torch.bfloat16 double_quant=False m=3 k=256 n=1000 r=16",
             *sum((_report(a) for a in reports_b), [])]
            + (["sanitize_kernels: all kernels ran"] if finished else [])
            + [f"========= ERROR SUMMARY: {counted} errors"])


def test_reads_inside_a_cublas_written_range_of_the_same_block_pass(tmp_path):
    rc, out = _run(tmp_path, _log([0x1000, 0x1050], [], 2))
    assert rc == 0 and "2 reads of tensors cuBLAS wrote, 0 unexplained" in out and "PASS" in out


def test_a_read_past_the_range_or_in_another_block_fails(tmp_path):
    rc, out = _run(tmp_path, _log([0x1058], [], 1))  # 16 bytes from 0x1058 end past 0x1060
    assert rc == 3 and "1 unexplained" in out
    rc, out = _run(tmp_path, _log([], [0x1000], 1))  # the range belongs to the other configuration
    assert rc == 3 and "UNEXPLAINED" in out and "[fused " in out


def test_an_incomplete_log_fails(tmp_path):
    assert _run(tmp_path, _log([0x1000], [], 1, finished=False))[0] == 3  # the run died
    assert _run(tmp_path, _log([0x1000], [], 5))[0] == 3  # the tool counted reports it did not print
    rc, out = _run(tmp_path, _log([], [], 0)[:-1])  # no summary line at all
    assert rc == 3
