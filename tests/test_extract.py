import importlib.util
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from fs_pipeline import PipelineError, models
from fs_pipeline.audio.io import read_wav
from fs_pipeline.dataset import Clip
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import FusedSnake, open_model_dir
from fs_pipeline.stages import extract
from fs_pipeline.tiny_model import write_tiny_model
from tests.test_models import codec_with_transformers


@pytest.fixture
def dataset(sample_dataset, tmp_path):
    return shutil.copytree(sample_dataset, tmp_path / "data")


def run(dataset, model_dir, cpu, manifest, batch_size=4):
    return extract.run(extract.ExtractSettings(dataset, batch_size=batch_size, num_workers=0), model_dir, cpu, manifest)


def test_codes_have_the_right_shape_and_dtype(dataset, tiny_model_dir, cpu, tmp_path):
    result = run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "m.json"))
    assert (result.extracted, result.skipped) == (6, 0)
    for wav in sorted(dataset.glob("*/*.wav")):
        codes = np.load(wav.with_suffix(".npy"))
        frames_expected = int(np.ceil(sf.info(wav).frames / 2048))
        assert codes.dtype == np.int64
        assert codes.shape == (tiny_model_dir.num_codebooks, frames_expected)
        assert codes.min() >= 0 and codes[0].max() < 64 and codes[1:].max() < 32


def test_batched_equals_one_at_a_time(dataset, tiny_model_dir, cpu, tmp_path):
    run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "batched.json"), batch_size=6)
    batched = {p.name: np.load(p) for p in dataset.glob("*/*.npy")}
    run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "single.json"), batch_size=1)
    single = {p.name: np.load(p) for p in dataset.glob("*/*.npy")}
    assert batched.keys() == single.keys() and len(single) == 6
    for name in single:
        np.testing.assert_array_equal(batched[name], single[name])


def test_batches_group_similar_lengths_within_count_and_seconds(tmp_path):
    seconds = {"a": 5.0, "b": 1.0, "c": 30.0, "d": 2.0, "e": 9.0, "f": 3.0, "g": 300.0}
    clips = [Clip(tmp_path / f"{k}.wav", "speaker", k) for k in seconds]
    batches = extract._batches_by_length(clips, seconds, batch_size=3, max_seconds=20.0)
    assert [[clips[i].key for i in batch] for batch in batches] == [["b", "d", "f"], ["a", "e"], ["c"], ["g"]]


def test_rerun_skips_and_changed_clip_is_redone(dataset, tiny_model_dir, cpu, tmp_path):
    manifest_path = tmp_path / "m.json"
    run(dataset, tiny_model_dir, cpu, Manifest(manifest_path))
    assert run(dataset, tiny_model_dir, cpu, Manifest(manifest_path)).extracted == 0

    clip = sorted(dataset.glob("*/*.wav"))[2]
    audio, rate = sf.read(clip)
    sf.write(clip, audio[: len(audio) // 2], rate)
    result = run(dataset, tiny_model_dir, cpu, Manifest(manifest_path))
    assert (result.extracted, result.skipped) == (1, 5)
    assert np.load(clip.with_suffix(".npy")).shape[1] == int(np.ceil(len(audio) // 2 / 2048))


def test_truncated_npy_is_detected_and_redone(dataset, tiny_model_dir, cpu, tmp_path):
    manifest_path = tmp_path / "m.json"
    run(dataset, tiny_model_dir, cpu, Manifest(manifest_path))
    npy = sorted(dataset.glob("*/*.npy"))[0]
    good = npy.read_bytes()
    npy.write_bytes(good[:100])
    with pytest.raises(PipelineError, match="is damaged"):
        extract.load_codes(npy)
    assert run(dataset, tiny_model_dir, cpu, Manifest(manifest_path)).extracted == 1
    assert npy.read_bytes() == good


def test_another_codec_redoes_everything(dataset, tiny_model_dir, cpu, tmp_path):
    manifest_path = tmp_path / "m.json"
    run(dataset, tiny_model_dir, cpu, Manifest(manifest_path))
    other = open_model_dir(write_tiny_model(tmp_path / "other", seed=7))
    assert run(dataset, other, cpu, Manifest(manifest_path)).extracted == 6


def test_every_pairing_problem_is_reported_before_work(dataset, tiny_model_dir, cpu, tmp_path):
    speaker = dataset / "sample_speaker"
    (speaker / "sample_0001.lab").unlink()
    (speaker / "sample_0002.lab").write_text("  \n")
    (speaker / "orphan.lab").write_text("no audio for this")
    with pytest.raises(PipelineError) as error:
        run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "m.json"))
    message = str(error.value)
    assert "has 3 problem(s)" in message
    assert "sample_speaker/sample_0001.wav has no .lab" in message
    assert "sample_speaker/sample_0002.lab is empty" in message
    assert "sample_speaker/orphan.lab has no .wav" in message
    assert not list(dataset.glob("*/*.npy"))


def test_undecodable_clip_is_named(dataset, tiny_model_dir, cpu, tmp_path):
    (dataset / "sample_speaker" / "sample_0003.wav").write_bytes(b"not audio at all")
    with pytest.raises(PipelineError, match=r"1 clip\(s\) in .* can't be decoded: sample_speaker/sample_0003.wav"):
        run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "m.json"))


