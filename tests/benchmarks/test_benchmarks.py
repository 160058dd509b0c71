"""Smoke tests of benchmarks/: each script runs on its tiny setting and writes its JSON and RESULTS.md.

Benchmarks, not timed tests: nothing here checks a speed or an accuracy, only that the numbers exist.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

# script -> (result name, keys of "results" that must be there)
SCRIPTS = {
    "bench_step.py": ("step", {"full_model", "head_only", "target"}),
    "bench_feature_cache.py": ("feature_cache", {"variants", "speedups", "runs", "target"}),
    "bench_data.py": ("data", None),
    "bench_decode.py": ("decode", None),
    "bench_heads.py": ("heads", {"linear", "spinal (default: 4x1024, p 0.5)", "mlp (default: 4096-4096)"}),
    "bench_quickstart.py": ("quickstart", {"wall_s", "cpu_s", "test_accuracy", "stages", "targets"}),
    "bench_head_accuracy.py": ("head_accuracy", {"stats", "difference", "runs"}),
    "bench_recipes.py": ("recipes", {"transitions", "full", "fewshot", "settings"}),
    "bench_audit.py": ("audit", {"figures", "runs"}),
    "bench_setup.py": ("setup", {"bird225 (pre-split)", "caltech (one folder, split)"}),
    "bench_gpu.py": ("gpu", {"train", "extraction", "folder", "auto_batch", "device", "precision", "peak_tflops"}),
    "bench_checkpoint.py": ("checkpoint", {"layouts", "target"}),
    "bench_extract_memory.py": ("extract_memory", {"variants", "target"}),
    "bench_loader.py": ("loader", None),
    "bench_split.py": ("split", None),
    "bench_multilabel.py": ("multilabel", {"defaults (spinal)", "defaults (linear)", "plain BCE loop"}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy shared machine, tiny steps on two threads crawl (each waits for the other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits sample, written once for the scripts that take ``--digits``."""
    from finetune.data import write_digits

    return write_digits(tmp_path_factory.mktemp("bench") / "digits")


def load_script(name: str):
    if str(BENCH_DIR) not in sys.path:  # the scripts import their sibling _common, as when run directly
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", BENCH_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tiny(script: str, out: Path, *extra: str) -> dict:
    load_script(script).main(["--tiny", "--out", str(out), *extra])
    name = SCRIPTS[script][0]
    doc = json.loads(load_script("_common.py").result_path(out, name).read_text())
    assert doc["name"] == name and doc["tiny"] is True
    assert {"title", "command", "machine", "settings", "summary", "tables", "results"} <= set(doc)
    assert doc["summary"] and doc["tables"] and all(t["rows"] for t in doc["tables"])
    assert {"cpu", "logical_cores", "torch", "timm", "gpu"} <= set(doc["machine"])
    text = (out / "RESULTS.md").read_text()
    assert doc["title"] in text and "Tiny smoke setting" in text
    return doc


def test_step(tmp_path):
    doc = run_tiny("bench_step.py", tmp_path)
    full = doc["results"]["full_model"]
    assert {"images_per_s", "ratio", "noise_floor_ratio", "overhead_ms_per_step"} <= set(full)
    assert set(full["images_per_s"]) == {"finetune", "plain", "plain (again)"}
    assert full["ratio"]["median"] > 0 and full["noise_floor_ratio"]["median"] > 0


def test_feature_cache(tmp_path, digits):
    doc = run_tiny("bench_feature_cache.py", tmp_path, "--digits", str(digits))
    results = doc["results"]
    assert set(results["variants"]) == {"uncached", "cached, views=2", "cached, views=0"}
    for name, variant in results["variants"].items():
        assert 0 <= variant["final_val_acc"][0] <= 1 and variant["ms_per_step"] > 0
        assert (variant["extraction_s"] > 0) == (name != "uncached")
    for speedup in results["speedups"].values():
        assert {"train_pass", "epoch_wall", "stage_total"} <= set(speedup)


def test_data(tmp_path, digits):
    doc = run_tiny("bench_data.py", tmp_path, "--digits", str(digits))
    assert len(doc["results"]) == 3
    for case in doc["results"].values():
        assert set(case["images_per_s"]) == {"finetune", "torchvision (PIL)", "torchvision v2 (tensor)"}
        assert case["ratio_vs_torchvision_pil"]["median"] > 0


