"""README drift check: every `finetune` command README shows parses, and runs as shown.

The commands are read from README's ```bash blocks, so a changed flag, a renamed sub-command or a
file the commands no longer produce fails here rather than for a new user.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
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


@pytest.mark.slow
def test_readme_commands_run_as_shown(tmp_path):
    """Run every README command in order, as shown, in a scratch copy of the repository layout."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache")}
    for command in readme_commands():
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, "-m", "finetune", *argv[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, f"`{command}` printed a traceback:\n{done.stderr[-3000:]}"

    # what README says the commands produce
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.98  # README: "reaches at least 98% test accuracy"
    assert (tmp_path / "runs" / "quickstart" / "eval" / "report.html").is_file()
    assert (tmp_path / "data" / "digits" / "split.csv").is_file()
    for run in ("quick", "defaults"):
        assert (tmp_path / "runs" / run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "quickstart" / "eval-again" / "metrics.json").read_text())["accuracy"] >= 0.98
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((tmp_path / "data" / "digits" / "3").glob("*.png")))
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000
    explained = json.loads((tmp_path / "explain-digits" / "explanations.json").read_text())
    assert [r["predicted"] for r in explained] == ["3", "8"] and (tmp_path / "explain-digits" / "index.html").is_file()
