import json

import pytest
import torch
import yaml

from fs_pipeline import PipelineError, models
from fs_pipeline.models import (CODEC_CONFIG_FILE, DERIVED_CODEC_BUFFERS, InPlaceSnake, build_codec, build_llm, codec_skeleton, load_codec,
                                load_llm, load_llm_weights, model_identity, open_model_dir)


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
    # every causal convolution after a Snake reads the padded buffer the Snake writes (29 in the encoder, 25 in the decoder)
    assert sum(isinstance(m, models.SnakeThenCausalConv) for m in codec.modules()) == 54
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in codec.modules())  # weight norm folded
    library = weights_from_file(build_codec(tiny_model_dir.codec_cfg), tiny_model_dir.path).eval()  # weight norm on every call
    assert_same_codes_and_audio(codec, library, tiny_model_dir.version.sample_rate)
    # no whole number of frames (encode pads to one): the strided convolutions pad on the right as well
    audio = 0.3 * torch.randn(2, 1, 2048 + 37, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(codec.encoder(audio), library.encoder(audio))
    assert torch.equal(codec.encoder(audio), library.encoder(audio))  # where autograd records: the library's formula


def test_on_mps_the_snakes_are_not_joined_to_their_convolutions(tiny_model_dir, monkeypatch):
    # an MPS device can't exist here: the move is left out, what faster_layers decides for MPS is what is checked
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, *args, **kwargs: module)
    codec = models.faster_layers(build_codec(tiny_model_dir.codec_cfg), InPlaceSnake, torch.device("mps"))
    assert any(isinstance(m, InPlaceSnake) for m in codec.modules())
    assert not any(isinstance(m, (models.SnakeThenCausalConv, models.FusedResidualUnit)) for m in codec.modules())


def weights_from_file(codec, model_path):
    """`codec` with the weights of model_path's codec.pth copied over its own (all but the derived tables)."""
    state = torch.load(model_path / "codec.pth", map_location="cpu", weights_only=True)
    missing, unexpected = codec.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(DERIVED_CODEC_BUFFERS) for k in missing)
    return codec


def assert_same_codes_and_audio(ours, theirs, rate):
    """Both codecs give the same codes and frame counts for two random clips, and the same audio back from them."""
    audio, lengths = 0.3 * torch.randn(2, 1, rate), torch.tensor([rate, rate // 2])
    with torch.inference_mode():
        codes, frames = ours.encode(audio, lengths)
        their_codes, their_frames = theirs.encode(audio, lengths)
        assert torch.equal(codes, their_codes) and torch.equal(frames, their_frames)
        assert torch.equal(ours.decode(codes, frames)[0], theirs.decode(codes, frames)[0])


def with_codec_transformers(model_path) -> None:
    """Gives the model folder's codec the release's quantizer transformers (small): layers whose RoPE tables and causal
    masks the codec derives from its config rather than loads, which the tiny kit's codec does not have."""
    file = model_path / CODEC_CONFIG_FILE
    cfg = yaml.safe_load(file.read_text())
    transformer = {"_target_": "fish_speech.models.dac.modded_dac.WindowLimitedTransformer", "causal": True, "window_size": 128,
                   "input_dim": cfg["quantizer"]["input_dim"],
                   "config": {"_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "block_size": 4096, "n_layer": 1, "n_head": 2,
                              "dim": 32, "intermediate_size": 64, "head_dim": 16, "channels_first": True}}
    cfg["quantizer"].update(pre_module=transformer, post_module=transformer)
    file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(3)
    codec = build_codec(open_model_dir(model_path).codec_cfg)
    torch.save({k: v for k, v in codec.state_dict().items() if not k.endswith(DERIVED_CODEC_BUFFERS)}, model_path / "codec.pth")


def test_the_codec_is_built_without_random_weights_and_loads_as_the_randomly_built_one(tiny_model_copy, cpu):
    """load_codec builds on the meta device and assigns the file's tensors; before, it built the codec with random
    weights and copied the file's over them. Same tables, same weights, same codes and audio."""
    with_codec_transformers(tiny_model_copy)
    model_dir = open_model_dir(tiny_model_copy)
    skeleton = codec_skeleton(model_dir.codec_cfg, model_dir.version, "test")
    assert all(p.is_meta for p in skeleton.parameters())  # nothing drawn: load_codec assigns every weight
    random = build_codec(model_dir.codec_cfg)
    models._make_masks_on_device(random)  # as load_codec's: the causal transformers' stored masks emptied
    derived = dict(random.named_buffers())
    assert {name.rpartition(".")[2] for name in derived} == set(DERIVED_CODEC_BUFFERS)
    assert derived.keys() == dict(skeleton.named_buffers()).keys()
    for name, table in skeleton.named_buffers():
        assert torch.equal(table, derived[name]) and table.dtype == derived[name].dtype, name
    assert all(m.causal_mask.shape == (0, 0) for m in skeleton.modules() if models._makes_own_masks(m))

    # the old way: random weights, the file's copied over them, then what load_codec does to them
    weights_from_file(random, tiny_model_copy)
    old, loaded = models.faster_layers(random, InPlaceSnake, cpu.device).eval(), load_codec(model_dir, cpu)
    assert old.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) and v.dtype == loaded.state_dict()[k].dtype for k, v in old.state_dict().items())
    assert_same_codes_and_audio(loaded, old, model_dir.version.sample_rate)