@pytest.mark.slow
def test_loader(tmp_path):
    doc = run_tiny("bench_loader.py", tmp_path)
    assert len(doc["results"]) == 2  # the Bird-like and the Caltech-like folder, one worker each
    for case in doc["results"].values():
        assert {"finetune, files", "finetune, store (raw)", "finetune, store (JPEG q95)", "timm create_loader",
                "torchvision ImageFolder + v2"} <= set(case["images_per_s"])
        sent = case["bytes_per_image_to_device"]
        assert sent["finetune, store (raw)"] == sent["finetune, files"] == 3 * 224 * 224  # uint8 to the device
        assert sent["torchvision ImageFolder + v2"] == 4 * 3 * 224 * 224  # float32
        assert case["ratio_store_vs_files"]["median"] > 0 and case["store_build_s"]["raw"] >= 0
        assert "finetune, store (raw), no buffer pool" in case["images_per_s"] and case["ratio_pool"]["median"] > 0


@pytest.mark.slow
def test_split(tmp_path):
    doc = run_tiny("bench_split.py", tmp_path)
    for kind in ("look-alike", "distinct"):
        case = doc["results"][kind]
        assert case["images"] == 18 and case["first_s"]["median"] > 0 and case["second_s"]["median"] > 0
    assert doc["results"]["import_s"]["median"] > 0


@pytest.mark.slow
def test_multilabel(tmp_path):
    doc = run_tiny("bench_multilabel.py", tmp_path)
    results = doc["results"]
    assert SCRIPTS["bench_multilabel.py"][1] <= set(results)
    for arm in results.values():
        assert 0 <= arm["test_map"] <= 1 and arm["wall_s"] > 0
    assert len(results["defaults (spinal)"]["thresholds"]) == 10
    assert 0 <= results["defaults (spinal)"]["micro_f1_at_0.5"] <= 1


def test_decode(tmp_path, digits):
    doc = run_tiny("bench_decode.py", tmp_path, "--digits", str(digits))
    formats = {case["format"] for case in doc["results"].values()}
    assert formats == {"JPEG", "PNG"}
    for case in doc["results"].values():
        assert set(case["ms_per_image"]) == {"Pillow", "OpenCV", "finetune decode_image"}
        assert case["pillow_over_opencv"]["median"] > 0 and case["finetune_over_opencv"]["median"] > 0
    # lossless PNG decodes identically with either library
    assert all(c["max_abs_pixel_difference"] == 0 for c in doc["results"].values() if c["format"] == "PNG")


def test_setup(tmp_path):
    doc = run_tiny("bench_setup.py", tmp_path)
    for variant in doc["results"].values():
        assert variant["images"] > 0 and variant["first_s"][0] > 0 and variant["second_s"][0] > 0


def test_heads(tmp_path):
    doc = run_tiny("bench_heads.py", tmp_path)
    results = doc["results"]
    assert SCRIPTS["bench_heads.py"][1] <= set(results)
    for head in results.values():
        assert head["head_params"] > 0 and 0 < head["head_flops"] < head["model_flops"]
        assert head["full_step_ms"]["median"] > 0 and head["head_step_ms"]["median"] > 0
    assert results["linear"]["head_params"] < results["spinal (default: 4x1024, p 0.5)"]["head_params"]


@pytest.mark.slow
def test_quickstart(tmp_path):
    doc = run_tiny("bench_quickstart.py", tmp_path)
    results = doc["results"]
    assert results["wall_s"] > 0 and 0 <= results["test_accuracy"] <= 1
    assert set(results["stages"]) == {"0", "1", "2"} and len(results["epochs"]) == 3
    phases = results["phases"]
    parts = ["start-up and setup", *(f"{n}: whole stage" for n in ("head (cached)", "top (last:3)", "all")),
             "finish (calibration, test evaluation, report)"]
    assert all(phases[p] > 0 for p in parts)
    assert phases["whole run"] == results["wall_s"] and sum(phases[p] for p in parts) == pytest.approx(results["wall_s"])
    assert phases["head (cached): feature extraction"] == results["feature_extraction_s"] > 0


