"""The one exception type users see: a clear, one-line message naming the problem."""
from __future__ import annotations

import reprlib

MAX_MESSAGE = 500
"""Longest error line shown, in characters: values named in a message are cut short, never the line."""


class FinetuneError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (line breaks become spaces) of at most ``limit`` characters, cut with "…"."""
    text = " ".join(str(text).split("\n")).replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4
_short.maxlevel = 3


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a few dozen characters without building the full repr (values from a
    hostile recipe can be huge or shared many times over)."""
    return _short.repr(value)


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most ``limit``
    characters: what a one-line error quotes of a library's multi-line exception."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
