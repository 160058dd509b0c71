#!/usr/bin/env bash
# Every GPU check in one command: the tests marked gpu, then benchmarks/bench_gpu.py. Results go to OUTDIR:
#
#   benchmarks/gpu_check.sh OUTDIR          # PYTHON=/path/to/python to choose the interpreter
#
# OUTDIR/device.txt         the card, driver, torch/CUDA versions (nvidia-smi)
# OUTDIR/results/gpu/gpu-tests.xml  JUnit XML of `pytest -m gpu tests` (every test marked gpu), its suite named
#                                   after the commit (and gpu-tests.log beside it, pytest's output)
# OUTDIR/results/gpu/gpu.json       bench_gpu.py's figures, rewritten after each part (and OUTDIR/bench_gpu.log)
# OUTDIR/RESULTS.md         the RESULTS.md section they become, its pass count read from the XML
# OUTDIR/SUMMARY.md         test counts, exit statuses, the figures' summary lines, how to publish them
#
# At most 8 minutes: the tests get GPU_CHECK_TESTS_S seconds (default 200), the benchmark
# GPU_CHECK_BENCH_S (default 260); each part is stopped at its limit and what it wrote so far stays.
# Publish the figures and the test log: cp -r OUTDIR/results/gpu benchmarks/results/ && python benchmarks/_common.py
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
TESTS_S=${GPU_CHECK_TESTS_S:-200}
BENCH_S=${GPU_CHECK_BENCH_S:-260}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checked-out code, whatever is installed
export PYTHONUNBUFFERED=1
start=$(date +%s)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- finetune recipes tests benchmarks setup.cfg 2>/dev/null || commit="$commit+uncommitted"
mkdir -p "$OUT/results/gpu"

{
    date -Is
    git rev-parse --short HEAD 2>/dev/null
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))'
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

echo "== gpu tests (limit ${TESTS_S}s) -> $OUT/results/gpu/gpu-tests.log"
timeout -k 10 "$TESTS_S" "$PY" -m pytest -m gpu tests -v -rs -p no:cacheprovider \
    --junitxml "$OUT/results/gpu/gpu-tests.xml" -o junit_suite_name="gpu tests at $commit" \
    > "$OUT/results/gpu/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/results/gpu/gpu-tests.log"

echo "== bench_gpu.py (limit ${BENCH_S}s) -> $OUT/bench_gpu.log"
timeout -k 10 "$BENCH_S" "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget $((BENCH_S - 70)) \
    > "$OUT/bench_gpu.log" 2>&1
bench_rc=$?
tail -n 8 "$OUT/bench_gpu.log"

"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import _common

out, tests_rc, bench_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gpu = out / "results" / "gpu"
status = lambda rc: "ok" if rc == 0 else ("stopped at its time limit" if rc in (124, 137) else f"exit status {rc}")
lines = ["# GPU check", "", f"{seconds} s in all.", "", "```", (out / "device.txt").read_text().strip(), "```", ""]
try:
    n = _common.junit_counts(gpu / _common.GPU_TESTS_XML)
    lines.append(f"- gpu tests ({n['name']}): {status(tests_rc)}; {n['passed']} passed, {n['failures']} failed, "
                 f"{n['errors']} errors, {n['skipped']} skipped of {n['tests']} (results/gpu/gpu-tests.xml and .log)")
    lines += [f"  - failed: {name}" for name in n["failed"]]
except (OSError, ValueError, AttributeError):  # no XML, a half-written one, or no testsuite in it
    lines.append(f"- gpu tests: {status(tests_rc)}; no JUnit XML (see results/gpu/gpu-tests.log)")
try:
    doc = json.loads((gpu / "gpu.json").read_text())
    lines.append(f"- bench_gpu.py: {status(bench_rc)}; figures in results/gpu/gpu.json and RESULTS.md:")
    lines += [f"  - {line}" for line in doc["summary"]]
except (OSError, ValueError, KeyError):
    lines.append(f"- bench_gpu.py: {status(bench_rc)}; no figures (see bench_gpu.log)")
if gpu.is_dir():
    _common.render_results(out)  # RESULTS.md of what is in OUTDIR, the test counts included
    lines += ["", f"Publish: `cp -r {gpu} benchmarks/results/ && python benchmarks/_common.py`"]
(out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
