import json

import pytest
import torch

from fs_pipeline import PipelineError
from fs_pipeline.models import DERIVED_CODEC_BUFFERS, InPlaceSnake, build_codec, build_llm, load_codec, load_llm, load_llm_weights, model_identity, open_model_dir


def logits_of(llm) -> torch.Tensor:
    from fish_speech.models.text2semantic.llama import BaseTransformer

    torch.manual_seed(1)
    inp = torch.randint(0, llm.config.codebook_size, (1, llm.config.num_codebooks + 1, 12))
    inp[0, 0, 6:] += llm.tokenizer.semantic_begin_id  # the second half: semantic tokens, whose codes count too
    with torch.inference_mode():
        # The slow transformer's forward (DualARTransformer.forward is broken in fish-speech 0.1.0).
        return BaseTransformer.forward(llm, inp).logits


def test_save_load_gives_identical_logits(tiny_model_dir, tiny_model_copy, cpu):
    from safetensors.torch import save_file

    llm = load_llm(tiny_model_dir, cpu)
    expected = logits_of(llm)

    # Save the loaded weights in the other supported format and load them back.
    (tiny_model_copy / "model.pth").unlink()
    save_file({k: v.contiguous() for k, v in llm.state_dict().items()}, tiny_model_copy / "model.safetensors")
    reloaded = load_llm(open_model_dir(tiny_model_copy), cpu)
    assert torch.equal(logits_of(reloaded), expected)


def test_loader_really_loads_the_weights(tiny_model_dir, cpu):
    built = build_llm(tiny_model_dir)
    assert all(p.is_meta for p in built.parameters())  # nothing drawn at random: the loader assigns every weight
    loaded = load_llm(tiny_model_dir, cpu)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    saved = torch.load(tiny_model_dir.weights_file, weights_only=True)
    assert set(loaded.state_dict()) == set(saved)
    assert all(torch.equal(loaded.state_dict()[k], saved[k].float()) for k in saved)


def test_the_derived_tables_are_fish_speechs(tiny_model_dir):
    """RoPE tables and the causal mask, made beside the meta-built model, equal those fish-speech's __init__ makes."""
    from fish_speech.models.text2semantic.llama import BaseModelArgs, DualARTransformer

    theirs = DualARTransformer(BaseModelArgs.from_pretrained(str(tiny_model_dir.path / "config.json")), tokenizer=build_llm(tiny_model_dir).tokenizer)
    ours = build_llm(tiny_model_dir)
    names = {name for name, _ in theirs.named_buffers()}
    assert names == {name for name, _ in ours.named_buffers()} == {"freqs_cis", "causal_mask", "fast_freqs_cis"}
    for name in names:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)) and getattr(ours, name).dtype == getattr(theirs, name).dtype


