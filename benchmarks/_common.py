"""Shared helpers of the benchmark scripts: the machine, timing, JSON results and RESULTS.md.

Every script writes ``<out>/results/<name>.json`` (default ``<out>`` is this folder) and then regenerates
``<out>/RESULTS.md`` from all JSON files there, so a script only ever replaces its own section.

The GPU check's results live in their own folder, ``<out>/results/gpu/``: ``gpu.json`` (bench_gpu.py) and
``gpu-tests.xml`` (the JUnit XML of the GPU tests), so publishing them is copying that folder, and the GPU
section's pass count is read from that XML, never typed.

A JSON result holds ``name``, ``title``, ``command``, ``created``, ``tiny``, ``wall_s``, ``machine``,
``settings``, ``summary`` (lines), ``tables`` (``caption``, ``columns``, ``rows``), ``notes`` (lines) and
``results`` (the raw numbers).

The machine is shared and may be loaded by other work, so every claim is a ratio of variants measured
side by side in the same run: interleaved rounds (A B B A ...), medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

# the 1-minute load average when the benchmark started (this module is imported first thing)
START_LOAD = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

# section order in RESULTS.md; a result whose name is not listed goes last
# results kept in a sub-folder of results/ (with the files that go with them)
FOLDERS = {"gpu": "gpu"}
GPU_TESTS_XML = "gpu-tests.xml"

ORDER = ("dataset", "gpu", "step", "feature_cache", "extract_memory", "checkpoint", "data", "decode", "heads", "quickstart", "recipes", "head_accuracy", "audit",
         "export")


# ------------------------------------------------------------------------------------------ arguments

def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: ``--tiny`` and ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="a seconds-long run on a tiny setting (what the smoke tests use); numbers mean nothing")
    p.add_argument("--out", type=Path, default=BENCH_DIR,
                   help="folder receiving results/<name>.json and RESULTS.md (default: benchmarks/)")
    return p


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared machine, two threads waiting for each other "
                        "while another process holds a core made small steps up to 40x slower, and erratic)")


# -------------------------------------------------------------------------------------------- machine

def describe_machine() -> dict[str, Any]:
    """CPU model and cores, memory, library versions, the GPU (or "none") and the load right now."""
    import numpy
    import timm

    from finetune._workers import usable_cpus
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    for module in ("torchvision", "albumentations", "cv2", "PIL"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def code_version() -> dict[str, Any]:
    """The git commit measured, and whether the package or recipes differ from it (uncommitted edits)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--", "finetune", "recipes", "setup.cfg"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


START_CODE = code_version()
"""The commit when the benchmark started (a later commit doesn't change what this process imported)."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def load_average() -> Optional[float]:
    """The 1-minute load average (how busy the shared machine is), or None where unknown."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------------------- timing

def interleave(variants: dict[str, Callable[[], float]], rounds: int, warmup: int = 1,
               unit: str = "") -> dict[str, list[float]]:
    """Run every variant ``rounds`` times, interleaved, and return each one's measurements.

    Each call returns one measurement (e.g. seconds). Round ``r`` runs the variants in order, reversed
    on odd rounds (A B, B A, A B, ...), so a drift in the machine's load hits all of them alike. The
    ``warmup`` rounds before are run and discarded. Each round is printed to stderr as it ends.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(variants[name]())
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {results[n][-1]:.4g}{unit}" for n in names),
              file=sys.stderr, flush=True)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two interleaved series (round r of one over round r of the other)."""
    return [a / b for a, b in zip(numerator, denominator)]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a series of ratios or timings."""
    return {"median": median(values), "min": float(min(values)), "max": float(max(values))}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": float(statistics.fmean(values)),
            "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0}


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------- sample data

def digits_folder(root: Path, per_class: Optional[int] = None, source: Optional[Path] = None) -> Path:
    """The digits sample: ``source`` when given, else written under ``root`` by
    ``finetune.data.write_digits``; with ``per_class``, a copy under ``root`` holding only the first
    ``per_class`` images of each class (tiny runs)."""
    import shutil

    from finetune.data import write_digits

    full = Path(source) if source else write_digits(Path(root) / "digits")
    if per_class is None:
        return full
    subset = Path(root) / f"digits-{per_class}"
    if not subset.exists():
        for class_dir in sorted(p for p in full.iterdir() if p.is_dir()):
            (subset / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(image, subset / class_dir.name / image.name)
    return subset


TINY_SETS = (
    "model.backbone=test_resnet", "model.pretrained=false", "data.input_size=32", "data.num_workers=0",
    "data.train_transforms.0.height=32", "data.train_transforms.0.width=32",
    "data.eval_transforms.0.height=32", "data.eval_transforms.0.width=32",
)
"""Overrides making the quickstart recipe tiny: timm's test_resnet (random init) at 32 px, no workers."""


