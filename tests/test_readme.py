"""README drift check: every `finetune` command README shows parses, and runs as shown.

The commands are read from README's ```bash blocks, so a changed flag, a renamed sub-command or a
file the commands no longer produce fails here rather than for a new user.
"""
from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from finetune.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The `finetune ...` commands of README's bash blocks, in order, without trailing comments."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            # a set-up line ends with `&& finetune ...`: keep the finetune part
            line = line.split("&&")[-1].strip()
            if line.startswith("finetune"):
                command = shlex.join(shlex.split(line, comments=True))
                if command not in commands:  # the quickstart's train command is shown twice
                    commands.append(command)
    return commands


def test_readme_shows_every_sub_command():
    shown = {shlex.split(c)[1] for c in readme_commands() if len(shlex.split(c)) > 1}
    assert set(COMMANDS) <= shown, f"README shows no example of: {sorted(set(COMMANDS) - shown)}"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    parser = build_parser()
    try:
        args = parser.parse_args(shlex.split(command)[1:])
    except SystemExit as e:  # argparse exits 2 on an unknown flag or a missing argument; --help exits 0
        assert e.code == 0 and "--help" in command, f"README command does not parse: {command}"
        return
    assert getattr(args, "func", None) is not None, f"README command names no sub-command: {command}"


# README's commands run in three independent chains (each in README's order, each in its own scratch
# folder) so a parallel test run overlaps them; every command README shows belongs to exactly one chain.
QUICKSTART = "finetune train recipes/quickstart.yaml"
NEEDS = {"defaults": "finetune data sample"}  # a chain's set-up command, taken from the "data" chain


def readme_chains() -> dict[str, list[str]]:
    """quickstart: the quickstart run and every later command that reads what that chain wrote (its run
    folder, the exports of its checkpoint, ...); defaults: the no-recipe run; data: everything else (the CLI
    tour, the data commands, the quick run and its resume, lr-find), and likewise what reads their outputs."""
    chains: dict[str, list[str]] = {"quickstart": [], "defaults": [], "data": []}
    made = {"quickstart": {"runs/quickstart"}, "defaults": set(), "data": set()}  # what each chain wrote so far
    for command in readme_commands():
        argv = shlex.split(command)
        reads = {name for name, outputs in made.items()
                 if any(arg == out or arg.startswith(out + "/") for arg in argv for out in outputs)}
        if command == QUICKSTART or "quickstart" in reads:
            name = "quickstart"
        else:
            name = "defaults" if command.startswith("finetune train --data") or "defaults" in reads else "data"
        chains[name].append(command)
        if "--out" in argv:
            made[name].add(argv[argv.index("--out") + 1])
    return chains


def test_every_readme_command_belongs_to_a_chain_that_runs_it():
    chains = readme_chains()
    assert all(chains.values()), chains
    assert sorted(sum(chains.values(), [])) == sorted(readme_commands())
    # a chain's commands need what earlier commands of the same chain (or its set-up command) made
    assert any(c.startswith(NEEDS["defaults"]) for c in chains["data"])
    assert chains["quickstart"][0] == QUICKSTART
    # e.g. the int8 export reads the fp32 export, which reads the quickstart's checkpoint
    assert any("model.int8.onnx" in c for c in chains["quickstart"])


