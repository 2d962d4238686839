"""Speaker embeddings (fs_pipeline/audio/speaker.py) on espeak-ng voices: a male and a female variant are two people."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fs_pipeline.audio import speaker
from fs_pipeline.audio.io import read_wav
from fs_pipeline.qa import VOICE_OUTLIER, voice_similarities
from fs_pipeline.sample import SENTENCES


def espeak(text: str, voice: str, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    return read_wav(path, speaker.SAMPLE_RATE)


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[str, list[np.ndarray]]:
    """Four sentences each in espeak-ng's en-us voice and its female variant en+f3, at the encoder's rate."""
    folder = tmp_path_factory.mktemp("voices")
    return {voice: [espeak(text, voice, folder / f"{voice}_{i}.wav") for i, text in enumerate(SENTENCES[:4])] for voice in ("en-us", "en+f3")}


@pytest.fixture(scope="module")
def embeddings(voices) -> dict[str, list[np.ndarray]]:
    return {voice: [speaker.embed(audio, speaker.SAMPLE_RATE) for audio in clips] for voice, clips in voices.items()}


def test_the_same_voice_is_closer_than_another(embeddings):
    male, female = embeddings["en-us"], embeddings["en+f3"]
    reference = speaker.reference(male[1:])
    same = speaker.similarity(male[0], reference)
    other = max(speaker.similarity(clip, reference) for clip in female)
    assert same > VOICE_OUTLIER > other
    assert same - other > 0.1
    assert all(abs(np.linalg.norm(e) - 1) < 1e-5 and e.shape == (256,) for e in male + female)


def test_silence_embeds_to_zeros_and_scores_zero(embeddings):
    silent = speaker.embed(np.zeros(speaker.SAMPLE_RATE, dtype=np.float32), speaker.SAMPLE_RATE)
    assert not silent.any() and speaker.similarity(silent, embeddings["en-us"][0]) == 0.0


def test_embeddings_equal_resemblyzers_own(voices, embeddings):
    from resemblyzer import VoiceEncoder, preprocess_wav

    theirs = VoiceEncoder("cpu", verbose=False).embed_utterance(preprocess_wav(voices["en-us"][0], speaker.SAMPLE_RATE))
    assert np.abs(theirs - embeddings["en-us"][0]).max() < 1e-5


def test_another_rate_is_resampled(voices, embeddings):
    import soxr

    at_44k = soxr.resample(voices["en-us"][0], speaker.SAMPLE_RATE, 44100)
    assert speaker.similarity(speaker.embed(at_44k, 44100), embeddings["en-us"][0]) > 0.99


def test_weights_load_with_weights_only_and_threads_are_put_back(voices, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    speaker.load_encoder.cache_clear()
    try:
        speaker.load_encoder()
    finally:
        speaker.load_encoder.cache_clear()
    assert [c.get("weights_only") for c in calls] == [True]
    threads = torch.get_num_threads()
    speaker.embed(voices["en-us"][0], speaker.SAMPLE_RATE)
    assert torch.get_num_threads() == threads


def test_outliers_are_found_even_when_another_voice_holds_a_third(embeddings):
    clips = embeddings["en-us"] + embeddings["en+f3"][:2]
    scores = voice_similarities(clips)
    assert all(s >= VOICE_OUTLIER for s in scores[:4]) and all(s < VOICE_OUTLIER for s in scores[4:])
    assert voice_similarities(clips[:2]) == [None, None]  # too few to tell which voice is the odd one