def test_codec_round_trip_shapes(tiny_model_dir, cpu):
    codec = load_codec(tiny_model_dir, cpu)
    rate = tiny_model_dir.version.sample_rate
    audio = torch.randn(2, 1, rate)
    with torch.inference_mode():
        codes, lengths = codec.encode(audio, torch.tensor([rate, rate // 2]))
        decoded, _ = codec.decode(codes, lengths)
    assert codes.shape[:2] == (2, tiny_model_dir.num_codebooks)
    assert lengths.tolist() == [codes.shape[2], (codes.shape[2] + 1) // 2]
    assert decoded.shape[-1] == codes.shape[2] * codec.frame_length


def test_in_place_snakes_and_folded_weight_norm_give_the_library_codecs_values_exactly(tiny_model_dir, cpu):
    from dac.nn.layers import Snake1d

    codec = load_codec(tiny_model_dir, cpu)
    assert any(isinstance(m, InPlaceSnake) for m in codec.modules())
    assert not any(isinstance(m, Snake1d) for m in codec.modules())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in codec.modules())  # weight norm folded
    library = build_codec(tiny_model_dir.codec_cfg).eval()  # the library's layers, weight norm on every call
    state = torch.load(tiny_model_dir.path / "codec.pth", map_location="cpu", weights_only=True)
    missing, unexpected = library.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(DERIVED_CODEC_BUFFERS) for k in missing)
    rate = tiny_model_dir.version.sample_rate
    audio, lengths = 0.3 * torch.randn(2, 1, rate), torch.tensor([rate, rate // 2])
    with torch.inference_mode():
        codes, frames = codec.encode(audio, lengths)
        library_codes, library_frames = library.encode(audio, lengths)
        assert torch.equal(codes, library_codes) and torch.equal(frames, library_frames)
        assert torch.equal(codec.decode(codes, frames)[0], library.decode(codes, frames)[0])


def test_missing_tokenizer_is_named(tiny_model_copy):
    (tiny_model_copy / "tokenizer.tiktoken").unlink()
    with pytest.raises(PipelineError, match=r"is missing tokenizer\.tiktoken: copy the complete release"):
        open_model_dir(tiny_model_copy)


def test_missing_weights_are_named(tiny_model_copy):
    (tiny_model_copy / "model.pth").unlink()
    with pytest.raises(PipelineError, match=r"is missing model\.pth or model\.safetensors"):
        open_model_dir(tiny_model_copy)


def test_wrong_model_type(tiny_model_copy):
    config = json.loads((tiny_model_copy / "config.json").read_text())
    config["model_type"] = "naive"
    (tiny_model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="has model_type 'naive', but model version 's1-mini' needs 'dual_ar'"):
        open_model_dir(tiny_model_copy)


def test_codebook_mismatch_between_llm_and_codec(tiny_model_copy):
    config = json.loads((tiny_model_copy / "config.json").read_text())
    config["num_codebooks"] = 10
    (tiny_model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="codebook mismatch .* expects 10 codebooks but the codec produces 4"):
        open_model_dir(tiny_model_copy)


def test_unknown_model_version(tiny_model_path):
    with pytest.raises(PipelineError, match="unknown model version 'v9': known versions are s1-mini"):
        open_model_dir(tiny_model_path, "v9")


def test_missing_directory(tmp_path):
    with pytest.raises(PipelineError, match="model directory not found"):
        open_model_dir(tmp_path / "nope")


def test_truncated_weights_file(tiny_model_copy, cpu):
    weights = tiny_model_copy / "model.pth"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PipelineError, match=r"cannot read weights from .*model\.pth .*damaged; re-download"):
        load_llm(open_model_dir(tiny_model_copy), cpu)


def test_weights_that_do_not_fit_the_config(tiny_model_copy, cpu):
    config = json.loads((tiny_model_copy / "config.json").read_text())
    config["n_layer"] += 1
    (tiny_model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"lacks \d+ weights the config needs \(first: layers\.2\."):
        load_llm(open_model_dir(tiny_model_copy), cpu)


def test_identity_changes_with_the_weights(tiny_model_path, tiny_model_copy):
    before = model_identity(open_model_dir(tiny_model_path))
    assert model_identity(open_model_dir(tiny_model_copy)) == before
    state = torch.load(tiny_model_copy / "model.pth", weights_only=True)
    state["norm.weight"] += 1
    torch.save(state, tiny_model_copy / "model.pth")
    assert model_identity(open_model_dir(tiny_model_copy)) != before


def test_weights_left_unset_after_loading_are_an_error(tiny_model_dir):
    from fs_pipeline.lora import LoraSettings, add_lora

    with torch.device("meta"):  # adapters made without storage, which no release file fills
        model = build_llm(tiny_model_dir)
        add_lora(model, LoraSettings())
    with pytest.raises(PipelineError, match=r"model.pth left \d+ weights of the model unset \(first: .*lora_A\): load the release weights"):
        load_llm_weights(model, tiny_model_dir)
