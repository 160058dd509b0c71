"""The `finetune` command: one module per sub-command.

Each sub-command module exposes ``add_parser(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit status.
Modules import their heavy dependencies (torch, timm) inside ``func`` so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from finetune._version import __version__
from finetune.errors import FinetuneError, one_line

# Sub-command modules, in the order `finetune --help` lists them.
COMMANDS = ("train", "validate", "lr-find", "eval", "calibrate", "predict", "explain", "export", "push", "benchmark", "data",
            "models")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error (usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, one_line(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")


def whole_number(least: int):
    """An argparse ``type``: a whole number of ``least`` or more."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more (got {value})")
        return value

    parse.__name__ = f"whole number >= {least}"
    return parse


positive_int = whole_number(1)
"""An argparse ``type``: a whole number of 1 or more."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finetune",
        description="Fine-tune timm backbones with a SpinalNet, linear or MLP head on a folder of images.",
    )
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"finetune.cli.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FinetuneError as e:
        print(one_line(f"finetune {args.command}: error: {e}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finetune {args.command}: interrupted", file=sys.stderr)
        return 130
