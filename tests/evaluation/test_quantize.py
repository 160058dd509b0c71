"""int8 ONNX export (onnxruntime's dynamic and static quantisation), `finetune eval MODEL.onnx` with its
accuracy delta against the fp32 checkpoint, and `finetune benchmark`."""
import json

import numpy as np
import pytest
import torch

from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.deploy.export import export_model
from finetune.deploy.onnx import OnnxModel, metadata_path, read_onnx_info

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


# session-scoped: the slow tests run first, so a module fixture would be built again for the others
@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """24 noisy one-colour images, 8 per class: calibration and evaluation data."""
    from tests.evaluation.conftest import COLOURS, write_images

    return write_images(tmp_path_factory.mktemp("images") / "images",
                        {name: [colour] * 8 for name, colour in COLOURS.items()})


@pytest.fixture(scope="session")
def exported(checkpoint, images, tmp_path_factory):
    """The checkpoint as fp32 ONNX, int8 dynamic (the API, from the checkpoint) and int8 static (the CLI,
    quantising the fp32 export with 12 calibration images)."""
    out = tmp_path_factory.mktemp("onnx")
    fp32 = export_model(checkpoint, format="onnx", out=out / "model.onnx")
    dynamic = export_model(checkpoint, format="onnx", quantize="int8", out=out / "model.int8.onnx")
    assert main(["export", str(fp32), "--format", "onnx", "--quantize", "int8", "--calibration", "12",
                 "--data", str(images), "--out", str(out / "static.onnx")]) == 0
    return {"fp32": fp32, "dynamic": dynamic, "static": out / "static.onnx"}


def int8_weights(path) -> int:
    model = onnx.load(str(path))
    return sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_export_is_smaller_int8_and_predicts_like_fp32(exported, images, preprocessing, kind):
    from finetune.data.transforms import preprocessing_transform

    fp32, int8 = exported["fp32"], exported[kind]
    # dynamic: the head's linear layers in int8; static: the convolutions too
    assert int8.stat().st_size < (0.6 if kind == "static" else 1.0) * fp32.stat().st_size
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    expected = {"MatMulInteger", "DynamicQuantizeLinear"} if kind == "dynamic" else {"QuantizeLinear", "DequantizeLinear"}
    assert expected <= ops and int8_weights(int8) >= (3 if kind == "dynamic" else 20) and int8_weights(fp32) == 0, ops
    info = read_onnx_info(int8)  # from the model's own metadata
    assert info["classes"] == ["cat", "dog", "fox"] and info["preprocessing"]["input_size"] == [3, 32, 32]
    assert info["quantization"]["method"] == kind
    # static: --calibration 12 of the 18 train images would leave 6 to judge on; a small split is halved instead
    assert info["quantization"]["calibration_images"] == (9 if kind == "static" else 0)
    if kind == "static":
        assert info["quantization"]["validation_images"] == 9 and info["quantization"]["fp32_groups"] == []
    assert json.loads(metadata_path(int8).read_text()) == info

    transform = preprocessing_transform(preprocessing)
    from finetune.data import load_image

    batch = torch.stack([transform(image=load_image(p))["image"] for p in sorted(images.rglob("*.png"))])
    reference, quantized = OnnxModel(fp32)(batch).softmax(1), OnnxModel(int8)(batch).softmax(1)
    assert not torch.equal(reference, quantized)  # it did change the arithmetic
    assert (reference.argmax(1) == quantized.argmax(1)).float().mean() >= 0.8
    assert (reference - quantized).abs().max() < 0.15


def test_eval_of_an_onnx_model_reports_its_own_accuracy_and_the_delta_to_fp32(exported, images, checkpoint, tmp_path,
                                                                            capsys):
    from finetune.inference.predictor import load

    out = tmp_path / "eval"
    assert main(["eval", str(exported["static"]), "--data", str(images), "--split", "all", "--num-workers", "0",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    paths = sorted(images.rglob("*.png"))
    truth = np.array([["cat", "dog", "fox"].index(p.parent.name) for p in paths])

    from finetune.data import load_image
    from finetune.data.transforms import preprocessing_transform

    transform = preprocessing_transform(read_onnx_info(exported["static"])["preprocessing"])
    batch = np.stack([transform(image=load_image(p))["image"].numpy() for p in paths])
    session = ort.InferenceSession(str(exported["static"]), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch})
    assert metrics["num_samples"] == 24
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == truth).mean()))

    fp32 = [["cat", "dog", "fox"].index(p.label) for p in load(checkpoint).predict(paths)]
    reference = metrics["reference"]
    assert reference["checkpoint"] == str(checkpoint)  # found from the export's metadata
    assert reference["accuracy"] == pytest.approx(float((np.array(fp32) == truth).mean()))
    assert reference["accuracy_delta"] == pytest.approx(metrics["accuracy"] - reference["accuracy"])
    assert f"delta {reference['accuracy_delta']:+.4f}" in capsys.readouterr().out


