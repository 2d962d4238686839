"""The fast paths of issue 22 give the results of the plain ones: streamed synthesis, the compile cache's key,
the folded codec in extraction, the chunked loss."""

import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from fs_pipeline.audio.io import read_wav
from fs_pipeline import models
from fs_pipeline.manifest import Manifest
from fs_pipeline.modeling import forward, frozen_head_weight
from fs_pipeline.models import load_codec, load_llm
from fs_pipeline.stages import extract
from fs_pipeline.stages.synthesize import (FIRST_CHUNK_FRAMES, REPETITION_WINDOW, SynthesisSettings, Synthesizer,
                                           compile_cache_key, default_compile_cache)
from tests.conftest import load_script
from tests.test_modeling import batch_rows, pad

TEXT = "The weather is calm today."
# Streamed and one-shot audio differ only by fp32 rounding: the decoder runs on a prefix instead of the whole
# sequence, and its convolutions and attention sum in another order (measured: 9e-8 on the tiny codec, 4e-8 on
# the full-size one, whose peaks were 0.24 and 0.016). Audio lies within +-1; a chunk placed one frame off, or
# decoded without the frames before it, moves samples by the size of the signal (0.1 and more here).
STREAM_ATOL = 1e-6


@pytest.fixture(scope="module")
def synthesizer(tiny_model_dir, cpu):
    return Synthesizer(tiny_model_dir, cpu)


