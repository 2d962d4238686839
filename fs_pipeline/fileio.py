"""Atomic file writes (a file is complete or absent, never half-written), content hashes, and the user's
folders of fs-pipeline."""

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def user_folder(kind: str, environ=os.environ) -> Path:
    """fs-pipeline's folder among the user's `kind` ("config" or "cache") folders, by the XDG base directory
    convention: $XDG_CONFIG_HOME/fs-pipeline (or $XDG_CACHE_HOME/...), else ~/.config/fs-pipeline (~/.cache/...)."""
    root = environ.get(f"XDG_{kind.upper()}_HOME")
    return (Path(root) if root else Path.home() / f".{kind}") / "fs-pipeline"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path) -> None:
    """Flush a file's content, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path):
    """Yield a temp path in `path`'s directory; on success it is renamed onto `path`, on error removed.
    Durable: after a crash or power cut `path` holds its old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it the usual mode
    try:
        yield Path(tmp)
        # The content must be on disk before the rename is, or a power cut can leave `path` empty.
        # Opened by name because the body wrote through its own file objects.
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename lives in the directory: until the directory is synced it can be lost.
    _fsync(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


_hashes: dict[tuple, str] = {}


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content. Remembered within the process while the file's size and modification
    time stay the same, so a multi-gigabyte base model is read once per run, not once per stage."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]
