"""Speech with known text, for tests and benchmarks: espeak-ng sentences joined with pauses of known length."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fs_pipeline.audio.io import read_wav
from fs_pipeline.sample import speak

SENTENCES = [
    "The sun rose slowly over the quiet hills.",
    "Seven children walked to the old stone bridge.",
    "A cold wind blew across the open field.",
    "My brother plays the piano every evening.",
    "We found a small boat near the river bank.",
    "The library closes at nine on Sundays.",
]


@dataclass
class Spoken:
    path: Path
    spans: list[tuple[float, float]]  # seconds each sentence's audio occupies in the file
    sentences: list[str]


def speak_long(path: Path, sentences=SENTENCES, pause: float = 0.8, rate: int = 22050) -> Spoken:
    """One wav of the sentences, each followed by `pause` seconds of silence."""
    pieces, spans, t = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(sentences):
            raw = Path(tmp) / f"{i}.wav"
            speak(text, raw)
            audio = read_wav(raw, rate)
            loud = np.flatnonzero(np.abs(audio) > 1e-3)
            audio = audio[loud[0] : loud[-1] + 1]  # the sentence's sound, without espeak's own silence
            spans.append((t, t + len(audio) / rate))
            pieces += [audio, np.zeros(int(pause * rate), dtype=np.float32)]
            t += len(audio) / rate + pause
    sf.write(path, np.concatenate(pieces), rate, subtype="PCM_16")
    return Spoken(path, spans, list(sentences))