def test_quickstart_phases_split_the_wall_time_at_the_log_lines():
    bench = load_script("bench_quickstart.py")
    lines = [(5.0, "quickstart: tf_efficientnet_lite0 + spinal head, 10 classes, ..."),
             (6.0, "stage 0 (head): 2 epochs, training head (1,000 parameters)"),
             (9.0, "cached backbone features in 2.5s (/cache/x)"),
             (10.0, "stage 0 (head), epoch 1: train loss 1.0 acc 0.5 | val loss 1.0 acc 0.5 macro-F1 0.5 | 9 img/s"),
             (11.0, "stage 0 (head), epoch 2: train loss 1.0 acc 0.5 | val loss 1.0 acc 0.5 macro-F1 0.5 | 9 img/s | best"),
             (12.0, "stage 1 (top): 1 epochs, training last:3 (2,000 parameters)"),
             (20.0, "stage 1 (top), epoch 1: train loss 1.0 acc 0.5 | val loss 1.0 acc 0.5 macro-F1 0.5 | 9 img/s"),
             (29.0, "best epoch 3 ...")]
    stages = {"0": {"train_pass_s": 1.5}, "1": {"train_pass_s": 7.0}}
    phases = bench.phases(lines, stages, 2.5, wall=30.0)
    assert phases == {
        "start-up and setup": 6.0,
        "head (cached): whole stage": 6.0, "head (cached): training passes": 1.5,
        "head (cached): feature extraction": 2.5, "head (cached): validation, checkpoints, logs": 2.0,
        "top (last:3): whole stage": 8.0, "top (last:3): training passes": 7.0,
        "top (last:3): validation, checkpoints, logs": 1.0,
        "finish (calibration, test evaluation, report)": 10.0, "whole run": 30.0}


def test_head_accuracy(tmp_path, digits):
    doc = run_tiny("bench_head_accuracy.py", tmp_path, "--digits", str(digits))
    runs = doc["results"]["runs"]
    assert [r["seed"] for r in runs["spinal"]] == [r["seed"] for r in runs["linear"]] == [0, 1]
    assert {"mean", "std"} <= set(doc["results"]["difference"])
    assert all(r["test_images"] == runs["spinal"][0]["test_images"] for r in runs["spinal"] + runs["linear"])
    assert f"test split of {runs['spinal'][0]['test_images']} images" in doc["tables"][0]["caption"]


def test_head_accuracy_few_shot_trains_on_n_images_per_class_in_its_own_section(tmp_path, digits, monkeypatch):
    """--train-per-class N writes head_accuracy_fewshot (the full-data section stays) and each run trains on N
    images of each class, the rest beyond val being the test split the table states."""
    import finetune.training.runner as runner
    from finetune.data import Manifest

    sizes = []
    real = runner.run_training

    def spy(cfg, raw, **kw):
        summary = real(cfg, raw, **kw)
        counts = Manifest.read_csv(Path(kw["run_dir"]) / "manifest.csv").counts()
        sizes.append((set(counts["train"].values()), sum(counts["test"].values()), summary["test"]["num_samples"]))
        return summary

    monkeypatch.setattr(runner, "run_training", spy)
    bench = load_script("bench_head_accuracy.py")
    bench.main(["--tiny", "--out", str(tmp_path), "--digits", str(digits), "--train-per-class", "3"])
    doc = json.loads((tmp_path / "results" / "head_accuracy_fewshot.json").read_text())
    assert doc["settings"]["train_per_class"] == 3 and "3 training images per class" in doc["title"]
    assert len(sizes) == 4  # 2 seeds x 2 heads
    test_images = doc["results"]["runs"]["spinal"][0]["test_images"]
    assert all(size == ({3}, test_images, test_images) for size in sizes), sizes
    assert "3 training images per class" in (tmp_path / "RESULTS.md").read_text()


def test_results_md_keeps_every_section(tmp_path, digits):
    """Each script replaces only its own section of RESULTS.md."""
    run_tiny("bench_heads.py", tmp_path)
    run_tiny("bench_decode.py", tmp_path, "--digits", str(digits))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Heads: spinal vs linear vs MLP" in text and "Decoding: Pillow vs OpenCV" in text
    assert "No GPU was available" in text or "GPU: none" not in text


def test_audit(tmp_path):
    doc = run_tiny("bench_audit.py", tmp_path)
    figures = doc["results"]["figures"]
    assert 0 <= figures["label_precision_at_k"] <= 1 and 0 <= figures["duplicate_recall"] <= 1
    assert doc["results"]["runs"]["cached"]["features_cached"] is True
    assert doc["results"]["runs"]["extract"]["features_cached"] is False


