"""benchmarks/gpu_check.sh, the one GPU command, checked on the CPU: it runs, the gpu tests are collected and
skip without CUDA, a part stopped at its time limit is reported as such, and the summary is written."""
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_the_script_is_executable_bash():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-side behaviour")
def test_without_cuda_the_gpu_tests_skip_and_the_summary_says_what_ran(tmp_path):
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BENCH_S": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check"
    run = subprocess.run([str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0  # the benchmark was stopped at its 1-second limit
    suite = ET.parse(out / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests >= 10 and skipped == tests, (out / "gpu-tests.log").read_text()[-2000:]
    assert "needs a CUDA device" in (out / "gpu-tests.log").read_text()
    summary = (out / "SUMMARY.md").read_text()
    assert f"gpu tests: ok; 0 passed, 0 failed, 0 errors, {tests} skipped of {tests}" in summary
    assert "bench_gpu.py: stopped at its time limit; no figures" in summary
    assert "available False" in (out / "device.txt").read_text()
