"""Reading and writing audio files."""

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fs_pipeline.fileio import atomic_path


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM, atomically."""
    with atomic_path(path) as tmp:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 audio at `sample_rate`."""
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return audio.astype(np.float32)
