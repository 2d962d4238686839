"""Reading and writing audio files."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fs_pipeline import PipelineError
from fs_pipeline.fileio import atomic_path

# What write_audio writes, by file extension: libsndfile's format and subtype. libsndfile encodes mp3 from
# version 1.1 on; with an older one, ffmpeg does.
AUDIO_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


class UnreadableAudio(PipelineError):
    """A file ffmpeg can't decode, or one with no audio in it."""


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM, atomically."""
    with atomic_path(path) as tmp:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")


def check_audio_path(path: Path) -> None:
    """Refuse a path write_audio can't write, before any work: an unknown extension, or mp3 where neither
    libsndfile nor ffmpeg can encode it."""
    suffix = Path(path).suffix.lower()
    if suffix not in AUDIO_FORMATS:
        reason = f"{suffix} is not a format it writes" if suffix else "the name has no extension"
        raise PipelineError(f"can't write audio to {path}: {reason}; end the name in {', '.join(AUDIO_FORMATS)}")
    if suffix == ".mp3" and "MP3" not in sf.available_formats() and shutil.which("ffmpeg") is None:
        raise PipelineError(f"can't write {path}: this libsndfile has no mp3 encoder and ffmpeg is not installed; "
                            "install ffmpeg, or write .wav, .flac or .ogg")


def write_audio(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1], atomically, in the format `path`'s extension names (AUDIO_FORMATS)."""
    check_audio_path(path)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    format, subtype = AUDIO_FORMATS[Path(path).suffix.lower()]
    with atomic_path(path) as tmp:
        if format in sf.available_formats():
            sf.write(tmp, audio, sample_rate, format=format, subtype=subtype)
        else:
            _encode_with_ffmpeg(tmp, audio, sample_rate, format.lower())


def _encode_with_ffmpeg(path: Path, audio: np.ndarray, sample_rate: int, format: str) -> None:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", "-", "-f", format, str(path)]
    done = subprocess.run(command, input=audio.tobytes(), capture_output=True)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise PipelineError(f"ffmpeg could not write {format} ({reason[-1] if reason else 'no message'}): write .wav, .flac or .ogg instead")


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
