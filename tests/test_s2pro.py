"""S2-Pro: the release layout and its loader, the tokenizer, the chat prompt, the era check, our module tree
against an independent computation, generation against training, LoRA + merge, and the whole pipeline."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from fs_pipeline import PipelineError, s2pro
from fs_pipeline.lora import LoraSettings, add_lora
from fs_pipeline.modeling import fast_forward, frame_index, slow_forward
from fs_pipeline.models import build_llm, load_llm, load_llm_weights, load_tokenizer, open_model_dir, read_weights
from fs_pipeline.prompt import prompt_values, sequence_length, training_example
from fs_pipeline.stages import merge
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model
from tests.conftest import TRAIN, cli


@pytest.fixture(scope="session")
def s2_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-s2", seed=0, version_name="s2-pro")


@pytest.fixture(scope="session")
def s2_dir(s2_path):
    return open_model_dir(s2_path, "s2-pro")


@pytest.fixture
def s2_copy(s2_path, tmp_path):
    return shutil.copytree(s2_path, tmp_path / "s2-model")


def turns(config, *lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    texts = ["The sun rose slowly.", "Seven children walked home.", "A cold wind blew."]
    return [(texts[i], torch.randint(0, config["codebook_size"], (config["num_codebooks"], n), generator=generator))
            for i, n in enumerate(lengths)]


def test_release_layout_sharded_and_memory_mapped(s2_dir, s2_copy):
    names = {f.name for f in s2_dir.path.iterdir()}
    assert {"config.json", "tokenizer.json", "codec.pth", s2pro.INDEX_FILE} <= names
    assert "model.pth" not in names and "tokenizer.tiktoken" not in names
    index = json.loads((s2_dir.path / s2pro.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all(k.startswith((s2pro.SLOW_PREFIX, s2pro.FAST_PREFIX)) for k in index["weight_map"])
    assert json.loads((s2_dir.path / "config.json").read_text())["model_type"] == "fish_qwen3_omni"
    assert s2_dir.weight_files == [s2_dir.path / s2pro.INDEX_FILE, *(s2_dir.path / n for n in sorted(set(index["weight_map"].values())))]

    # A loaded weight reads the shard's bytes where they lie: rewriting them in the file changes the tensor.
    model_dir = open_model_dir(s2_copy, "s2-pro")
    model = build_llm(model_dir)
    load_llm_weights(model, model_dir)
    weight = model.layers[0].feed_forward.w2.weight
    assert weight.dtype == torch.bfloat16 and not weight.is_meta
    shard = s2_copy / index["weight_map"]["text_model.model.layers.0.feed_forward.w2.weight"]
    header = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
    start = 8 + int.from_bytes(shard.read_bytes()[:8], "little") + header["text_model.model.layers.0.feed_forward.w2.weight"]["data_offsets"][0]
    fd = os.open(shard, os.O_WRONLY)
    try:
        os.pwrite(fd, torch.tensor([3.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(), start)
    finally:
        os.close(fd)
    assert weight.flatten()[0].item() == 3.0


def test_tokenizer_round_trip_and_semantic_ids(s2_dir, s2_copy):
    tokenizer = load_tokenizer(s2_dir)
    text = "The weather is calm, über-nice!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("<|im_end|>")) == 1
    assert tokenizer.get_token_id("<|semantic:5|>") == tokenizer.semantic_begin_id + 5
    assert (tokenizer.semantic_begin_id, tokenizer.semantic_end_id) == (s2_dir.config["semantic_begin_id"], s2_dir.config["semantic_end_id"])

    data = json.loads((s2_copy / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|semantic:7|>"]
    (s2_copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=r"tokenizer.json lacks the token <\|semantic:7\|>"):
        build_llm(open_model_dir(s2_copy, "s2-pro"))


def test_chat_prompt_format(s2_dir):
    tokenizer = load_tokenizer(s2_dir)
    n = s2_dir.config["num_codebooks"]
    utterances = turns(s2_dir.config, 5, 3)
    inputs, labels = training_example(tokenizer, utterances, n)
    frames = [f"<|semantic:{c}|>" for c in utterances[0][1][0].tolist()]
    assert tokenizer.decode(inputs[0].tolist()).startswith(
        "<|im_start|>system\nconvert the provided text to speech<|im_end|>\n<|im_start|>user\nThe sun rose slowly.<|im_end|>\n"
        "<|im_start|>assistant\n<|voice|>" + "".join(frames) + "<|im_end|>\n<|im_start|>user\nSeven children walked home."
    )
    # loss on every frame and the <|im_end|> closing each turn, nothing else
    targets = labels[0][labels[0] != -100]
    end = tokenizer.get_token_id("<|im_end|>")
    assert (targets == end).sum() == 2 and ((targets >= tokenizer.semantic_begin_id) & (targets <= tokenizer.semantic_end_id)).sum() == 8
    is_frame = labels[0] >= tokenizer.semantic_begin_id
    assert torch.equal(labels[1:, is_frame], torch.cat([c for _, c in utterances], dim=1))
    assert (labels[1:, ~is_frame] == -100).all()
    assert inputs.shape[1] + 1 <= sequence_length(tokenizer, utterances[0][0], 5) + sequence_length(tokenizer, utterances[1][0], 3)

    # a reference goes into the system turn, its frames as context; the text's turn stays open for the frames
    reference = turns(s2_dir.config, 4, seed=1)[0]
    prompt = prompt_values(tokenizer, [reference, ("Hello there.", None)], n)
    text = tokenizer.decode(prompt[0].tolist())
    assert text.startswith("<|im_start|>system\nconvert the provided text to speech reference to the following:\n\nText:\n"
                           "<|speaker:0|>The sun rose slowly.\n\nSpeech:\n<|semantic:")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nHello there.<|im_end|>\n<|im_start|>assistant\n<|voice|>")
    assert torch.equal(prompt[1:, prompt[0] >= tokenizer.semantic_begin_id], reference[1])


def test_era_check_refuses_mixed_generations(s2_copy, tiny_model_copy):
    with pytest.raises(PipelineError, match=r"holds an s2-pro LLM \(config.json model_type 'fish_qwen3_omni'\), not an s1-mini one: "
                                            r"pass --model-version s2-pro"):
        open_model_dir(s2_copy)
    with pytest.raises(PipelineError, match="holds an s1-mini LLM .* pass --model-version s1-mini"):
        open_model_dir(tiny_model_copy, "s2-pro")

    for name in ("codec.pth", "codec_config.yaml"):  # an s1-mini codec in the s2-pro folder
        shutil.copy(tiny_model_copy / name, s2_copy / name)
    with pytest.raises(PipelineError, match=r"codec_config.yaml is an s1-mini codec \(transformer block sizes 16384\), but config.json "
                                            r"in .* is an s2-pro LLM: the LLM and codec come from different model versions"):
        open_model_dir(s2_copy, "s2-pro")

    # the s1-mini tokenizer beside an s2-pro config
    (s2_copy / "tokenizer.json").unlink()
    for name in ("tokenizer.tiktoken", "special_tokens.json"):
        shutil.copy(tiny_model_copy / name, s2_copy / name)
    with pytest.raises(PipelineError, match="holds special_tokens.json, tokenizer.tiktoken, the s1-mini tokenizer, but its config.json "
                                            "is an s2-pro LLM, whose tokenizer is tokenizer.json"):
        open_model_dir(s2_copy, "s2-pro")


def test_codec_checkpoint_of_another_generation_is_refused(s2_copy):
    """A codec checkpoint that holds its transformers' position tables shows their length."""
    state = torch.load(s2_copy / "codec.pth", weights_only=True)
    state["quantizer.pre_module.freqs_cis"] = torch.zeros(4096, 32, 2)  # s1-mini's quantizer block size
    torch.save(state, s2_copy / "codec.pth")
    with pytest.raises(PipelineError, match=r"codec.pth is an s1-mini codec \(transformer block sizes 4096\)"):
        open_model_dir(s2_copy, "s2-pro")


