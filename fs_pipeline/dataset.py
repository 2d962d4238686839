"""A prepared dataset: training_data/NAME/SPEAKER/*.wav, each with a .lab transcript beside it."""

import os
from dataclasses import dataclass
from pathlib import Path

from fs_pipeline import PipelineError

AUDIO_SUFFIX = ".wav"
TRANSCRIPT_SUFFIX = ".lab"
CODES_SUFFIX = ".npy"
MAX_LISTED_PROBLEMS = 10
DECODE_WORKERS = min(4, os.cpu_count() or 1)  # processes that decode clips; more than the machine's cores only wait


@dataclass(frozen=True)
class Clip:
    wav: Path
    speaker: str
    key: str  # path relative to the dataset dir, with '/': the clip's name in manifests and reports

    @property
    def lab(self) -> Path:
        return self.wav.with_suffix(TRANSCRIPT_SUFFIX)

    @property
    def npy(self) -> Path:
        return self.wav.with_suffix(CODES_SUFFIX)

    def text(self) -> str:
        return self.lab.read_text(encoding="utf-8").strip()


def list_clips(data_dir: Path) -> list[Clip]:
    """Every clip of the dataset, sorted, after checking that each .wav has a non-empty .lab and each .lab
    a .wav. All problems are reported at once, before any work is done."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PipelineError(f"dataset not found: {data_dir}: pass --data-dir training_data/NAME (made by prepare_dataset.py)")
    wavs = sorted(p for p in data_dir.rglob(f"*{AUDIO_SUFFIX}") if not p.name.startswith("."))
    labs = sorted(p for p in data_dir.rglob(f"*{TRANSCRIPT_SUFFIX}") if not p.name.startswith("."))
    problems = []
    for wav in wavs:
        lab = wav.with_suffix(TRANSCRIPT_SUFFIX)
        if not lab.exists():
            problems.append(f"{wav.relative_to(data_dir)} has no {TRANSCRIPT_SUFFIX}")
        elif not _read_text(lab):
            problems.append(f"{lab.relative_to(data_dir)} is empty")
    problems += [f"{lab.relative_to(data_dir)} has no {AUDIO_SUFFIX}" for lab in labs if not lab.with_suffix(AUDIO_SUFFIX).exists()]
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise PipelineError(
            f"dataset {data_dir} has {len(problems)} problem(s): {shown}{more}: give every clip a transcript "
            "(or delete the clip) and rerun"
        )
    if not wavs:
        raise PipelineError(f"dataset {data_dir} has no {AUDIO_SUFFIX} clips: expected {data_dir}/SPEAKER/*.wav with .lab transcripts")
    clips = []
    for wav in wavs:
        relative = wav.relative_to(data_dir)
        speaker = relative.parts[0] if len(relative.parts) > 1 else data_dir.name
        clips.append(Clip(wav=wav, speaker=speaker, key=relative.as_posix()))
    return clips


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise PipelineError(f"{path} is not UTF-8 text: save the transcript as UTF-8 and rerun") from None
