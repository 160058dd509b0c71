"""The one exception type users see: a clear, one-line message naming the problem."""


class FinetuneError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""
