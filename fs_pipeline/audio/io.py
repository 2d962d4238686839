"""Reading and writing audio files."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fs_pipeline import PipelineError
from fs_pipeline.fileio import atomic_path


class UnreadableAudio(PipelineError):
    """A file ffmpeg can't decode, or one with no audio in it."""


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


def decode(path: Path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 audio at `sample_rate` from anything ffmpeg reads (audio or the audio track of a video).
    With `max_seconds`, ffmpeg stops decoding there."""
    if shutil.which("ffmpeg") is None:
        raise PipelineError("ffmpeg is not installed: run `bash scripts/bootstrap.sh` or `apt-get install ffmpeg`")
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn"]
    if max_seconds is not None:
        command += ["-t", f"{max_seconds:.3f}"]
    command += ["-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise UnreadableAudio(f"{path}: ffmpeg can't decode it ({reason[-1] if reason else 'no audio stream'})")
    audio = np.frombuffer(done.stdout, dtype=np.float32)
    if audio.size == 0:
        raise UnreadableAudio(f"{path}: no audio samples in it")
    return audio.copy()