def test_streamed_chunks_join_into_the_one_shot_audio(synthesizer):
    # 14 frames from a first chunk of 3: chunks of 3, 3, 6 (each doubling the audio so far) and the last 2
    settings = SynthesisSettings(max_new_frames=14, seed=1)
    one_shot = synthesizer.render(TEXT, settings)
    chunks = []
    streamed = synthesizer.stream(TEXT, settings, chunks.append, first_chunk=3)
    assert streamed.frames == one_shot.frames == 14 and streamed.cut_off == "max_new_frames"
    per_frame = len(one_shot.audio) // one_shot.frames
    assert [len(chunk) // per_frame for chunk in chunks] == [3, 3, 6, 2]
    np.testing.assert_allclose(np.concatenate(chunks), one_shot.audio, rtol=0, atol=STREAM_ATOL)
    np.testing.assert_array_equal(streamed.audio, np.concatenate(chunks))
    assert 0 < streamed.first_audio < streamed.seconds


def test_a_stream_shorter_than_the_first_chunk_comes_in_one_piece(synthesizer):
    settings = SynthesisSettings(max_new_frames=5, seed=1)
    chunks = []
    streamed = synthesizer.stream(TEXT, settings, chunks.append)
    assert len(chunks) == 1 and streamed.frames == 5 < FIRST_CHUNK_FRAMES
    np.testing.assert_allclose(chunks[0], synthesizer.render(TEXT, settings).audio, rtol=0, atol=STREAM_ATOL)


def test_compile_cache_key_follows_the_shape_not_the_weights(synthesizer, tiny_model_dir, cpu):
    config, codec_cfg = synthesizer.model.config, tiny_model_dir.codec_cfg
    key = compile_cache_key(config, codec_cfg, cpu)
    assert compile_cache_key(replace(config), codec_cfg, cpu) == key  # the same shape, another object
    assert compile_cache_key(replace(config, n_layer=config.n_layer + 1), codec_cfg, cpu) != key
    assert compile_cache_key(replace(config, dim=config.dim * 2), codec_cfg, cpu) != key
    assert compile_cache_key(config, codec_cfg, replace(cpu, dtype=torch.bfloat16)) != key
    bigger_codec = codec_cfg.copy()
    bigger_codec.quantizer.codebook_size = int(codec_cfg.quantizer.codebook_size) * 2
    assert compile_cache_key(config, bigger_codec, cpu) != key


@pytest.mark.slow  # about a minute on 2 CPU cores: inductor builds the slow and the fast step
def test_compiled_steps_give_the_eager_codes(tiny_model_dir, cpu, tmp_path):
    # inductor draws its own random numbers unless told to call torch's, which eager sampling draws
    from torch._inductor import config as inductor_config

    eager = Synthesizer(tiny_model_dir, cpu)
    settings = SynthesisSettings(max_new_frames=30, seed=3)
    with inductor_config.patch(fallback_random=True):
        compiled = Synthesizer(tiny_model_dir, cpu, model=eager.model, compile=True, compile_cache=tmp_path)
        assert compiled.warm_up() > 0 and compiled.cache_file.is_file()
        codes = [compiled.generate(text, settings) for text in (TEXT, "Hello there.")]
    assert codes[0].shape[1] > REPETITION_WINDOW  # the window filled and then shifted
    for text, compiled_codes in zip((TEXT, "Hello there."), codes):
        assert torch.equal(compiled_codes, eager.generate(text, settings))


def test_compile_cache_lives_in_the_users_cache_dir(tmp_path):
    assert default_compile_cache({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fs-pipeline" / "compile"
    assert default_compile_cache({}).parts[-3:] == (".cache", "fs-pipeline", "compile")


def test_extraction_with_the_folded_codec_gives_the_codes_of_the_library_codec(sample_dataset, tiny_model_dir, cpu, tmp_path,
                                                                               monkeypatch):
    data = shutil.copytree(sample_dataset, tmp_path / "data")
    extract.run(extract.ExtractSettings(data, batch_size=6, num_workers=0), tiny_model_dir, cpu, Manifest(tmp_path / "m.json"))
    monkeypatch.setattr(models, "_fold_weight_norm", lambda codec: None)
    library = load_codec(tiny_model_dir, cpu)  # weight norm recomputed on every call, as the library runs it
    assert any(torch.nn.utils.parametrize.is_parametrized(m) for m in library.modules())
    wavs = sorted(data.glob("*/*.wav"))
    for wav in wavs[:3]:
        audio = torch.from_numpy(read_wav(wav, tiny_model_dir.version.sample_rate))[None, None]
        with torch.inference_mode():
            codes, frames = library.encode(audio)
        np.testing.assert_array_equal(np.load(wav.with_suffix(".npy")), codes[0, :, : frames[0]].numpy())
    assert len(wavs) == 6


@pytest.mark.parametrize("frozen_head", [False, True], ids=["head-with-gradients", "frozen-head"])
def test_chunked_loss_equals_the_whole_batch_loss_with_its_gradients(tiny_model_dir, cpu, frozen_head):
    """head_losses' slices, and for a head nothing trains in (the releases' tied token head) frozen_head_losses, whose
    states' gradient is made in the forward pass, against the whole batch's logits through autograd."""
    model = load_llm(tiny_model_dir, cpu)
    if frozen_head:
        model.output.weight.requires_grad_(False)
    assert (frozen_head_weight(model) is model.output.weight) == frozen_head
    inputs, labels = pad(model, batch_rows(model))
    params = [p for p in model.parameters() if p.requires_grad]
    results, gradients = [], []
    # None: the whole batch's logits at once (the code before chunking); 7 rows: many slices, the last one short
    for chunk in (None, 7 * model.config.vocab_size):
        model.zero_grad()
        result = forward(model, inputs, labels, loss_chunk=chunk)
        (result.loss * 3).backward()  # a loss gradient other than 1, which the gradient made in forward must take
        results.append(result)
        gradients.append(torch.cat([p.grad.flatten() for p in params]))
    whole, chunked = results
    assert inputs.shape[0] * inputs.shape[-1] > 2 * 7  # the token loss ran in several slices
    # fp32 sums in another order: ~1e-7 relative
    for name in ("token_loss_sum", "codebook_loss_sum", "loss"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-6, atol=0)
    assert chunked.top5_accuracy == whole.top5_accuracy
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=0, atol=1e-5 * gradients[0].abs().max())
    with torch.no_grad():  # validation: no gradient to make
        evaluated = forward(model, inputs, labels, loss_chunk=7 * model.config.vocab_size)
    torch.testing.assert_close(evaluated.token_loss_sum, whole.token_loss_sum, rtol=1e-6, atol=0)


def test_top5_accuracy_counts_the_targets_among_the_five_likeliest(tiny_model_dir, cpu):
    from fs_pipeline.modeling import IGNORE, slow_forward

    model = load_llm(tiny_model_dir, cpu)
    inputs, labels = pad(model, batch_rows(model))
    with torch.inference_mode():
        logits, _ = slow_forward(model, inputs)
        result = forward(model, inputs, labels)
    targets = labels[:, 0]
    expected = ((logits.topk(5, dim=-1).indices == targets[..., None]).any(-1) & (targets != IGNORE)).sum() / (targets != IGNORE).sum()
    assert result.top5_accuracy == expected


def test_cli_stream_feeds_a_player_the_samples_of_the_file(tiny_model_path, tmp_path, monkeypatch):
    received = tmp_path / "received.f32"
    player = tmp_path / "bin" / "aplay"  # a stand-in that keeps what it is fed
    player.parent.mkdir()
    player.write_text(f"#!{sys.executable}\nimport sys\nopen({str(received)!r}, 'wb').write(sys.stdin.buffer.read())\n")
    player.chmod(0o755)
    monkeypatch.setenv("PATH", str(player.parent))
    output = tmp_path / "out.wav"
    result = CliRunner().invoke(load_script("cli_tts").main, [TEXT, "--model-path", str(tiny_model_path), "-o", str(output),
                                                              "--device", "cpu", "--max-new-frames", "20", "--seed", "1",
                                                              "--stream", "--play"])
    assert result.exit_code == 0, result.output
    assert "First audio after" in result.output
    played = np.frombuffer(received.read_bytes(), dtype="<f4")
    written, _ = sf.read(output, dtype="float32")
    assert len(played) == len(written) > 0
    np.testing.assert_allclose(played, written, rtol=0, atol=1 / 32768 + 1e-7)  # the file holds 16-bit samples