def test_gpu_bench_runs_on_the_cpu_when_tiny(tmp_path):
    doc = run_tiny("bench_gpu.py", tmp_path, "--device", "cpu")
    results = doc["results"]
    assert results["device"] == "CPU" and results["precision"] == "fp32" and results["peak_tflops"] is None
    train = results["train"]["test_resnet"]
    assert set(train["images_per_s"]) == {"finetune", "plain", "plain (again)"}
    assert all(v["median"] > 0 for v in train["images_per_s"].values()) and train["ratio"]["median"] > 0
    assert train["train_gflops_per_image"] > 0 and train["achieved_tflops"] > 0 and train["mfu"] is None
    extraction = results["extraction"]
    assert extraction["images"] > 0
    assert set(extraction["fraction_of_forward"]) == {"from JPEGs, CPU decode", "from JPEGs, device decode",
                                                      "from the pixel store"}
    assert all(v["median"] > 0 for v in extraction["fraction_of_forward"].values())
    assert all(v["median"] > 0 for v in extraction["images_per_s"].values())
    folder = results["folder"]["test_resnet"]
    assert set(folder["fraction_of_synthetic"]) == {"from JPEG files", "from the pixel store"}
    auto = results["auto_batch"]  # on the CPU: the search against the fake limit, then three steps at its result
    assert auto["fake_limit"] == 24 and auto["total_memory_bytes"] is None
    assert {stage: r["batch"] for stage, r in auto["stages"].items()} == {"head (cached features)": 24, "all": 24}
    assert all(r["steps_ok"] for r in auto["stages"].values())
    assert all(v["median"] > 0 for v in folder["images_per_s"].values()) and folder["steps"] == 2


def test_gpu_bench_knows_the_peaks_and_timm_figures_it_compares_with():
    bench = load_script("bench_gpu.py")
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0 and bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("Tesla T4") == 65.0 and bench.peak_tflops("NVIDIA L40S") == 362.0
    assert bench.peak_tflops("some future card") is None
    assert set(bench.TIMM_PUBLISHED) == set(bench.MODELS)
    # GFLOP per training image of resnet50 at 224 px: 3 x its 4.1 GMAC forward
    import torch
    from finetune.models import create_model

    model = create_model("resnet50", 1000, head="linear", pretrained=False)
    gflops = bench.train_flops_per_image(model, 224, torch.device("cpu"), None) / 1e9
    assert 24 < gflops < 25.5


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory):
    """A tiny benchmark folder (make_dataset.py): 4 Bird classes, planted bad files included."""
    make_dataset = load_script("make_dataset.py")
    dest = tmp_path_factory.mktemp("bench-folder") / "data"
    doc = make_dataset.generate(dest, classes=4, per_class=3, eval_per_class=1, caltech_classes=3,
                                caltech_per_class=4, specials=1, workers=1)
    return dest, doc


def test_checkpoint(tmp_path, bench_folder):
    dest, made = bench_folder
    doc = run_tiny("bench_checkpoint.py", tmp_path, "--dataset", str(dest))
    layouts = doc["results"]["layouts"]
    assert set(layouts) == {"whole model", "what changed"}
    assert all(v["checkpoint_s"] > 0 and 0 < v["share_of_epoch"] < 1 for v in layouts.values())
    # the epoch trains on as many rows as the benchmark folder's usable training images
    bird = made["variants"]["bird225"]
    assert (doc["settings"]["features"], doc["settings"]["classes"]) == (bird["images"]["train"], bird["classes"])


def test_extract_memory_samples_every_class_and_no_planted_bad_file(bench_folder):
    dest, made = bench_folder
    bench = load_script("bench_extract_memory.py")
    bad = {(dest / "bird225" / b["path"]).resolve() for b in made["variants"]["bird225"]["bad_files"]}
    photos = bench.sample_photos(dest / "bird225" / "train", 8)
    assert len(photos) == 8 and {label for _, label in photos} == {0, 1, 2, 3}
    assert not bad & {path.resolve() for path, _ in photos}
    assert bench.sample_photos(dest / "bird225" / "train", 8) == photos  # seeded
    everything = bench.sample_photos(dest / "bird225" / "train", 10_000)
    assert len(everything) == made["variants"]["bird225"]["images"]["train"]