def tiny_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply `TINY_SETS` to a raw quickstart-based recipe, in place."""
    from finetune.config import apply_override

    for assignment in TINY_SETS:
        apply_override(raw, assignment)
    return raw


def synthetic_photo(height: int, width: int, seed: int):
    """An H×W×3 uint8 image that compresses like a photo: smooth colour fields, edges, fine texture."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3)).astype(np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    for _ in range(6):  # a few solid shapes give sharp edges
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        radius = int(rng.integers(min(height, width) // 20 + 1, min(height, width) // 4 + 2))
        cv2.circle(img, centre, radius, colour, thickness=-1)
    img += rng.normal(0, 6, img.shape)  # sensor-like noise
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- results

def write_result(out: Path, name: str, *, title: str, command: str, tiny: bool, wall_s: float,
                 settings: dict[str, Any], summary: list[str], tables: list[dict[str, Any]],
                 results: dict[str, Any], notes: Sequence[str] = ()) -> Path:
    """Write ``<out>/results/<name>.json`` and regenerate ``<out>/RESULTS.md``; return the JSON path."""
    machine = describe_machine()
    doc = {
        "name": name,
        "title": title,
        "command": command,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tiny": tiny,
        "wall_s": round(wall_s, 1),
        "code": START_CODE,
        "machine": machine,
        "load_average_start": START_LOAD,
        "settings": settings,
        "summary": list(summary),
        "tables": tables,
        "notes": list(notes),
        "results": results,
    }
    path = result_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    render_results(Path(out))
    print("\n".join(summary))
    print(f"wrote {path} and {Path(out) / 'RESULTS.md'}")
    return path


def result_path(out: Path, name: str) -> Path:
    """Where result ``name`` is written: ``<out>/results/[<folder>/]<name>.json``."""
    folder = FOLDERS.get(name)
    return Path(out) / "results" / (f"{folder}/{name}.json" if folder else f"{name}.json")


def junit_counts(path: Path) -> dict[str, Any]:
    """Counts of a pytest JUnit XML file: tests, passed, failures, errors, skipped, time (s), and the suite's
    name, timestamp and hostname (gpu_check.sh names the suite after the commit it ran)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["time"] = float(suite.get("time", 0))
    n.update({k: suite.get(k) for k in ("name", "timestamp", "hostname")})
    n["failed"] = [case.get("classname", "") + "::" + case.get("name", "") for case in suite.iter("testcase")
                   if case.find("failure") is not None or case.find("error") is not None]
    return n


def _json_default(value):
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(caption: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": rows}


def render_results(out: Path, write: bool = True) -> str:
    """Regenerate ``<out>/RESULTS.md`` from every ``<out>/results/*.json`` (``write=False``: only return it)."""
    results = Path(out) / "results"
    docs = []
    paths = sorted(results.glob("*.json")) + sorted(p for folder in sorted(set(FOLDERS.values()))
                                                    for p in (results / folder).glob("*.json"))
    for p in paths:
        doc = json.loads(p.read_text())
        if doc["name"] == "gpu":
            xml = p.parent / GPU_TESTS_XML
            doc["_tests"] = junit_counts(xml) if xml.is_file() else None
        docs.append(doc)
    docs.sort(key=lambda d: (_order(d["name"]), d["name"]))
    lines = [
        "# Benchmark results",
        "",
        "Generated by the scripts in `benchmarks/` (each one rewrites its JSON in `benchmarks/results/` and",
        "regenerates this file; do not edit it by hand). Run one from the repository root, e.g.",
        "`python benchmarks/bench_step.py`; `--tiny` is the seconds-long smoke setting the tests use.",
        "",
        "The machine is shared with other work, so absolute speeds move with its load: speed claims are",
        "ratios of variants measured in the same run. A section says \"side by side\" only where its variants",
        "ran interleaved (A B B A ..., medians) and gives an A/A spread where it has one; a single run or seed",
        "has no spread to judge small differences by. The load average at the start and end of each",
        "benchmark is given with it.",
        "",
    ]
    lines += _machine_section(docs)
    if not any(d["name"] == "gpu" and not d.get("tiny") and d["machine"].get("gpu") != "none" for d in docs):
        lines += _GPU_PENDING
    for doc in docs:
        lines += _section(doc)
    text = "\n".join(lines).rstrip() + "\n"
    if write:
        (Path(out) / "RESULTS.md").write_text(text)
    return text


_GPU_PENDING = [
    "## GPU: pending",
    "",
    "No GPU has been lent to this project yet, so there are no GPU figures. On a machine with a CUDA GPU, one",
    "command runs the GPU tests (`pytest -m gpu tests/gpu`) and `benchmarks/bench_gpu.py` (training step vs a",
    "plain loop with AMP + channels_last for resnet50 and tf_efficientnet_lite0, model FLOP utilisation,",
    "cached-feature extraction) in under 8 minutes and writes everything under the folder it is given:",
    "",
    "```bash",
    "benchmarks/gpu_check.sh gpu-check-out",
    "cp -r gpu-check-out/results/gpu benchmarks/results/ && python benchmarks/_common.py   # this section, filled in",
    "```",
    "",
]
"""Shown until a GPU result (results/gpu/gpu.json from a real GPU) exists."""


def _order(name: str) -> int:
    """A result's place: that of the longest ORDER name it starts with (feature_cache_128px after
    feature_cache), else last."""
    matches = [i for i, known in enumerate(ORDER) if name == known or name.startswith(known + "_")]
    return max(matches, key=lambda i: len(ORDER[i])) if matches else len(ORDER)


def _machine_section(docs: list[dict[str, Any]]) -> list[str]:
    lines = ["## Machine", ""]
    if not docs:
        return lines + ["No results yet.", ""]
    keys = ("cpu", "logical_cores", "memory_gb", "os", "python", "torch", "timm", "torchvision",
            "albumentations", "cv2", "PIL", "numpy", "gpu")
    seen: list[dict[str, Any]] = []
    for doc in docs:
        m = {k: doc["machine"].get(k) for k in keys}
        if m not in seen:
            seen.append(m)
    for m in seen:
        lines.append(
            f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gb']} GB RAM; {m['os']}; "
            f"Python {m['python']}, torch {m['torch']}, timm {m['timm']}, torchvision {m['torchvision']}, "
            f"albumentations {m['albumentations']}, OpenCV {m['cv2']}, Pillow {m['PIL']}, numpy {m['numpy']}"
        )
        lines.append(f"- GPU: {m['gpu']}")
    lines.append("")
    gpus = sorted({m["gpu"] for m in seen if m["gpu"] not in (None, "none")})
    if gpus and any(m["gpu"] == "none" for m in seen):
        lines += [
            f"Only the sections that name a GPU ({', '.join(gpus)}) ran on a GPU machine; every other number was",
            "measured on a CPU machine without one (its line above says GPU: none).",
            "",
        ]
    elif not gpus:
        lines += [
            "**No GPU was available for these runs.** Every number here was measured on the CPU above; the",
            "GPU measurements (mixed precision, larger backbones and resolutions, multi-GPU) have not been",
            "made and nothing here says how finetune performs on a GPU.",
            "",
        ]
    return lines


def _section(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    lines = [f"## {doc['title']}", ""]
    if doc.get("tiny"):
        lines += ["**Tiny smoke setting: the numbers below mean nothing.**", ""]
    code = doc.get("code") or {}
    commit = f"commit {code.get('commit')}{' + uncommitted changes' if code.get('dirty') else ''}"
    lines += [
        f"`{doc['command']}` on {commit} — {doc['created']}, {doc['wall_s']:.0f} s; 1-minute load average "
        f"{doc.get('load_average_start')} at the start, {(m.get('load_average') or [None])[0]} at the end, "
        f"on {m.get('logical_cores')} cores; GPU: {m.get('gpu')}.",
        "",
    ]
    loads = [x for x in (doc.get("load_average_start"), (m.get("load_average") or [None])[0]) if x is not None]
    if loads and max(loads) > (m.get("logical_cores") or 1):
        lines += [f"**The machine was loaded by other work (load average up to {max(loads)} on "
                  f"{m.get('logical_cores')} cores)**: absolute times are inflated and noisier; the ratios "
                  "within the run are what to read.", ""]
    lines += [f"- {line}" for line in doc["summary"]]
    lines.append("")
    for t in doc["tables"]:
        if t.get("caption"):
            lines += [t["caption"], ""]
        lines.append("| " + " | ".join(t["columns"]) + " |")
        lines.append("|" + "|".join("---" for _ in t["columns"]) + "|")
        for row in t["rows"]:
            lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
        lines.append("")
    if "_tests" in doc:
        lines += _gpu_tests_lines(doc["_tests"])
    if doc["notes"]:
        lines += ["Notes:", ""] + [f"- {note}" for note in doc["notes"]] + [""]
    return lines


def _gpu_tests_lines(n: Optional[dict[str, Any]]) -> list[str]:
    """The GPU tests' outcome, read from the JUnit XML gpu_check.sh wrote beside gpu.json (None: there is none)."""
    if n is None:
        return ["No JUnit XML of the GPU tests (`results/gpu/gpu-tests.xml`) is committed beside these figures, "
                "so no pass count is claimed for them.", ""]
    lines = [f"GPU tests (`pytest -m gpu tests`, JUnit XML `results/gpu/gpu-tests.xml`, suite `{n['name']}`, "
             f"{n['timestamp']} on {n['hostname']}): **{n['passed']} passed**, {n['failures']} failed, "
             f"{n['errors']} errors, {n['skipped']} skipped of {n['tests']} in {n['time']:.0f} s.", ""]
    lines += [f"- failed: `{name}`" for name in n["failed"]]
    return lines + ([""] if n["failed"] else [])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run, for the result's ``command`` field."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)]
    shown = []
    skip = False
    for a in args:  # the output folder is the caller's business; don't record temp paths
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        shown.append(a)
    return " ".join(["python", f"benchmarks/{script}", *shown])


if __name__ == "__main__":  # regenerate RESULTS.md from results/*.json (e.g. after copying in gpu.json)
    render_results(BENCH_DIR)
    print(f"wrote {BENCH_DIR / 'RESULTS.md'}")
