"""Output files: atomic writes of files and of whole folders (a reader sees the old one or the new one, never
half of one), failures to write reported as one line naming the path and the reason, text input read as
UTF-8 or refused in one line, and where caches live (:func:`cache_root`)."""
from __future__ import annotations

import contextlib
import csv
import io
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path`` by calling ``write(tmp)`` on a temporary sibling, then ``fsync`` and ``os.replace``.

    A reader sees the old file or the new one, never half of one: the temporary file sits next to
    ``path`` (same filesystem, so the rename is atomic) and is removed if anything fails, leaving a
    previous ``path`` untouched. Parent folders are created.

    Args:
        path: Destination file.
        write: Writes the whole content into the file it is given (which does not exist yet).

    Returns:
        The destination path.

    Raises:
        FinetuneError: the file cannot be written (a file where a folder should be, a read-only or full
            filesystem...), naming ``path`` and the reason.
    """
    path = Path(path)
    ensure_folder(path.parent, for_path=path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # a full disk may only say so here (delayed allocation, NFS)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise output_error(path, e) from e
        raise
    return path


def ensure_folder(folder: str | os.PathLike, *, for_path: str | os.PathLike | None = None) -> Path:
    """Create ``folder`` and its parents (an existing folder is fine).

    Raises:
        FinetuneError: it cannot be created, naming ``for_path`` (default ``folder``) and the reason.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(for_path or folder, e) from e
    return folder


def check_output(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Fail before any work when output ``path`` (a file, or a ``folder``) clearly cannot be created.

    Checks what can be known without writing: nothing where a folder is needed is a file, the path is not
    the other kind of thing already, and the nearest existing folder is writable. Writes still go through
    :func:`atomic_write` / :func:`ensure_folder`, which report what this cannot foresee (a full disk).

    Raises:
        FinetuneError: naming ``path`` and the reason.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise FinetuneError(f"cannot write into {path}: it is a file, not a folder")
    if not folder and path.is_dir():
        raise FinetuneError(f"cannot write {path}: it is a folder")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise FinetuneError(f"cannot write {path}: {blocker} is a file, not a folder")
    existing = _nearest_existing(path if folder else path.parent)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"cannot write {path}: {_unwritable_reason(existing)} ({existing})")


def output_error(path: str | os.PathLike, error: OSError) -> FinetuneError:
    """The one-line error for an output that could not be written: the path and the OS's reason."""
    blocker = _file_in_the_way(Path(path))
    reason = f"{blocker} is a file, not a folder" if blocker is not None else (error.strerror or str(error))
    return FinetuneError(f"cannot write {path}: {reason}")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (so ``path`` cannot exist)."""
    parent = _nearest_existing(Path(path).parent)
    return None if parent.is_dir() else parent


def _unwritable_reason(folder: Path) -> str:
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where finetune's caches live: ``cache_dir`` (``training.cache_dir``) when given, else
    ``$FINETUNE_CACHE``, else ``~/.cache/finetune``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


CACHES = {"features": "features", "store": "store", "scan": "scan-v1.sqlite3"}
"""Each cache's place under :func:`cache_root`: the feature cache, the pixel store and the scan cache."""


def cache_path(kind: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where cache ``kind`` (a key of `CACHES`) lives: the one rule, ``cache_root(cache_dir) / CACHES[kind]``."""
    return cache_root(cache_dir) / CACHES[kind]


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file's content (a leading byte-order mark dropped), or one `FinetuneError` line naming
    ``what`` and ``path``: unreadable, or not UTF-8 (with the byte offset and line of the first bad byte)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FinetuneError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FinetuneError(
            f"{what} {path} is not UTF-8 text: byte {e.start:,} (line {line}) is {data[e.start:e.start + 1]!r}; "
            "save it as UTF-8 (a spreadsheet's 'CSV UTF-8')"
        ) from None


def write_dir_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create folder ``path`` by calling ``write(tmp_dir)`` on a temporary sibling, then swapping it in.

    The swap is two renames (``path`` → ``path.old``, temporary → ``path``); if the second fails, the
    old folder is put back. A process killed between them leaves ``path.old``, which :func:`recover_dir`
    restores. Folders honour the umask.

    Raises:
        FinetuneError: the folder cannot be written (a read-only or full filesystem...), naming ``path``
            and the reason; the previous folder is left as it was.
    """
    path = Path(path)
    ensure_folder(path.parent, for_path=path)
    tmp = None
    old = path.with_name(path.name + ".old")
    try:
        recover_dir(path)
        tmp = make_temp_dir(path.parent, prefix=f".{path.name}.tmp-")
        write(tmp)
        _fsync_dir_files(tmp)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise output_error(path, e) from e
        raise
    return path


def recover_dir(path: str | Path) -> Path:
    """Repair what a crash inside :func:`write_dir_atomic` left next to ``path``.

    ``path.old`` without ``path`` (killed between the two renames) is renamed back to ``path``;
    ``path.old`` beside ``path`` (killed before deleting it) is deleted, and so are interrupted
    temporary folders ``.NAME.tmp-*``. Only one process may write a given ``path`` (rank 0).
    """
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (``\n`` line ends, standard quoting) of ``header`` and ``rows``: the one CSV writer of finetune's
    output files, written with :func:`atomic_write_text`."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()