def test_extract_memory(tmp_path):
    """Benchmark-folder photos (a tiny one, written by the script) through a timm backbone."""
    doc = run_tiny("bench_extract_memory.py", tmp_path)
    from finetune.models import create_model

    width = create_model("test_resnet", 2, head="linear", pretrained=False).num_features
    assert doc["settings"]["backbone"] == "test_resnet" and doc["settings"]["width"] == width
    n = doc["settings"]["images"]
    assert n == 24
    rows = n * 4 // 5 * 2 + (n - n * 4 // 5)  # two train views of 4/5 of the photos, one val view
    assert set(doc["results"]["variants"]) == {"streamed", "in RAM"}
    for variant in doc["results"]["variants"].values():
        # both variants wrote the same float16 cache: rows x width x 2 bytes plus the two .npy headers
        assert rows * width * 2 < variant["cache_mb"] * 2**20 <= rows * width * 2 + 2 * 256
        assert all(run["peak_mb"] >= run["warm_peak_mb"] > 0 for run in variant["runs"])



def test_extract_memory_child_takes_a_spec_longer_than_one_argument_may_be(tmp_path):
    """The photos' paths reach the child on stdin: as one argument, 6,000 benchmark-folder photos failed with
    'Argument list too long' (one argument may hold 128 KiB)."""
    from PIL import Image

    bench = load_script("bench_extract_memory.py")
    folder = tmp_path / ("x" * 200)
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (60 * i, 90, 120)).save(folder / f"{i}.png")
    photos = [(str(folder / f"{i % 2}.png"), i % 2) for i in range(700)]  # ~150 KB of JSON
    spec = {"backbone": "test_resnet", "input_size": 16, "photos": photos, "cache": str(tmp_path / "cache")}
    assert len(json.dumps(spec)) > 128 * 1024
    result = bench.run_child("streamed", spec)
    assert result["cache_mb"] > 0 and result["width"] > 0

def test_recipes(tmp_path, digits):
    records = tmp_path / "records"
    doc = run_tiny("bench_recipes.py", tmp_path, "--digits", str(digits), "--records", str(records))
    results = doc["results"]
    # every record names the commit it ran on; one report gathers them and names the commits apart from its own
    code = load_script("_common.py").START_CODE
    assert {json.loads(p.read_text())["code"]["commit"] for p in records.glob("*.json")} == {code["commit"]}
    assert list(results["commits"]) == [code["commit"] + ("+uncommitted" if code["dirty"] else "")]
    old = records / "quickstart-0.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "code": {"commit": "0ld0ld0", "dirty": False}}))
    load_script("bench_recipes.py").main(["--tiny", "--report", "--records", str(records), "--out", str(tmp_path / "r")])
    summary = json.loads(load_script("_common.py").result_path(tmp_path / "r", "recipes").read_text())["summary"]
    assert any("other commits" in line and "0ld0ld0: quickstart 0" in line for line in summary), summary
    assert SCRIPTS["bench_recipes.py"][1] <= set(results)
    # one epoch per stage: every transition checked (the defaults' head -> all, the quickstart's head -> top -> all)
    for arm, stages in (("defaults", [1]), ("quickstart", [1, 2])):
        (run,) = results["transitions"][arm].values()
        assert [t["stage"] for t in run["transitions"]] == stages
        assert all({"first_ok", "end_ok", "first_epoch_change"} <= set(t) for t in run["transitions"])
    assert set(results["full"]) == {"defaults", "plain"}
    assert set(results["fewshot"]) == {"fewshot spinal", "fewshot plain"}  # --tiny: the spinal head only
    plain = results["full"]["plain"]["runs"][0]
    assert plain["epochs_trained"] >= 1 and 0 <= plain["test_accuracy"] <= 1


