"""Speech recognition backends: faster-whisper (CTranslate2) and openai-whisper.

--whisper-model takes a size name (tiny, base, small, medium, large...) or a local path: a CTranslate2
model folder for faster-whisper, a .pt checkpoint for openai-whisper. Size names are fetched by the
backend on first use; a local path works offline.

Decoding follows Whisper's own defaults, since these transcripts become training labels: beam search
(--asr-beam-size, 5) at temperature 0, and a window whose text looks wrong (gzip compression ratio above
2.4, as a repetition loop has, or mean log-probability below -1) is decoded again at rising
temperatures, sampling BEST_OF candidates. Beam 1 is greedy decoding: faster, and less accurate.
"""

import importlib.util
import re
from functools import cache
from pathlib import Path

import numpy as np
import soxr

from fs_pipeline import PipelineError
from fs_pipeline.device import DeviceChoice

ASR_RATE = 16000
SIZES = ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en", "large", "large-v1", "large-v2",
         "large-v3", "turbo", "large-v3-turbo")
BACKENDS = ("auto", "faster-whisper", "openai-whisper")
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_THRESHOLD = 2.4
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
BEST_OF = 5  # candidates sampled at a fallback temperature


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise PipelineError(f"unknown --asr-backend '{backend}': use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faster-whisper" if importlib.util.find_spec("faster_whisper") else "openai-whisper"
    return backend


class Transcriber:
    def __init__(self, backend: str, model: str, choice: DeviceChoice, language: str | None = None, beam_size: int = 5):
        self.backend = resolve_backend(backend)
        self.language = None if language in (None, "auto") else language
        self.beam_size = beam_size
        if model not in SIZES and not Path(model).exists():
            raise PipelineError(f"unknown Whisper model '{model}': use a size ({', '.join(SIZES[:6])}, ...) or the path of a local model")
        on_gpu = choice.type == "cuda"
        try:
            if self.backend == "faster-whisper":
                from faster_whisper import WhisperModel

                self.model = WhisperModel(model, device="cuda" if on_gpu else "cpu", compute_type="float16" if on_gpu else "int8")
            else:
                import whisper

                self.model = whisper.load_model(model, device="cuda" if on_gpu else "cpu")
        except PipelineError:
            raise
        except Exception as e:  # hub downloads and model files fail in many ways
            raise PipelineError(
                f"cannot load Whisper model '{model}' with {self.backend} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                "check the name, or pass a local model path with --whisper-model"
            ) from e
        self.fp16 = on_gpu

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        audio16 = np.ascontiguousarray(soxr.resample(audio, sample_rate, ASR_RATE) if sample_rate != ASR_RATE else audio, dtype=np.float32)
        if self.backend == "faster-whisper":
            segments, _ = self.model.transcribe(
                audio16, language=self.language, beam_size=self.beam_size, best_of=BEST_OF, temperature=list(TEMPERATURES),
                compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD, log_prob_threshold=LOG_PROB_THRESHOLD,
                no_speech_threshold=NO_SPEECH_THRESHOLD, vad_filter=False,
            )
            text = " ".join(segment.text.strip() for segment in segments)
        else:
            result = self.model.transcribe(
                audio16, language=self.language, fp16=self.fp16, temperature=TEMPERATURES,
                beam_size=self.beam_size if self.beam_size > 1 else None,  # None: greedy, as faster-whisper's beam 1
                best_of=BEST_OF, compression_ratio_threshold=COMPRESSION_RATIO_THRESHOLD, logprob_threshold=LOG_PROB_THRESHOLD,
                no_speech_threshold=NO_SPEECH_THRESHOLD,
            )
            text = result["text"]
        return " ".join(text.split())


# Whisper's normaliser drops punctuation before it reads numbers, so "seven, twelve" would become 712:
# each clause is normalised on its own.
CLAUSE_BREAK = re.compile(r"[.,;:!?]+\s+")


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference length, after normalising both sides."""
    ref, hyp = normalized_words(reference), normalized_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def normalized_words(text: str) -> list[str]:
    """The words of `text` as Whisper's English normaliser writes them: lower case, no punctuation, numbers
    in digits ("forty two" and "42" are "42"), titles spelled out ("Mr." is "mister"), American spelling,
    contractions expanded and fillers ("uh", "hmm") dropped."""
    normalize = _english_normalizer()
    return [word for clause in CLAUSE_BREAK.split(text) for word in normalize(clause).split()]


@cache
def _english_normalizer():
    from whisper.normalizers import EnglishTextNormalizer  # reads its spelling table from the installed package

    return EnglishTextNormalizer()