def run_chain(name: str, tmp_path: Path, finetune_cli, *, only: tuple[str, ...] = (),
              skip: tuple[str, ...] = ()) -> None:
    """Run chain ``name``'s commands as shown (``only`` those, or all but ``skip``), in README's order, in
    ``tmp_path`` (in this process: conftest's ``finetune_cli``, the console script's ``main`` without a
    subprocess's imports)."""
    if not (tmp_path / "recipes").exists():
        (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {"FINETUNE_CACHE": str(tmp_path / "cache")}
    chain = readme_chains()[name]
    for command in readme_commands():
        if (command in chain or command.startswith(NEEDS.get(name, "\0"))) and command not in skip \
                and (not only or command in only):
            done = finetune_cli(*shlex.split(command)[1:], cwd=tmp_path, env=env)
            assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"`{command}` printed a traceback:\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_quickstart_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("quickstart", tmp_path, finetune_cli)
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.98  # README: "reaches at least 98% test accuracy"
    assert (tmp_path / "runs" / "quickstart" / "eval" / "report.html").is_file()
    again = json.loads((tmp_path / "runs" / "quickstart" / "eval-again" / "metrics.json").read_text())["accuracy"]
    assert again == summary["test"]["accuracy"]  # the same checkpoint, split and images as the run's own test eval
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((tmp_path / "data" / "digits" / "3").glob("*.png")))
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000
    explained = json.loads((tmp_path / "explain-digits" / "explanations.json").read_text())
    assert [r["predicted"] for r in explained] == ["3", "8"] and (tmp_path / "explain-digits" / "index.html").is_file()
    assert (tmp_path / "model.int8.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size
    run = tmp_path / "runs" / "quickstart"
    # calibrate: the refitted temperature is in the checkpoint
    temperature = json.loads((run / "checkpoints" / "best" / "checkpoint.json").read_text())["temperature"]
    assert isinstance(temperature, float) and 0 < temperature != 1.0
    # TTA: the same plain metrics as the plain eval of the same images, and the 2-view metrics beside them
    tta = json.loads((run / "eval-tta" / "metrics.json").read_text())
    plain = json.loads((run / "eval-again" / "metrics.json").read_text())
    assert tta["accuracy"] == plain["accuracy"] and tta["tta"]["views"] == "hflip" and 0.9 <= tta["tta"]["accuracy"] <= 1
    # int8: static with the search, within its budget on the train sample, and its test cost bounded
    quantization = json.loads((tmp_path / "model.int8.onnx.json").read_text())["quantization"]
    assert quantization["method"] == "static" and quantization["calibration_images"] == 256
    assert quantization["kept_with_margin"] >= 1 - quantization["max_drop"]
    assert quantization["agreement_with_fp32"] >= quantization["kept_with_margin"]
    int8_eval = json.loads((tmp_path / "model.int8-eval-test" / "metrics.json").read_text())
    assert int8_eval["reference"]["checkpoint"] == str(run / "checkpoints" / "best")
    assert int8_eval["reference"]["accuracy_delta"] >= -0.015, int8_eval["reference"]
    # the benchmark: ONNX Runtime fp32 and the int8 export timed at both batch sizes
    bench = json.loads((tmp_path / "benchmark.json").read_text())
    timed = {(r["backend"], r["batch"]) for r in bench["rows"] if r["status"] == "ok"}
    assert {("onnxruntime fp32", 1), ("onnxruntime fp32", 32), ("onnxruntime int8 static", 1),
            ("onnxruntime int8 static", 32)} <= timed
    assert set(bench["int8_speedup"]) == {"cpu/1", "cpu/32"} and all(v > 0 for v in bench["int8_speedup"].values())


@pytest.mark.slow
def test_readme_defaults_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("defaults", tmp_path, finetune_cli)
    run = tmp_path / "runs" / "defaults"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    # few-shot: 10 training images per class, the staged defaults (head 3 epochs, then all 7)
    with open(run / "manifest.csv", newline="") as f:
        train = [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert len(train) == 100 and all(sum(r["class"] == c for r in train) == 10 for c in map(str, range(10)))
    with open(run / "metrics.csv", newline="") as f:
        stages = [int(r["stage"]) for r in csv.DictReader(f)]
    assert stages == [0] * 3 + [1] * 7
    assert json.loads((run / "summary.json").read_text())["test"]["accuracy"] > 0.5


@pytest.mark.slow
def test_readme_data_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("data", tmp_path, finetune_cli)
    assert (tmp_path / "data" / "digits" / "split.csv").is_file()
    assert (tmp_path / "audit-digits" / "audit.html").is_file()
    assert (tmp_path / "runs" / "quick" / "checkpoints" / "best" / "model.safetensors").is_file()
    quick = tmp_path / "runs" / "quick"
    # the --resume of the finished run added nothing: one row per epoch of the recipe (10 + 1, stage 2 at 0)
    with open(quick / "metrics.csv", newline="") as f:
        rows = [(r["stage"], r["epoch"]) for r in csv.DictReader(f)]
    assert len(set(rows)) == len(rows) and [stage for stage, _ in rows] == ["0"] * 10 + ["1"], rows
    # TensorBoard and MLflow both logged the epochs' validation metrics
    events = b"".join(p.read_bytes() for p in (quick / "tensorboard").rglob("events.out.tfevents*"))
    assert b"val" in events and b"loss" in events
    metric_files = {p.name for p in (quick / "mlruns").rglob("metrics/*")}
    assert any("val" in name for name in metric_files), metric_files
    # lr-find: a sweep of at most the 60 updates asked for, increasing lrs, a suggestion inside the sweep
    found = json.loads((tmp_path / "lr-find-quick" / "lr_find.json").read_text())
    lrs = found["lrs"]
    assert 10 <= len(lrs) == len(found["losses"]) <= 60 and lrs == sorted(lrs)
    assert lrs[0] <= found["suggested_lr"] <= lrs[-1] and lrs[0] <= found["min_loss_lr"] <= lrs[-1]