def _fake_measurement(fp32_ms: float, ms: dict, accuracy: dict, linear: bool) -> dict:
    """What bench_export's measure returns, with the figures given: latency per backend at batch 2, accuracy per
    model (the checkpoint's and each export's)."""
    rows = [{"backend": "onnxruntime fp32", "batch": 2, "status": "ok",
             "latency_ms": {"median": fp32_ms, "p90": fp32_ms * 1.1}, "images_per_s": 2000 / fp32_ms}]
    rows += [{"backend": b, "batch": 2, "status": "ok", "latency_ms": {"median": m, "p90": m * 1.1},
              "images_per_s": 2000 / m} for b, m in ms.items()]
    hub = ["hub folder (finetune.load)", *(["hub folder (plain timm)"] if linear else [])]
    return {"checkpoint": "ckpt", "backbone": "test_resnet", "head": "linear" if linear else "spinal", "input_px": 32,
            "test_images": 20, "accuracy": accuracy, "agreement": {n: 1.0 for n in accuracy},
            "sizes_mb": {n: 1.0 for n in accuracy}, "export_seconds": {n: 1.0 for n in accuracy},
            "quantization": {"onnxruntime int8 static": {"fp32_groups": ["stem"] if linear else []}},
            "hub": {"linear_head": linear, "max_abs_logit_difference": {n: 0.0 for n in hub},
                    "test_predictions_equal": {n: True for n in hub}},
            "benchmark": {"rows": rows, "aa_ratio": {"cpu/2": 1.05}}}


def test_export_reports_the_ratios_and_accuracies_it_measured_with_verdicts_against_the_a_a_spread(tmp_path,
                                                                                                   monkeypatch):
    """bench_export's report from its measurements (the exports themselves are tested in tests/evaluation, and a
    --tiny run costs a minute of exports): every figure printed is one measured, nothing typed into the script."""
    script = load_script("bench_export.py")
    names = ("pytorch (checkpoint)", "onnxruntime fp32", "onnxruntime int8", "onnxruntime int8 static",
             "openvino fp32", "openvino int8", "openvino int8 qat", "hub folder (finetune.load)")
    measured = {
        # static 2.00x within budget: meets (the A/A spread 0.05 allows it); OpenVINO 0.80x: too slow; QAT 1.52x:
        # inside the spread of the 1.5x goal; dynamic 2.50x but 3 points lost
        "quickstart": _fake_measurement(10.0, {"onnxruntime int8": 4.0, "onnxruntime int8 static": 5.0,
                                               "openvino int8": 12.5, "openvino int8 qat": 10 / 1.52},
                                        dict(zip(names, (0.95, 0.95, 0.92, 0.945, 0.95, 0.95, 0.95, 0.95))), False),
        "resnet18 digits": _fake_measurement(8.0, {"onnxruntime int8": 8.0, "onnxruntime int8 static": 2.0,
                                                   "openvino int8": 4.0, "openvino int8 qat": 4.0},
                                             {**dict(zip(names, (0.9, 0.9, 0.9, 0.895, 0.9, 0.9, 0.9, 0.9))),
                                              "hub folder (plain timm)": 0.9}, True),
    }
    trained = []
    monkeypatch.setattr(script, "train", lambda raw, run_dir, cache: trained.append(raw) or run_dir)
    monkeypatch.setattr(script, "measure", lambda run, *a, **k: measured[
        "quickstart" if Path(run).name == "quickstart" else "resnet18 digits"])
    script.main(["--tiny", "--out", str(tmp_path)])
    doc = json.loads(load_script("_common.py").result_path(tmp_path, "export").read_text())
    assert [r["model"]["backbone"] for r in trained] == ["test_resnet", "test_resnet"]  # --tiny: both trained
    quick, resnet = (line for line in doc["summary"] if "hub folder:" not in line)
    assert "fp32 accuracy 0.9500), batch 2 vs ONNX Runtime fp32 (A/A ratio 1.05, one run)" in quick
    assert "ONNX Runtime static int8 (fp32 groups: none) 2.00x, accuracy 0.9450 (-0.5 points): meets" in quick
    assert "OpenVINO int8 (NNCF accuracy control) 0.80x, accuracy 0.9500 (+0.0 points): misses (too slow)" in quick
    assert "(quantisation-aware, 2 epochs) 1.52x, accuracy 0.9500 (+0.0 points): within the A/A spread" in quick
    assert "ONNX Runtime dynamic int8 2.50x, accuracy 0.9200 (-3.0 points): misses (loses 3.0 points)" in quick
    assert "ONNX Runtime static int8 (fp32 groups: stem) 4.00x, accuracy 0.8950 (-0.5 points): meets" in resnet
    assert "ONNX Runtime dynamic int8 1.00x" in resnet and "misses (too slow)" in resnet
    hub = [line for line in doc["summary"] if "hub folder:" in line]
    assert "hub folder (plain timm) 0" in hub[1] and "plain timm" not in hub[0]
    latency = {t["caption"].split(":")[0]: t for t in doc["tables"] if "latency" in t["caption"]}
    static = next(row for row in latency["resnet18 digits"]["rows"] if row[0] == "onnxruntime int8 static")
    assert static[2] == 2.0 and static[5] == pytest.approx(4.0)
    assert any("qat" in note and "--qat 2" in note for note in doc["notes"])