def test_missing_dataset(tmp_path, tiny_model_dir, cpu):
    with pytest.raises(PipelineError, match="dataset not found"):
        run(tmp_path / "nothing", tiny_model_dir, cpu, Manifest(tmp_path / "m.json"))


@pytest.fixture
def interpreted_triton(monkeypatch):
    """The Snake kernel built for Triton's interpreter, which runs it on CPU tensors."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    models._bias_snake_residual_kernel.cache_clear()
    yield
    models._bias_snake_residual_kernel.cache_clear()  # the next user builds it for the GPU again


@pytest.mark.parametrize("shape, pad", [((3, 5, 1000), (0, 0)), ((2, 64, 4096), (0, 0)), ((1, 1, 1), (0, 0)),
                                        ((3, 5, 1000), (54, 0)), ((2, 4, 1030), (8, 3)), ((1, 2, 1), (0, 1024))])
def test_the_fused_snake_kernel_gives_the_library_snakes_values(interpreted_triton, shape, pad):
    from dac.nn.layers import snake

    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(*shape, generator=generator)
    alpha = 0.5 + torch.rand(1, shape[1], 1, generator=generator)  # a different alpha per channel
    # The interpreter computes sin with numpy, torch with its own: they may differ by an ulp, no more. The
    # padding is zeros, as the causal convolutions' own (exactly: a sign or a stray value is caught)
    expected = torch.nn.functional.pad(snake(x, alpha), pad)
    out = models.fused_snake(x, alpha, pad)
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=1e-6)
    assert torch.equal(out[..., : pad[0]], expected[..., : pad[0]])
    assert torch.equal(out[..., pad[0] + shape[-1] :], expected[..., pad[0] + shape[-1] :])


def test_the_fused_kernels_add_biases_and_residuals_as_the_library_does(interpreted_triton):
    from dac.nn.layers import snake

    x, alpha, bias, residual = 4 * torch.randn(2, 5, 1500), 0.5 + torch.rand(1, 5, 1), torch.randn(5), torch.randn(2, 5, 1500)
    out = models.fused_snake(x, alpha, (6, 1), bias)
    expected = torch.nn.functional.pad(snake(x + bias[:, None], alpha), (6, 1))
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=1e-6)
    assert not out[..., :6].any() and not out[..., -1].any()  # the padding stays zero, bias or not
    assert torch.equal(models.fused_bias_residual(x, bias, residual), residual + (x + bias[:, None]))


def test_fused_residual_units_give_the_library_codecs_features(interpreted_triton, tiny_model_dir):
    """The codec as load_codec makes it on CUDA (fused Snakes, joined to their convolutions, residual units fused),
    run by Triton's interpreter on the CPU, against the library's codec with the same weights."""
    from tests.test_models import weights_from_file

    library = weights_from_file(models.build_codec(tiny_model_dir.codec_cfg), tiny_model_dir.path).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the library initialises biases to zero: these catch a bias left out or added twice
        for name, bias in library.named_parameters():
            if name.endswith("bias"):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    codec = models.build_codec(tiny_model_dir.codec_cfg).eval()
    codec.load_state_dict(library.state_dict())
    codec = models.faster_layers(codec, FusedSnake, torch.device("cpu")).eval()
    assert sum(isinstance(m, models.FusedResidualUnit) for m in codec.modules()) == 24  # 12 in the encoder, 12 in the decoder
    # no whole number of frames, so the strided convolutions pad on the right too; short: the interpreter is slow
    audio = 0.3 * torch.randn(1, 1, 2048 + 37, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        # the CPU's convolutions add their bias in their own way, so equal within rounding rather than bit for bit
        torch.testing.assert_close(codec.encoder(audio), library.encoder(audio), rtol=1e-5, atol=1e-5)
        features = library.encoder(audio)
        torch.testing.assert_close(codec.decoder(features), library.decoder(features), rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # where autograd records: the unit's own forward, no kernel
        torch.testing.assert_close(codec.encoder(audio), library.encoder(audio), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [(0, 0), (18, 0), (3, 5)])
def test_the_in_place_snake_writes_the_library_snakes_values_into_the_padding(pad):
    from dac.nn.layers import snake

    x, alpha = 4 * torch.randn(2, 3, 100), 0.5 + torch.rand(1, 3, 1)
    out = models.InPlaceSnake(alpha)(x, pad)
    assert torch.equal(out, torch.nn.functional.pad(snake(x, alpha), pad))  # bit for bit, as the library's on CPU


def test_the_fused_snake_covers_more_rows_than_a_grid_holds(interpreted_triton, monkeypatch):
    from dac.nn.layers import snake

    monkeypatch.setattr(models, "MAX_GRID_ROWS", 4)  # 15 rows in four launches; each finds its rows' channels
    x, alpha, bias, residual = 4 * torch.randn(3, 5, 300), 0.5 + torch.rand(1, 5, 1), torch.randn(5), torch.randn(3, 5, 300)
    torch.testing.assert_close(models.fused_snake(x, alpha), snake(x, alpha), rtol=2e-7, atol=1e-6)
    torch.testing.assert_close(models.fused_snake(x, alpha, (3, 2), bias), torch.nn.functional.pad(snake(x + bias[:, None], alpha), (3, 2)),
                               rtol=2e-7, atol=1e-6)
    assert torch.equal(models.fused_bias_residual(x, bias, residual), residual + (x + bias[:, None]))


def test_fused_snake_computes_the_formula_where_autograd_records():
    x, alpha = torch.randn(2, 3, 50, requires_grad=True), torch.nn.Parameter(0.5 + torch.rand(1, 3, 1))
    out = FusedSnake(alpha)(x)  # on CPU with grad enabled: the torch-op formula, no kernel
    torch.testing.assert_close(out, models.snake(x, alpha), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and alpha.grad is not None


def test_where_the_fused_snake_cannot_run_the_codec_keeps_the_librarys():
    # a Triton kernel can't take CPU tensors outside the interpreter: the check fails, it doesn't raise
    assert models.fused_snake_works.__wrapped__(torch.device("cpu")) is False


@pytest.mark.parametrize("masks_on_device", [False, True])
def test_encode_gives_the_codecs_own_codes(masks_on_device):
    """extract.encode against the library codec's encode, with the library's transformers or load_codec's."""
    library = codec_with_transformers()
    codec = codec_with_transformers()  # the same weights (seeded)
    if masks_on_device:
        models._make_masks_on_device(codec)
    lengths = torch.tensor([9000, 44100, 30001])  # padded to the longest, which is no whole number of frames
    audio = 0.1 * torch.randn(3, 1, int(lengths.max()), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, frames = library.encode(audio, lengths)
        codes = extract.encode(codec, audio)
    assert codes.shape == expected.shape and codes.shape[1] == 4
    assert torch.equal(codes, expected)
    assert torch.equal(extract.frame_counts(lengths, codec.frame_length), frames)


def test_extracted_codes_are_the_codecs_own_one_clip_at_a_time(dataset, tiny_model_dir, cpu, tmp_path):
    run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "m.json"), batch_size=6)
    codec = models.load_codec(tiny_model_dir, cpu)
    for wav in sorted(dataset.glob("*/*.wav")):
        audio = torch.from_numpy(read_wav(wav, tiny_model_dir.version.sample_rate))
        with torch.inference_mode():
            codes, frames = codec.encode(audio[None, None], torch.tensor([len(audio)]))
        np.testing.assert_array_equal(np.load(wav.with_suffix(".npy")), codes[0, :, : frames[0]].numpy())


def test_a_failed_write_stops_the_run_after_the_batches_before_it(dataset, tiny_model_dir, cpu, tmp_path):
    # the writing thread's error reaches the caller, and the records name exactly the files written before it
    wavs = sorted(dataset.glob("*/*.wav"), key=lambda wav: sf.info(wav).frames)
    wavs[-1].with_suffix(".npy").mkdir()  # the longest clip, so the last batch
    with pytest.raises(OSError):
        run(dataset, tiny_model_dir, cpu, Manifest(tmp_path / "m.json"), batch_size=1)
    records = json.loads((dataset / extract.CODES_RECORD).read_text())["clips"]
    assert sorted(records) == sorted(wav.relative_to(dataset).as_posix() for wav in wavs[:-1])
    assert all(wav.with_suffix(".npy").is_file() for wav in wavs[:-1])
