"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` through a temporary file and ``os.replace``.

    The temporary file sits next to ``path`` (same filesystem, so the rename is atomic) and is removed
    if writing fails. Parent folders are created.

    Args:
        path: Destination file.
        text: Content to write.

    Returns:
        The destination path.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (see :func:`atomic_write_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Create a new, empty folder ``parent/PREFIX<random>`` that honours the umask.

    ``tempfile.mkdtemp`` makes its folders 0700, and a folder renamed into place keeps that mode: a
    checkpoint or cache others should read would be private to its writer. ``os.mkdir`` applies the
    umask (0o022 gives 0o755).
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary folder name {prefix}* in {parent}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
