"""Speech with known text for tests: espeak-ng sentences joined with pauses of known length."""

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from fs_pipeline.audio.io import read_wav

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
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
            audio = read_wav(raw, rate)
            loud = np.flatnonzero(np.abs(audio) > 1e-3)
            audio = audio[loud[0] : loud[-1] + 1]  # the sentence's sound, without espeak's own silence
            spans.append((t, t + len(audio) / rate))
            pieces += [audio, np.zeros(int(pause * rate), dtype=np.float32)]
            t += len(audio) / rate + pause
    sf.write(path, np.concatenate(pieces), rate, subtype="PCM_16")
    return Spoken(path, spans, list(sentences))


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref = [w.strip(".,!?;:").lower() for w in reference.split()]
    hyp = [w.strip(".,!?;:").lower() for w in hypothesis.split()]
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))
