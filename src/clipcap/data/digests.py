"""Image digests (sha256 of the file's bytes: the image id) cached by (path, size, mtime, inode), the way
DVC's own state database caches file hashes: a fetch that finds nothing new hashes nothing, and one
that finds new files hashes only those, on several threads, with a progress bar.

The cache is a small SQLite file beside the dataset's artifacts. It only saves work: deleting it
changes no result, and a file whose size, modification time or inode changed is hashed again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from clipcap.fileio import file_sha256

log = logging.getLogger(__name__)

Digest = str | OSError  # the hex sha256, or why the file could not be read
Stat = tuple[int, int, int]  # size, mtime in ns, inode


def image_digests(paths: Iterable[str], workers: int = 4, cache: str | Path | None = None,
                  progress: bool = True) -> dict[str, Digest]:
    """The digest of every existing file among ``paths`` (missing ones are left out): from the
    ``cache`` file where size, mtime and inode are unchanged, the others hashed on ``workers`` threads."""
    stats: dict[str, Stat] = {}
    found: dict[str, Digest] = {}
    for path in dict.fromkeys(paths):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            found[path] = err
            continue
        if os.path.isfile(path):
            stats[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    known = _read(Path(cache)) if cache is not None else {}
    todo = [path for path, stat in stats.items() if known.get(path, (None,))[0] != stat]
    found.update({path: known[path][1] for path in stats.keys() - set(todo)})
    hashed = _hash(todo, workers, progress)
    found.update(hashed)
    if cache is not None and hashed:
        _write(Path(cache), [(path, *stats[path], digest) for path, digest in hashed.items() if isinstance(digest, str)])
    log.info("image digests: %d files, %d hashed now, %d unchanged since the last run", len(stats), len(todo),
             len(stats) - len(todo))
    return found


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=60)
    db.execute("CREATE TABLE IF NOT EXISTS digests "
               "(path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
    return db


def _read(path: Path) -> dict[str, tuple[Stat, str]]:
    if not path.exists():
        return {}
    with closing(_open(path)) as db:
        return {p: ((size, mtime, inode), sha) for p, size, mtime, inode, sha in
                db.execute("SELECT path, size, mtime_ns, inode, sha256 FROM digests")}


def _write(path: Path, rows: list[tuple]) -> None:
    with closing(_open(path)) as db, db:
        db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", rows)


def _hash(paths: list[str], workers: int, progress: bool) -> dict[str, Digest]:
    def one(path: str) -> Digest:
        try:
            return file_sha256(path)
        except OSError as err:
            return err

    out: dict[str, Digest] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
            total=len(paths), desc="hash", unit="file", disable=not progress or len(paths) < 100) as bar:
        for path, digest in zip(paths, pool.map(one, paths)):
            out[path] = digest
            bar.update()
    return out
