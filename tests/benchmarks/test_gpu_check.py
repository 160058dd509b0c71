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
    gpu = out / "results" / "gpu"
    suite = ET.parse(gpu / "gpu-tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert tests >= 10 and skipped == tests, (gpu / "gpu-tests.log").read_text()[-2000:]
    assert "needs a CUDA device" in (gpu / "gpu-tests.log").read_text()
    summary = (out / "SUMMARY.md").read_text()
    assert suite.get("name").startswith("gpu tests at ")  # the commit it ran, named in the XML itself
    assert f"gpu tests ({suite.get('name')}): ok; 0 passed, 0 failed, 0 errors, {tests} skipped of {tests}" in summary
    assert "bench_gpu.py: stopped at its time limit; no figures" in summary
    assert "available False" in (out / "device.txt").read_text()


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="gpu tests at abc1234" errors="0"
failures="1" skipped="1" tests="5" time="170.2" timestamp="2026-11-26T05:40:00" hostname="gpu-host">
<testcase classname="tests.gpu.test_cuda" name="test_a" time="1"/><testcase classname="tests.gpu.test_cuda" name="test_b"
time="1"><failure message="boom">trace</failure></testcase><testcase classname="tests.gpu.test_cuda" name="test_c"
time="1"><skipped message="needs a CUDA device"/></testcase><testcase classname="t" name="d" time="1"/>
<testcase classname="t" name="e" time="1"/></testsuite></testsuites>"""


def test_the_gpu_sections_pass_count_is_read_from_the_junit_xml_beside_gpu_json(tmp_path):
    """RESULTS.md's GPU test count comes from results/gpu/gpu-tests.xml (the issue-27 rule: no typed count);
    without the XML it claims none."""
    import importlib.util
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_common_gpu", REPO / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    doc = json.loads((REPO / "benchmarks" / "results" / "gpu" / "gpu.json").read_text())
    gpu = tmp_path / "results" / "gpu"
    gpu.mkdir(parents=True)
    assert common.result_path(tmp_path, "gpu") == gpu / "gpu.json"
    (gpu / "gpu.json").write_text(json.dumps(doc))
    text = common.render_results(tmp_path, write=False)
    assert "no pass count is claimed" in text and "passed**" not in text
    (gpu / "gpu-tests.xml").write_text(JUNIT)
    text = common.render_results(tmp_path, write=False)
    assert ("suite `gpu tests at abc1234`, 2026-11-26T05:40:00 on gpu-host): **3 passed**, 1 failed, 0 errors, "
            "1 skipped of 5 in 170 s.") in text
    assert "- failed: `tests.gpu.test_cuda::test_b`" in text
    assert "no pass count is claimed" not in text
