"""The built-in speech sample: a few sentences spoken by espeak-ng, in the dataset layout.

    training_data/<name>/<speaker>/sample_NNNN.wav + .lab, and dataset_summary.json

espeak-ng is deterministic, so the sample is the same on every machine with the same espeak-ng.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

import soundfile as sf

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import read_wav, write_wav
from fs_pipeline.fileio import write_json_atomic, write_text_atomic

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small voice model learns from a few clear recordings.",
    "Please read each sentence slowly and clearly.",
    "The weather today is bright and calm, with a light breeze.",
    "Numbers like seven, twelve and forty two are easy to say.",
    "Thank you for listening to this short sample.",
]
SAMPLE_SPEAKER = "sample_speaker"


def speak(text: str, path: Path) -> None:
    """Speak `text` into a wav file with espeak-ng (its native rate, 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        raise PipelineError("espeak-ng is not installed: run `bash scripts/bootstrap.sh` or `apt-get install espeak-ng`")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, capture_output=True)


def write_sample_dataset(output: Path, sample_rate: int, speaker: str = SAMPLE_SPEAKER) -> Path:
    """Write the sample sentences as a prepared dataset at `sample_rate`. Returns the dataset dir."""
    speaker_dir = Path(output) / speaker
    speaker_dir.mkdir(parents=True, exist_ok=True)
    durations = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            clip = speaker_dir / f"sample_{i:04d}.wav"
            raw = Path(tmp) / f"{i}.wav"
            speak(text, raw)
            write_wav(clip, read_wav(raw, sample_rate), sample_rate)
            write_text_atomic(clip.with_suffix(".lab"), text + "\n")
            durations.append(sf.info(clip).duration)
    total_minutes = sum(durations) / 60
    write_json_atomic(
        Path(output) / "dataset_summary.json",
        {
            "total_files": len(SENTENCES),
            "total_duration_minutes": round(total_minutes, 4),
            "speakers": {speaker: {"files": len(SENTENCES), "duration_minutes": round(total_minutes, 4)}},
            "sample_rate": sample_rate,
            "settings": {"source": "built-in sample spoken by espeak-ng"},
            "skipped": [],
        },
    )
    return Path(output)
