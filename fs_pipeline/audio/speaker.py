"""Speaker embeddings: which voice a clip holds, as a unit vector, offline.

The encoder is Resemblyzer's GE2E voice encoder (a 3-layer LSTM over 40 mel bands, 256 numbers out), whose
trained weights ship inside its PyPI wheel (resemblyzer/pretrained.pt, Apache-2.0): nothing is downloaded at
run time. Resemblyzer's own VoiceEncoder loads them with torch.load without weights_only, so this module
builds the same network and loads them with weights_only=True. It uses Resemblyzer's own preprocessing
(16 kHz, volume raised to its training level, long silences cut by WebRTC's VAD) and its averaging of
overlapping 1.6 s windows. It runs on the CPU, in one thread: the network is small, training keeps the GPU,
and the LSTM's 160 small steps per window gain nothing from a second thread (on a busy 2-core machine two
threads made it 4 to 40 times slower than one). A 3 s clip then takes 40-90 ms, after 5-10 s of imports
(scipy.signal and numba, through librosa) on the first clip of a process.
"""

import contextlib
import functools
from pathlib import Path

import numpy as np
import soxr
import torch

from fs_pipeline import PipelineError

ENCODER = "resemblyzer 0.1.4 (GE2E)"  # recorded with what is computed from its embeddings
SAMPLE_RATE = 16000  # what the encoder was trained on; embed() resamples to it
WINDOWS_PER_SECOND = 1.3  # Resemblyzer's default: 1.6 s windows every 0.77 s
MIN_COVERAGE = 0.75  # a last window less than this full is dropped (unless it is the only one)


class VoiceEncoder(torch.nn.Module):
    """Resemblyzer's network: the last LSTM state, a linear layer and a ReLU, scaled to unit length."""

    def __init__(self):
        from resemblyzer import hparams

        super().__init__()
        self.lstm = torch.nn.LSTM(hparams.mel_n_channels, hparams.model_hidden_size, hparams.model_num_layers, batch_first=True)
        self.linear = torch.nn.Linear(hparams.model_hidden_size, hparams.model_embedding_size)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-12)


@functools.lru_cache(maxsize=1)
def load_encoder() -> VoiceEncoder:
    """The encoder with Resemblyzer's bundled weights, loaded once per process."""
    try:
        import resemblyzer
    except ImportError:
        raise PipelineError("resemblyzer is not installed: run `bash scripts/bootstrap.sh` (it installs requirements-nodeps.txt)") from None
    weights = Path(resemblyzer.__file__).parent / "pretrained.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
    encoder = VoiceEncoder()
    # similarity_weight/bias scale GE2E's training loss; they play no part in an embedding.
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return encoder.eval()


def embed(audio: np.ndarray, rate: int) -> np.ndarray:
    """A clip's speaker embedding: 256 float32 numbers of unit length, or zeros for a clip without sound."""
    from resemblyzer import VoiceEncoder as Resemblyzer, normalize_volume, trim_long_silences, wav_to_mel_spectrogram
    from resemblyzer.hparams import audio_norm_target_dBFS

    encoder = load_encoder()
    if not np.any(audio):
        return np.zeros(encoder.linear.out_features, dtype=np.float32)
    # Resemblyzer's preprocess_wav, except that a clip in which the VAD hears no voice is kept whole, not emptied.
    wav = np.asarray(audio, dtype=np.float32)
    wav = soxr.resample(wav, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else wav
    wav = normalize_volume(wav, audio_norm_target_dBFS, increase_only=True)
    voiced = trim_long_silences(wav)
    wav = voiced if len(voiced) else wav
    wav_slices, mel_slices = Resemblyzer.compute_partial_slices(len(wav), WINDOWS_PER_SECOND, MIN_COVERAGE)
    mel = wav_to_mel_spectrogram(np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav)))))
    with torch.inference_mode(), _one_cpu_thread():
        windows = encoder(torch.from_numpy(np.stack([mel[s] for s in mel_slices]))).numpy()
    return _unit(windows.mean(axis=0))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings: 1 for the same direction; 0 when either is all zeros."""
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / norms if norms else 0.0


def reference(embeddings: list[np.ndarray]) -> np.ndarray:
    """A speaker's reference embedding: the mean of its clips' embeddings, scaled to unit length."""
    return _unit(np.mean(np.stack(embeddings), axis=0))


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return (vector / norm if norm else vector).astype(np.float32)


@contextlib.contextmanager
def _one_cpu_thread():
    """torch's CPU thread count is process-wide (a resumed run relies on it), so it is put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