def test_quantize_options_are_checked(checkpoint, tmp_path, capsys):
    with pytest.raises(FinetuneError, match="needs --format onnx"):
        export_model(checkpoint, format="torchscript", quantize="int8", out=tmp_path / "m.pt")
    assert main(["export", str(checkpoint), "--format", "onnx", "--calibration", "4"]) == 2
    assert "add --quantize int8" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "int8", "--calibration", "4"]) == 2
    assert "give --data" in capsys.readouterr().err  # the checkpoint records no data to calibrate on


@pytest.mark.slow  # torch.compile builds C++ kernels: about 30 s of CPU
def test_benchmark_times_every_backend_and_writes_json(exported, tmp_path, capsys):
    """From the .onnx exports: their source checkpoint gives the PyTorch rows."""
    out = tmp_path / "bench.json"
    assert main(["benchmark", str(exported["fp32"]), str(exported["dynamic"]), "--batch", "2", "--iterations", "3",
                 "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["backend"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(b, n) for b in ("pytorch eager", "pytorch compiled", "onnxruntime fp32",
                                          "onnxruntime int8") for n in (2,)}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert 0 < row["latency_ms"]["median"] <= row["latency_ms"]["p90"] and row["images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["batch"] * 1000 / row["latency_ms"]["median"])
    assert set(result["int8_speedup"]) == {"cpu/2"} and result["threads"] == 1
    assert result["checkpoint"] == read_onnx_info(exported["fp32"])["source_checkpoint"]
    table = capsys.readouterr().out
    assert "pytorch compiled" in table and "int8 speed-up over ONNX Runtime fp32 (cpu, batch 2)" in table


def test_sensitivity_search_keeps_in_fp32_the_group_whose_quantisation_is_made_to_hurt():
    from finetune.deploy.sensitivity import search_fp32_groups

    cost = {"stem": 0.004, "depthwise": 0.05, "head": 0.0, "blocks 1/2": 0.002, "blocks 2/2": 0.0}
    asked = []

    def agreement(kept):  # a fake evaluation: each quantised group costs its share of the score
        asked.append(set(kept))
        return 1.0 - sum(c for g, c in cost.items() if g not in kept)

    kept, reached, trace = search_fp32_groups(cost, agreement, max_drop=0.01)
    assert kept == ["depthwise"] and reached == pytest.approx(1.0 - 0.006)
    # all int8 first, then each group alone back in fp32, then the greedy additions (one: depthwise was measured)
    assert asked[0] == set() and asked[1:6] == [{g} for g in cost] and len(asked) == 6
    assert [t["fp32_groups"] for t in trace] == [[], *[[g] for g in cost]]
    # a tighter budget needs the next most costly group too
    kept, reached, _ = search_fp32_groups(cost, agreement, max_drop=0.005)
    assert kept == ["depthwise", "stem"] and reached == pytest.approx(1.0 - 0.002)


def test_sensitivity_search_stops_at_all_int8_when_within_budget_and_fails_in_one_line_when_never():
    from finetune.deploy.sensitivity import search_fp32_groups

    calls = []
    kept, reached, trace = search_fp32_groups(["stem", "head"], lambda kept: calls.append(kept) or 0.995, 0.01)
    assert (kept, reached, len(calls)) == ([], 0.995, 1)
    with pytest.raises(FinetuneError, match=r"every\s+layer group \(stem, head\) in fp32, over --max-drop 0.01") as e:
        search_fp32_groups(["stem", "head"], lambda kept: 0.9, 0.01)
    assert "\n" not in str(e.value)


def test_a_decision_is_kept_with_margin_only_when_twice_the_largest_error_is_below_its_margin():
    from finetune.deploy.sensitivity import agreement, decisions, kept_with_margin

    reference = np.array([[3.0, 0.0, 0.0],    # margin 3
                          [1.0, 0.0, 0.2],    # margin 0.8
                          [0.0, 2.0, 1.9],    # margin 0.1
                          [0.0, 0.0, 5.0]])   # margin 5
    error = np.array([[0.5, -0.5, 0.0],   # 2 x 0.5 < 3: kept
                      [-0.3, 0.1, 0.1],   # 2 x 0.3 < 0.8: kept
                      [0.0, 0.0, 0.06],   # same top-1, but 2 x 0.06 > 0.1: not kept
                      [0.0, 2.6, 0.0]])   # 2 x 2.6 > 5, same top-1: not kept
    got = reference + error
    assert agreement(decisions(got, {}), decisions(reference, {})) == 1.0  # plain agreement sees nothing
    assert kept_with_margin(got, reference, {}) == 0.5
    assert kept_with_margin(reference, reference, {}) == 1.0
    # multi-label: plain agreement over (image, label) decisions, each at its label's threshold
    info = {"task": "multilabel", "thresholds": [0.5, 0.3]}
    probs = np.array([[0.9, 0.31], [0.6, 0.1]])
    moved = probs + np.array([[-0.05, -0.02], [0.0, 0.25]])  # (0, 1) falls under its threshold, (1, 1) rises over
    assert kept_with_margin(moved, probs, info) == agreement(decisions(moved, info), decisions(probs, info)) == 0.5


def test_the_search_returns_a_group_to_fp32_where_int8_agrees_on_every_image_but_eats_its_margins():
    """The quickstart bug: the fully int8 model agreed with fp32 on every (fit) train image of the search, and lost
    2.6 points on test; judged by margins the search keeps the group whose int8 error eats them."""
    from finetune.deploy.sensitivity import agreement, decisions, kept_with_margin, search_fp32_groups

    n = 200
    top = np.arange(n) % 10
    reference = np.zeros((n, 10))
    reference[np.arange(n), top] = 4.0  # fit images: margin 4 ...
    reference[np.arange(10), (top[:10] + 1) % 10] = 3.0  # ... and 1 on 5% of them
    error = {"stem": np.zeros((n, 10)), "head": np.full((n, 10), 0.01)}  # what each group adds while int8
    error["stem"][np.arange(n), (top + 5) % 10] = 0.6  # lifts a third class: a margin under 1.2 is eaten, none flips

    def output(kept):
        return reference + sum(e for g, e in error.items() if g not in kept)

    int8 = output(frozenset())
    assert agreement(decisions(int8, {}), decisions(reference, {})) == 1.0  # the old measure: nothing lost
    assert kept_with_margin(int8, reference, {}) == pytest.approx(0.95)
    kept, reached, _ = search_fp32_groups(error, lambda kept: kept_with_margin(output(kept), reference, {}), 0.01)
    assert kept == ["stem"] and reached == 1.0


def test_layer_groups_of_an_efficientnet_export_find_stem_depthwise_and_head(exported):
    from onnxruntime.quantization import quant_pre_process

    from finetune.deploy.sensitivity import layer_groups

    prepared = exported["fp32"].with_name("prepared-for-groups.onnx")
    quant_pre_process(str(exported["fp32"]), str(prepared))
    graph = onnx.load(str(prepared)).graph
    groups = layer_groups(graph)
    nodes = {n.name: n for n in graph.node}
    assert {"stem", "depthwise", "head", "blocks 1/4"} <= set(groups), groups
    members = [name for g in groups.values() for name in g]
    assert len(members) == len(set(members))  # disjoint
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    assert groups["stem"] == [first_conv.name]
    group_of = lambda node: next(a.i for a in node.attribute if a.name == "group")  # noqa: E731
    assert all(nodes[n].op_type == "Conv" and group_of(nodes[n]) > 1 for n in groups["depthwise"])
    assert any(nodes[n].op_type in ("Gemm", "MatMul") for n in groups["head"])
    assert not any(nodes[n].op_type == "GlobalAveragePool" for n in groups["head"])


def test_static_int8_keeps_the_groups_the_search_returns_in_fp32(checkpoint, images, monkeypatch, tmp_path):
    """The search's answer reaches the written graph: a made-to-hurt head stays fp32, the rest is int8."""
    from finetune.deploy import sensitivity
    from finetune.deploy.onnx import quantization_images

    real = sensitivity.search_fp32_groups

    def hurt_head(groups, agreement, max_drop):  # the head's quantisation made to cost 5 points
        return real(groups, lambda kept: min(agreement(kept), 1.0 if "head" in kept else 0.95), max_drop)

    monkeypatch.setattr(sensitivity, "search_fp32_groups", hurt_head)
    both = quantization_images(checkpoint, 24, images)
    out = export_model(checkpoint, format="onnx", quantize="int8", out=tmp_path / "m.int8.onnx",
                       calibration_images=both[0::2], validation_images=both[1::2], max_drop=0.01)
    q = read_onnx_info(out)["quantization"]
    assert q["fp32_groups"][0] == "head" and q["kept_with_margin"] >= 0.99
    assert q["agreement_with_fp32"] >= q["kept_with_margin"]  # every decision kept with margin is the same decision
    assert q["trace"][0] == {"fp32_groups": [], "score": pytest.approx(q["trace"][0]["score"])}
    graph = onnx.load(str(out)).graph
    # a quantised op's weight arrives through a DequantizeLinear; the head's Gemm reads its fp32 weight directly
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    gemms = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert gemms and all(n.input[1] not in produced_by_dq for n in gemms)
    assert sum(n.input[1] in produced_by_dq for n in convs) >= len(convs) // 2


def test_quantize_int8_is_static_with_the_search_by_default_and_dynamic_with_calibration_zero(checkpoint, images,
                                                                                               tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "int8", "--data", str(images),
                 "--out", str(tmp_path / "default.onnx")]) == 0
    out = capsys.readouterr().out
    q = read_onnx_info(tmp_path / "default.onnx")["quantization"]
    assert q["method"] == "static" and q["search"].startswith("layer-group sensitivity") and q["max_drop"] == 0.01
    assert q["calibration_images"] + q["validation_images"] == 18  # the whole train split, 256 asked for each
    assert f"agreement with fp32 {q['agreement_with_fp32']:.4f}" in out
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "int8", "--calibration", "0",
                 "--out", str(tmp_path / "dynamic.onnx")]) == 0
    assert read_onnx_info(tmp_path / "dynamic.onnx")["quantization"]["method"] == "dynamic"
    assert "(int8, dynamic" in capsys.readouterr().out
    # OpenVINO int8 is static only
    assert main(["export", str(checkpoint), "--format", "openvino", "--quantize", "int8", "--calibration", "0",
                 "--out", str(tmp_path / "ov")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "OpenVINO int8 is static" in err and not (tmp_path / "ov").exists()


def _no_compile(monkeypatch):
    """torch.compile refused up front (its row says so): these tests are about the int8 row, not 30 s of kernels."""
    def refuse(*args, **kwargs):
        raise RuntimeError("not in this test")

    monkeypatch.setattr(torch, "compile", refuse)


def test_benchmark_from_a_checkpoint_times_the_static_int8_export_makes(checkpoint, images, monkeypatch, capsys):
    import importlib

    bench = importlib.import_module("finetune.deploy.benchmark")  # the package re-exports a function of that name
    _no_compile(monkeypatch)
    calls = []
    real = bench.export_model

    def recording(*args, **kwargs):
        path = real(*args, **kwargs)
        calls.append({**kwargs, "method": (read_onnx_info(path).get("quantization") or {}).get("method")})
        return path

    monkeypatch.setattr(bench, "export_model", recording)
    assert main(["benchmark", str(checkpoint), "--batch", "2", "--iterations", "1", "--calibration", "6",
                 "--data", str(images), "--device", "cpu"]) == 0

    int8 = [c for c in calls if c.get("quantize") == "int8"]
    assert len(int8) == 1 and len(int8[0]["calibration_images"]) == 6 and len(int8[0]["validation_images"]) == 6
    assert not set(int8[0]["calibration_images"]) & set(int8[0]["validation_images"])
    assert int8[0]["method"] == "static"
    out = capsys.readouterr().out
    assert "onnxruntime int8 static" in out and "int8 speed-up over ONNX Runtime fp32 (cpu, batch 2)" in out
    assert "int8 static (as finetune export --quantize int8 makes it): 6 calibration images" in out

    assert main(["benchmark", str(checkpoint), "--data", str(images / "nope")]) == 2
    assert f"finetune benchmark: error: --data {images / 'nope'}: no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("calibration", [None, 0])
def test_benchmark_from_a_checkpoint_falls_back_to_dynamic_int8_and_says_why(checkpoint, monkeypatch, calibration):
    from finetune.deploy.benchmark import benchmark

    _no_compile(monkeypatch)
    # None: the CLI's default of 256 images, but the checkpoint records no data to calibrate on
    result = benchmark(checkpoint, batches=[2], iterations=1, warmup=1, devices=["cpu"],
                       calibration=256 if calibration is None else calibration)
    backends = {r["backend"] for r in result["rows"]}
    assert "onnxruntime int8" in backends and "onnxruntime int8 static" not in backends
    assert result["int8"].startswith("int8 dynamic (the linear layers only): ")
    assert ("needs the training images" if calibration is None else "no calibration images asked for") in result["int8"]
    assert set(result["int8_speedup"]) == {"cpu/2"}
