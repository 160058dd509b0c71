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


def run_chain(name: str, tmp_path: Path, finetune_cli) -> None:
    """Run chain ``name``'s commands as shown, in README's order, in ``tmp_path`` (in this process: conftest's
    ``finetune_cli``, the console script's ``main`` without a subprocess's imports)."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {"FINETUNE_CACHE": str(tmp_path / "cache")}
    chain = readme_chains()[name]
    for command in readme_commands():
        if command in chain or command.startswith(NEEDS.get(name, "\0")):
            done = finetune_cli(*shlex.split(command)[1:], cwd=tmp_path, env=env)
            assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"`{command}` printed a traceback:\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_quickstart_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("quickstart", tmp_path, finetune_cli)
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.98  # README: "reaches at least 98% test accuracy"
    assert (tmp_path / "runs" / "quickstart" / "eval" / "report.html").is_file()
    assert json.loads((tmp_path / "runs" / "quickstart" / "eval-again" / "metrics.json").read_text())["accuracy"] >= 0.98
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((tmp_path / "data" / "digits" / "3").glob("*.png")))
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000
    explained = json.loads((tmp_path / "explain-digits" / "explanations.json").read_text())
    assert [r["predicted"] for r in explained] == ["3", "8"] and (tmp_path / "explain-digits" / "index.html").is_file()
    assert (tmp_path / "model.int8.onnx").stat().st_size < (tmp_path / "model.onnx").stat().st_size
    assert json.loads((tmp_path / "benchmark.json").read_text())


@pytest.mark.slow
def test_readme_defaults_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("defaults", tmp_path, finetune_cli)
    assert (tmp_path / "runs" / "defaults" / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_readme_data_commands_run_as_shown(tmp_path, finetune_cli):
    run_chain("data", tmp_path, finetune_cli)
    assert (tmp_path / "data" / "digits" / "split.csv").is_file()
    assert (tmp_path / "audit-digits" / "audit.html").is_file()
    assert (tmp_path / "runs" / "quick" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert any((tmp_path / "runs" / "quick" / "tensorboard").iterdir())
    assert json.loads((tmp_path / "lr-find-quick" / "lr_find.json").read_text())