def test_results_md_is_what_render_results_makes_of_the_committed_json():
    """RESULTS.md is generated: a hand edit, or a JSON changed without regenerating it, fails here."""
    common = load_script("_common.py")
    assert (BENCH_DIR / "RESULTS.md").read_text() == common.render_results(BENCH_DIR, write=False)


def _literals(source: str) -> list[str]:
    """The text a script can write: its string constants and the literal parts of its f-strings, longest
    first (pieces under 8 characters left out: removing ``"the "`` from a note would hide what it says)."""
    import ast

    pieces = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            pieces.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            pieces.update(v.value for v in node.values if isinstance(v, ast.Constant))
    return sorted((p for p in pieces if len(p) >= 8), key=len, reverse=True)


def _unscripted(text: str, literals: list[str]) -> Optional[str]:
    """What of ``text`` reads as prose no literal of the script holds: after cutting out every literal,
    a remainder with three words in a row (formatted values are numbers, names, at most two words), else None."""
    import re

    for piece in literals:
        text = text.replace(piece, "\0")
    for rest in text.split("\0"):
        if re.search(r"[A-Za-z]{2,}( [a-z']{2,}){2,}", rest):
            return rest
    return None


def test_every_line_of_a_result_is_text_its_script_writes():
    """A note, summary line or table caption in results/ that no script writes (a hand edit) fails here: each
    must be cut from the literals of the script its ``command`` names, formatted values aside (today's script,
    or the script at the commit the result records, for a result older than a rewording)."""
    common = load_script("_common.py")
    shared = _literals((BENCH_DIR / "_common.py").read_text())
    # the rule can fail: a sentence typed into a note is caught, the script's own note is not
    own = _literals((BENCH_DIR / "bench_checkpoint.py").read_text())
    assert _unscripted("The disk is the shared machine's; fsync times vary with other writers, so the share is "
                       "the claim.", own) is None
    assert _unscripted("Before that change, the same photos (commit c1260dc): streamed 1.21x.", own)
    paths = sorted((BENCH_DIR / "results").glob("*.json")) + sorted((BENCH_DIR / "results").glob("*/*.json"))
    assert common.result_path(BENCH_DIR, "gpu") in paths and len(paths) >= 15
    bad, unverifiable = [], []
    for path in paths:
        doc = json.loads(path.read_text())
        script = doc["command"].split()[1]
        literals = _literals((BENCH_DIR.parent / script).read_text()) + shared
        then = None  # the script at the commit measured, read only where today's has no such text
        for kind, lines in (("notes", doc["notes"]), ("summary", doc["summary"]),
                            ("caption", [t.get("caption") or "" for t in doc["tables"]])):
            for line in lines:
                if not (rest := _unscripted(line, literals)):
                    continue
                then = then if then is not None else _script_at(doc["code"]["commit"], script)
                where = f"{path.name} {kind}: ...{rest.strip()[:80]}..."
                if then == "":
                    unverifiable.append(where)
                elif _unscripted(line, _literals(then) + shared):
                    bad.append(where)
    assert not bad, "\n".join(bad)
    if unverifiable:  # a shallow clone: the older script is not here to read
        warnings.warn("not in today's scripts, and their commit is not in this clone: " + "; ".join(unverifiable))


def _script_at(commit: Optional[str], script: str) -> str:
    """``script``'s text at ``commit``, or "" where this clone doesn't have it (a shallow clone, no git)."""
    import subprocess

    try:
        return subprocess.run(["git", "show", f"{commit}:{script}"], cwd=BENCH_DIR.parent, capture_output=True,
                              text=True, check=True).stdout if commit else ""
    except (OSError, subprocess.CalledProcessError):
        return ""