# An independent computation of S2-Pro's forward, written from the architecture's description with other means
# than fs_pipeline.s2pro's (complex-number RoPE, explicit attention weights, grouped heads by reshape).
def _norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _block(x, p, prefix, heads, kv_heads, head_dim, eps, positions, base, qk_norm):
    length = x.shape[0]
    h = _norm(x, p[f"{prefix}attention_norm.weight"], eps)
    qkv = h @ p[f"{prefix}attention.wqkv.weight"].T
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(length, -1, head_dim) for t in (q, k, v))
    if qk_norm:
        q, k = _norm(q, p[f"{prefix}attention.q_norm.weight"], eps), _norm(k, p[f"{prefix}attention.k_norm.weight"], eps)
    angle = positions[:, None].double() / base ** (torch.arange(0, head_dim, 2).double() / head_dim)
    turn = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)
    # the release's tables are bf16: so are these
    turn = torch.complex(turn.real.bfloat16().float(), turn.imag.bfloat16().float())[:, None]
    q, k = (torch.view_as_real(torch.view_as_complex(t.reshape(length, -1, head_dim // 2, 2)) * turn).flatten(2) for t in (q, k))
    q = q.reshape(length, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum("qgrd,kgd->grqk", q, k) / head_dim**0.5
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("grqk,kgd->qgrd", scores.softmax(-1), v).reshape(length, heads * head_dim)
    x = x + out @ p[f"{prefix}attention.wo.weight"].T
    h = _norm(x, p[f"{prefix}ffn_norm.weight"], eps)
    return x + (F.silu(h @ p[f"{prefix}feed_forward.w1.weight"].T) * (h @ p[f"{prefix}feed_forward.w3.weight"].T)) @ p[f"{prefix}feed_forward.w2.weight"].T


def _reference(c: s2pro.S2ProConfig, p, ids, codes, frames, frame_codes):
    """Token logits (length, vocab) and codebook logits (frames, n, size) of one sequence."""
    n, length = c.num_codebooks, len(ids)
    semantic = (ids >= c.semantic_begin_id) & (ids <= c.semantic_end_id)
    x = p["embeddings.weight"][ids].clone()
    for i in range(n):
        x[semantic] += p["codebook_embeddings.weight"][codes[i] + i * c.codebook_size][semantic]
    x[semantic] /= (n + 1) ** 0.5
    for layer in range(c.n_layer):
        x = _block(x, p, f"layers.{layer}.", c.n_head, c.n_local_heads, c.head_dim, c.norm_eps, torch.arange(length),
                   c.rope_base, c.attention_qk_norm)
    normed = _norm(x, p["norm.weight"], c.norm_eps)
    token_logits = normed @ p["embeddings.weight"].T
    fast_in = normed[frames] @ p["fast_project_in.projection.weight"].T + p["fast_project_in.projection.bias"]
    logits = []
    for frame, frame_code in zip(fast_in, frame_codes):
        y = torch.cat([frame[None], p["fast_embeddings.weight"][frame_code[:-1]]])
        for layer in range(c.n_fast_layer):
            y = _block(y, p, f"fast_layers.{layer}.", c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim, c.fast_norm_eps,
                       torch.arange(n), c.fast_rope_base, c.fast_attention_qk_norm)
        logits.append(_norm(y, p["fast_norm.weight"], c.fast_norm_eps) @ p["fast_output.weight"].T)
    return token_logits, torch.stack(logits)


@pytest.fixture(scope="module")
def projected_model(s2_dir):
    """The tiny config with a narrower fast transformer (a projection between them), unit-scale random weights."""
    config = s2pro.S2ProConfig(**{**s2_dir.config, "fast_dim": 48, "fast_n_head": 3, "fast_n_local_heads": 1,
                                   "fast_intermediate_size": 96})
    torch.manual_seed(0)
    model = s2pro.S2ProTransformer(config, load_tokenizer(s2_dir)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) * (1 if "embeddings" in name else p.shape[1] ** -0.5))
    return model


def test_forward_equals_independent_computation(projected_model):
    model, config = projected_model, projected_model.config
    inputs, labels = training_example(model.tokenizer, turns(config.as_dict(), 6, 4), config.num_codebooks)
    with torch.no_grad():
        token_logits, hidden = slow_forward(model, inputs[None])
        frames = frame_index(model, labels[None])
        frame_codes = labels[1:].T[frames]
        codebook_logits = fast_forward(model, hidden[0][frames], frame_codes)
        params = dict(model.named_parameters())
        expected_tokens, expected_codebooks = _reference(config, params, inputs[0], inputs[1:], frames, frame_codes)
    # Another order of fp32 arithmetic (einsum attention, complex rotation) moves logits by up to 4e-7 of the largest;
    # a real slip (a missing scale, norm or rotation, pairs rotated the other way) moves them by a good fraction of it.
    for ours, expected in ((token_logits[0], expected_tokens), (codebook_logits, expected_codebooks)):
        assert expected.abs().max() > 1  # logits at unit scale, not squashed towards 0
        torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


def test_generation_with_caches_equals_training_forward(projected_model):
    """Synthesis (prefill, then one position at a time through the KV caches) computes the training forward's logits."""
    model, config = projected_model, projected_model.config
    inputs, labels = training_example(model.tokenizer, turns(config.as_dict(), 5), config.num_codebooks)
    inputs = inputs[None]
    with torch.no_grad():
        token_logits, hidden = slow_forward(model, inputs)
        model.setup_caches(max_batch_size=1, max_seq_len=config.max_seq_len, dtype=torch.float32)
        prefill = 10
        steps = [model.forward_generate(inputs[..., :prefill], torch.arange(prefill))]
        steps += [model.forward_generate(inputs[..., i : i + 1], torch.tensor([i])) for i in range(prefill, inputs.shape[-1])]
        generated = torch.cat([s.logits[0] for s in steps])
        # attention over the whole cache (masked) sums in another order: up to 3e-7 of the largest logit apart
        scale = token_logits.abs().max().item()
        torch.testing.assert_close(generated, token_logits[0, prefill - 1 :], rtol=0, atol=2e-6 * scale)

        frame = int(frame_index(model, labels[None])[2])
        codes = labels[1:, frame]
        model.forward_generate_fast(steps[frame - prefill + 1].hidden_states, torch.tensor([0]))
        fast = [model.forward_generate_fast(model.fast_embeddings(codes[i - 1 : i]), torch.tensor([i])) for i in range(1, config.num_codebooks)]
        expected = fast_forward(model, hidden[0, frame : frame + 1], codes[None])
        torch.testing.assert_close(torch.cat(fast, dim=1)[0], expected[0, 1:], rtol=0, atol=2e-6 * expected.abs().max().item())


def test_lora_merge_round_trip_writes_sharded_release(s2_dir, cpu, tmp_path):
    adapted = build_llm(s2_dir)
    load_llm_weights(adapted, s2_dir)
    adapted.float()
    add_lora(adapted, LoraSettings(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted.eval()
    state = merge.merged_weights(adapted)
    folder = tmp_path / "merged"
    folder.mkdir()
    merge._write_model_dir(folder, s2_dir, {k: v.to(torch.bfloat16) for k, v in state.items()})
    stored = open_model_dir(folder, "s2-pro")
    assert len(stored.weight_files) == 2  # the index and one shard (a tiny model fits one)
    assert set(json.loads((folder / s2pro.INDEX_FILE).read_text())["weight_map"]) == {s2pro.release_key(k) for k in state}
    assert {k: v.shape for k, v in read_weights(stored).items()} == {k: v.shape for k, v in state.items()}

    check = merge.merge_check(adapted, state, stored)
    assert check["passed"] and check["storage_dtype"] == "bfloat16"
    # the check is not vacuous: the adapters moved the logits by far more than its tolerance
    base = load_llm(s2_dir, cpu)
    inputs, labels = merge.probe_batch(adapted)
    moved = (merge.probe_logits(base, inputs, labels) - merge.probe_logits(adapted, inputs, labels)).abs().max().item()
    assert moved > 100 * check["tolerance"]


def test_synthesis_with_reference_audio(s2_dir, cpu, sample_dataset):
    clip = next(sample_dataset.rglob("*.wav"))
    synthesizer = Synthesizer(s2_dir, cpu)
    synthesizer.set_reference(clip, clip.with_suffix(".lab").read_text())
    assert synthesizer.reference[0][1].shape[0] == s2_dir.num_codebooks
    speech = synthesizer.render("Hello there.", SynthesisSettings(max_new_frames=6))
    assert speech.frames == 6 and speech.cut_off == "max_new_frames" and len(speech.audio) > 0


def test_full_pipeline_on_s2pro(s2_path, sample_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sample_dataset, tmp_path / "training_data" / "voice")
    flags = ["--project", "p", "--data-dir", "training_data/voice", "--pretrained-ckpt-path", str(s2_path), "--model-version", "s2-pro",
             "--num-workers-extract", "0", "--device", "cpu", *TRAIN]
    done = cli(*flags, "--full-pipeline")
    assert done.exit_code == 0, done.output
    assert "Ran: extract, pack, train, merge, synthesize" in done.output
    merged = open_model_dir(tmp_path / "checkpoints" / "p-merged", "s2-pro")
    assert merged.weights_file.name == s2pro.INDEX_FILE and (merged.path / "tokenizer.json").is_file()
    manifest = json.loads((merged.path / "manifest.json").read_text())
    assert manifest["merge_check"]["passed"] and manifest["base_model"]["version"] == "s2-pro"
    assert (tmp_path / "results" / "p" / "test_clip.wav").stat().st_size > 1000
    assert "Ran: nothing (all up to date)" in cli(*flags, "--full-pipeline").output
