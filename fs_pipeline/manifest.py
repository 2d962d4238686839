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

import hashlib
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from fs_pipeline.fileio import file_hash, write_json_atomic

STAGES = ("prepare", "extract", "pack", "train", "merge", "synthesize")
# Each stage is made from the outputs of the one before it.
UPSTREAM = {"extract": "prepare", "pack": "extract", "train": "pack", "merge": "train", "synthesize": "merge"}
DONE, NOT_RUN, INCOMPLETE = "done", "not run", "incomplete (rerun to continue)"


def stage_slice(first: str, last: str) -> tuple[str, ...]:
    """The stages from `first` to `last`, in order."""
    return STAGES[STAGES.index(first) : STAGES.index(last) + 1]


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

    @property
    def base(self) -> Path:
        """The folder output names are relative to: the manifest's own (results/<project>/)."""
        return self.path.parent

    def state(self, stage: str) -> str:
        """The one answer to "is this stage done?", which both the run and --status use: "done"; "not run";
        "incomplete" (a run that did not finish); or "stale: why" (its outputs were changed or deleted, or
        the stage before it now has other outputs than the ones this stage was made from). Content decides,
        never time: identical bytes rewritten upstream leave everything after them done."""
        entry = self.entry(stage)
        if not entry:
            return NOT_RUN
        if "completed_at" not in entry:
            return INCOMPLETE
        if not self.outputs_intact(stage):
            return "stale: outputs changed or deleted"
        upstream = UPSTREAM.get(stage)
        if upstream and self.entry(upstream):
            if "completed_at" not in self.entry(upstream):
                return f"stale: {upstream} is incomplete"
            if entry.get("after") != self.outputs_digest(upstream):
                return f"stale: {upstream} changed since"
        return DONE

    def is_current(self, stage: str, **expected) -> bool:
        """Done (see state) and recorded with exactly these field values (settings, inputs, ...)."""
        entry = self.entry(stage)
        return self.state(stage) == DONE and all(entry.get(k) == v for k, v in expected.items())

    def outputs_digest(self, stage: str) -> str | None:
        """One hash of a complete stage's recorded outputs; the next stage records it as what it was made from."""
        entry = self.entry(stage)
        if "completed_at" not in entry:
            return None
        return hashlib.sha256(json.dumps(entry.get("outputs", {}), sort_keys=True).encode()).hexdigest()[:16]

    def outputs_intact(self, stage: str) -> bool:
        """Every output the stage recorded still exists with its recorded hash."""
        for name, digest in self.entry(stage).get("outputs", {}).items():
            output = self.base / name  # absolute names stay absolute
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

    def hash_outputs(self, files: list[Path]) -> dict[str, str]:
        """Output name -> hash; names are relative to the manifest's folder for files inside it, absolute
        (resolved, so any spelling of a path names the same file) otherwise."""
        names = {}
        base = self.base.resolve()
        for f in files:
            f = Path(f).resolve()
            name = f.relative_to(base).as_posix() if f.is_relative_to(base) else str(f)
            names[name] = self.hash(f)
        return names

    def update(self, stage: str, **fields) -> None:
        """Record progress of a stage that has not finished: its entry loses any completion mark."""
        entry = {k: v for k, v in self.entry(stage).items() if k != "completed_at"}
        entry.update(fields)
        self.data["stages"][stage] = entry
        self.save()

    def complete(self, stage: str, **fields) -> None:
        upstream = UPSTREAM.get(stage)
        self.update(stage, **fields, after=self.outputs_digest(upstream) if upstream else None)
        self.data["stages"][stage]["completed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
