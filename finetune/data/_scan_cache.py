"""The scan cache: what `scan_images` learned about each file, reused while the file is unchanged.

One SQLite database, ``cache_root()/scan-v1.sqlite3`` (`default_scan_cache`), holds every folder's rows, so
training runs and ``finetune data`` commands share it. A row is keyed by the file's resolved folder and its
path relative to it, and is used only while the file's **stamp** — size, modification time (ns), inode and
status-change time (ns) — and the scan's settings (``max_pixels``, the Pillow and OpenCV versions) are what they
were when the file was decoded and hashed; anything else is decoded again and its row replaced. The content hash
(SHA-256) and the perceptual hash are therefore recomputed whenever the bytes may have changed: a program cannot
set the status-change time, so a file rewritten with the same size and its old modification time put back
(``touch -d``, ``cp -p``, ``rsync -t``) is rescanned too, and a file replaced by another (``os.replace``) has a
new inode.

A file whose modification or status-change time is less than `RACY_SECONDS` older than the scan is not recorded:
file-system clocks tick coarsely (a few ms on ext4, 2 s on FAT), and a change in the same tick as the scan would
keep the same stamp (git calls such entries "racily clean"). Neither is a file whose stamp changed while it was
being read.

Why SQLite in WAL mode rather than one file per folder replaced atomically: concurrent runs each add their rows
in one short transaction without dropping each other's (a replaced file keeps only the last writer's), readers
never wait for a writer, and a crash loses at most the transaction in flight. A database that cannot be used
(read-only home, a network file system without locking) is skipped with one warning: the scan then decodes
everything, as without a cache.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import cv2
import PIL

from finetune._io import cache_path

logger = logging.getLogger(__name__)

RACY_SECONDS = 2.0
"""Files changed less than this long before the scan are not recorded (see the module docstring)."""

_VERSION = 1
"""Bump when what the scan computes changes (decoding, hashes), so old rows are not reused."""

_SCHEMA = """CREATE TABLE IF NOT EXISTS scans (
    folder TEXT NOT NULL, rel TEXT NOT NULL, stamp TEXT NOT NULL, settings TEXT NOT NULL,
    reason TEXT, width INTEGER, height INTEGER, mode TEXT, sha256 TEXT, phash TEXT,
    PRIMARY KEY (folder, rel))"""


def default_scan_cache() -> Path:
    """The scan cache every run and ``finetune data`` command shares: ``cache_root()/scan-v1.sqlite3``."""
    return cache_path("scan")


def file_stamp(st: os.stat_result) -> str:
    """What must stay the same for a row to be reused: size, mtime, inode and ctime (ns)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def is_settled(st: os.stat_result, now_ns: int) -> bool:
    """Whether a file last changed at least `RACY_SECONDS` before ``now_ns``, so its stamp can be trusted."""
    return max(st.st_mtime_ns, st.st_ctime_ns) <= now_ns - int(RACY_SECONDS * 1e9)


class ScanCache:
    """The rows of one folder in the scan cache database.

    Args:
        path: The database file (created with its folder if missing).
        folder: The scanned folder (resolved here).
        max_pixels: The scan's pixel limit, part of the settings a row must match.
    """

    def __init__(self, path: str | os.PathLike, folder: str | os.PathLike, max_pixels: int):
        self.path = Path(path)
        self.folder = str(Path(folder).resolve())
        self.settings = f"v{_VERSION} max_pixels={max_pixels} pillow={PIL.__version__} opencv={cv2.__version__}"
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent after a crash; a lost row is rescanned
            with db:
                db.execute(_SCHEMA)
            self._db = db
        except (OSError, sqlite3.Error) as e:
            logger.warning("scan cache %s cannot be used (%s): every image is decoded", self.path, e)

    def load(self) -> dict[str, tuple]:
        """rel → (stamp, reason, width, height, mode, sha256, phash) of the folder's rows made with these settings."""
        if self._db is None:
            return {}
        try:
            rows = self._db.execute(
                "SELECT rel, stamp, reason, width, height, mode, sha256, phash FROM scans WHERE folder = ? AND settings = ?",
                (self.folder, self.settings),
            ).fetchall()
        except sqlite3.Error as e:
            logger.warning("scan cache %s cannot be read (%s): every image is decoded", self.path, e)
            return {}
        return {rel: (stamp, reason, width, height, mode, sha256, int(phash)) for rel, stamp, reason, width, height,
                mode, sha256, phash in rows}

    def store(self, rows: list[tuple]) -> None:
        """Record (rel, stamp, reason, width, height, mode, sha256, phash) rows in one transaction."""
        if self._db is None or not rows:
            return
        try:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO scans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(self.folder, rel, stamp, self.settings, reason, w, h, mode, sha, str(phash))
                     for rel, stamp, reason, w, h, mode, sha, phash in rows],
                )
        except sqlite3.Error as e:
            logger.warning("scan cache %s cannot be written (%s): the next scan decodes these images again", self.path, e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None



_PAIRS = """CREATE TABLE IF NOT EXISTS copies (
    a TEXT NOT NULL, b TEXT NOT NULL, settings TEXT NOT NULL, copy INTEGER NOT NULL,
    PRIMARY KEY (a, b, settings))"""


class PairVerdicts:
    """The quick leak check's verdicts on pairs of images (copies or not), in the scan cache database.

    A pair is keyed by the SHA-256 of both files' bytes (the scan's ``sha256``, smaller first) and the check's
    settings, so a verdict holds while both files' contents do, wherever they are: a second ``finetune data
    split`` of an unchanged folder decodes no thumbnail again, on look-alike images as on distinct ones. A
    database that cannot be used is skipped (the check then decodes, as without a cache).

    Args:
        path: The database file (the scan cache's).
        settings: What a verdict depends on besides the two files (the check's threshold and thumbnails).
    """

    def __init__(self, path: str | os.PathLike, settings: str):
        self.settings = f"v{_VERSION} {settings} opencv={cv2.__version__}"
        self._db: sqlite3.Connection | None = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                db.execute(_PAIRS)
            self._db = db
        except (OSError, sqlite3.Error) as e:
            logger.warning("scan cache %s cannot keep the leak check's verdicts (%s)", path, e)

    def load(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """The known verdicts among ``pairs`` (each (smaller digest, larger digest))."""
        if self._db is None or not pairs:
            return {}
        wanted, known = set(pairs), {}
        try:
            for a, b, copy in self._db.execute("SELECT a, b, copy FROM copies WHERE settings = ?", (self.settings,)):
                if (a, b) in wanted:
                    known[a, b] = bool(copy)
        except sqlite3.Error:
            return {}
        return known

    def store(self, verdicts: dict[tuple[str, str], bool]) -> None:
        if self._db is None or not verdicts:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO copies VALUES (?, ?, ?, ?)",
                                     [(a, b, self.settings, int(c)) for (a, b), c in verdicts.items()])
        except sqlite3.Error as e:
            logger.warning("scan cache cannot record the leak check's verdicts (%s)", e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