def codec_with_transformers():
    """A small codec with every transformer the release's runs (the encoder's last block, with fish-speech's window of
    512, and the quantizer's pre- and post-module, with a window of 8), randomly initialised, in eval mode."""
    from omegaconf import OmegaConf

    from fs_pipeline.tiny_model import codec_config

    torch.manual_seed(0)
    config = codec_config(44100, semantic=64, residual=3, residual_size=32, block_size=4096)
    config["encoder_transformer_layers"] = [0, 0, 0, 1]  # 64 channels there: one head of 64
    transformer = {
        "_target_": "fish_speech.models.dac.modded_dac.WindowLimitedTransformer", "causal": True, "window_size": 8,
        "input_dim": 64, "config": {"_target_": "fish_speech.models.dac.modded_dac.ModelArgs", "block_size": 4096,
                                    "n_layer": 2, "n_head": 2, "dim": 32, "head_dim": 16, "intermediate_size": 64},
    }
    config["quantizer"] |= {"pre_module": transformer, "post_module": transformer}
    return build_codec(OmegaConf.create(config)).eval()


@pytest.mark.parametrize("window_size", [None, 0, 1, 3, 8, 128, 512])
def test_causal_window_masks_are_fish_speechs(window_size):
    from fish_speech.models.dac.modded_dac import ModelArgs, WindowLimitedTransformer

    layer = WindowLimitedTransformer(ModelArgs(block_size=1024, n_layer=1, n_head=1, dim=16, head_dim=16, intermediate_size=16),
                                     input_dim=16, window_size=window_size)
    for length in (1, 2, 7, 8, 9, 130, 600):
        # the one fish-speech's forward picks
        theirs = layer.make_mask(length) if window_size is None else layer.make_window_limited_mask(length)
        ours = models.causal_window_mask(length, window_size, torch.device("cpu"))
        assert ours.dtype == theirs.dtype == torch.bool and ours.shape == theirs.shape == (1, 1, length, length)
        assert ours.stride() == theirs.stride()  # the layout the attention kernels see
        assert torch.equal(ours, theirs), (length, window_size)


def test_masks_made_on_the_device_give_the_library_codecs_codes_and_audio(monkeypatch):
    """Encode and decode with the masks made by causal_window_mask equal fish-speech's, over more positions than
    every window (the encoder's 512, the quantizer's 8)."""
    from fish_speech.models.dac.modded_dac import WindowLimitedTransformer

    library = codec_with_transformers()
    codec = codec_with_transformers()  # the same weights (seeded)
    models._make_masks_on_device(codec)
    transformers = [m for m in codec.modules() if isinstance(m, WindowLimitedTransformer)]
    assert len(transformers) == 3 and all("forward" in vars(m) for m in transformers)
    audio = 0.1 * torch.randn(2, 1, 7 * 44100, generator=torch.Generator().manual_seed(1))  # 603 encoder positions
    lengths = torch.tensor([7 * 44100, 3 * 44100])
    with torch.inference_mode():
        library_codes, library_frames = library.encode(audio, lengths)
        library_audio = library.decode(library_codes, library_frames)[0]
        with monkeypatch.context() as patched:  # fish-speech's mask builders never run in the swapped codec
            for name in ("make_mask", "make_window_limited_mask"):
                patched.setattr(WindowLimitedTransformer, name, None)
            codes, frames = codec.encode(audio, lengths)
            decoded = codec.decode(codes, frames)[0]
    assert codes.shape[-1] > 8
    assert torch.equal(codes, library_codes) and torch.equal(frames, library_frames)
    assert torch.equal(decoded, library_audio)


def test_a_non_causal_transformer_keeps_fish_speechs_forward():
    from fish_speech.models.dac.modded_dac import ModelArgs, WindowLimitedTransformer

    layer = WindowLimitedTransformer(ModelArgs(block_size=64, n_layer=1, n_head=1, dim=16, head_dim=16, intermediate_size=16),
                                     input_dim=16, causal=False)
    models._make_masks_on_device(torch.nn.Sequential(layer))
    assert "forward" not in vars(layer)


def test_the_loaded_codec_makes_its_masks_on_the_device(tiny_model_copy, cpu):
    from fish_speech.models.dac.modded_dac import WindowLimitedTransformer

    with_codec_transformers(tiny_model_copy)
    codec = load_codec(open_model_dir(tiny_model_copy), cpu)
    transformers = [m for m in codec.modules() if isinstance(m, WindowLimitedTransformer)]
    assert transformers and all(vars(m)["forward"].__func__ is models._causal_transformer_forward for m in transformers)


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
