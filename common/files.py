"""File helpers every project needs the same way: a streamed sha256, atomic text writes, and folders written
aside, synced and swapped into place."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (checkpoints and indexes are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_atomic(path: str | Path, text: str) -> None:
    """Write text so that `path` holds the old content or the new one, never a part: temp file in the same
    folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_tree(path: str | Path) -> None:
    """fsync every file under a folder, then the folders: its content is on disk before a rename publishes
    it (a rename alone can survive a power cut that the data does not)."""
    path = Path(path)
    for p in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):   # deepest first: files, then folders
        _fsync(p)
    _fsync(path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def replace_dir(new: str | Path, path: str | Path) -> None:
    """Put folder `new` (same filesystem) at `path`, synced first. An existing `path` is swapped with `new` in
    one atomic step (Linux renameat2 RENAME_EXCHANGE), so a reader finds the old folder or the new one and
    never nothing; where the kernel or filesystem cannot, two renames (a moment with no folder)."""
    new, path = Path(new), Path(path)
    fsync_tree(new)
    if not path.exists():
        os.replace(new, path)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(path), _RENAME_EXCHANGE) == 0
    except (AttributeError, OSError):   # no renameat2 in this libc
        ok = False
    if ok:
        old = new                       # the exchange left the old folder under the new one's name
    else:
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
    _fsync(path.parent)                 # the rename itself on disk
    shutil.rmtree(old, ignore_errors=True)
