"""The stage manifest: what each stage last did, from which inputs, with which settings.

results/<project>/manifest.json holds one entry per stage:

    {"stages": {"extract": {"settings": {...}, "inputs": {...}, "outputs": {...},
                            "completed_at": "2026-11-24T13:00:00+00:00", ...}}}

inputs and outputs map names to content hashes. Hashes are cached by file size and modification time
(as git and DVC do), so a rerun over an unchanged dataset reads no file in full. A stage is current when its entry is complete, its
settings and inputs are the ones given, and each recorded output still has its recorded hash (so an
output deleted or edited by hand makes the stage stale). `completed_at` is written last: an entry
without it is a run that did not finish. Every write is atomic.
"""

import json
import os
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from fs_pipeline import PipelineError
from fs_pipeline.fileio import file_hash, write_json_atomic


def settings_record(settings) -> dict:
    """A settings dataclass as JSON-ready values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = {"stages": {}, "file_hashes": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                # It only records work done; starting from empty redoes that work, loses nothing.
                logger.warning(f"{self.path} is damaged; treating every stage as not done")

    def entry(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def is_current(self, stage: str, settings: dict, inputs: dict, base: Path) -> bool:
        entry = self.entry(stage)
        if "completed_at" not in entry or entry.get("settings") != settings or entry.get("inputs") != inputs:
            return False
        return self.outputs_intact(stage, base)

    def outputs_intact(self, stage: str, base: Path) -> bool:
        """Every output the stage recorded still exists with its recorded hash."""
        for name, digest in self.entry(stage).get("outputs", {}).items():
            output = Path(base) / name  # absolute names stay absolute
            if not output.is_file() or self.hash(output) != digest:
                return False
        return True

    def hash(self, path: Path) -> str:
        """A file's content hash, reused while its size and modification time are the recorded ones."""
        stat = Path(path).stat()
        key = str(Path(path).resolve())
        cache = self.data.setdefault("file_hashes", {})
        size_mtime = [stat.st_size, stat.st_mtime_ns]
        if key in cache and cache[key][:2] == size_mtime:
            return cache[key][2]
        digest = file_hash(path)
        cache[key] = [*size_mtime, digest]
        return digest

    def hash_outputs(self, base: Path, files: list[Path]) -> dict[str, str]:
        """Output name -> hash; names are relative to `base` for files inside it, absolute otherwise."""
        names = {}
        for f in files:
            f = Path(f)
            name = f.relative_to(base).as_posix() if f.is_relative_to(base) else str(f.resolve())
            names[name] = self.hash(f)
        return names

    def update(self, stage: str, **fields) -> None:
        """Record progress of a stage that has not finished: its entry loses any completion mark."""
        entry = {k: v for k, v in self.entry(stage).items() if k != "completed_at"}
        entry.update(fields)
        self.data["stages"][stage] = entry
        self.save()

    def complete(self, stage: str, **fields) -> None:
        self.update(stage, **fields)
        self.data["stages"][stage]["completed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


@contextmanager
def run_lock(folder: Path, what: str):
    """Hold `folder`/.lock while a run works there. A second live run gets a clear error; a lock left by a
    process that no longer exists (killed, crashed) is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and _alive(owner):
                raise PipelineError(f"another {what} run (pid {owner}) is using {folder}: wait for it to finish or stop it, then rerun")
            logger.warning(f"taking over the stale lock {lock} (its process {owner} is gone)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise PipelineError(f"cannot take the lock {lock}: delete it if no other run is using {folder}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
