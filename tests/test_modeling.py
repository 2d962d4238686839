"""Our forward and loss against fish-speech's own inference code, and the shared prompt format.

The reference is fish-speech 0.1.0 decoding the training sequence teacher-forced, as its inference code
runs: KV caches from `setup_caches`, the prompt prefilled by `forward_generate` (return_all=True), then
one position at a time, and wherever a frame follows, the fast transformer step by step with its own caches, as
`decode_one_token_ar` does. Upstream knows nothing of batches or padding: each row runs alone, unpadded.

The batch holds rows of different lengths (right-padded) and a packed row of several utterances.

Tolerance: 1e-5 absolute on logits, fp32 on CPU. The random tiny model's logits lie within +-0.7 (std
0.16), and batched attention rounds differently from attention against a KV cache by at most 3e-7 here:
1e-5 leaves 30x headroom for other BLAS builds. Real bugs move logits by far more than that: without
the codebook-embedding scale by 0.19, with the fast transformer fed the wrong codes or the normed hidden
state by 0.3 to 0.6, with attention that sees the rest of the row by 0.7. Label-side bugs (a shift by
one, a codebook target off by one, a wrong count) do not touch logits: the loss test catches those.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fs_pipeline import modeling
from fs_pipeline.modeling import IGNORE, _attention_by_sums, fast_forward, forward, frame_index, slow_forward, target_counts, use_grouped_attention
from fs_pipeline.models import load_llm
from fs_pipeline.prompt import prompt_values, training_example

LOGITS = dict(rtol=0, atol=1e-5)
# Cross-entropy is logsumexp(z) - z[target]: logits within 1e-5 move each target's loss by at most 2e-5.
PER_TARGET = 2e-5
# Rows of (text, frames) turns: two single utterances of different lengths and a packed row.
ROWS = [[("Hello there.", 6)], [("Hi.", 3), ("The weather is calm.", 5), ("Yes.", 4)], [("One two three four.", 9)]]


def codes_for(model, frames: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, 32, (model.config.num_codebooks, frames))


def batch_rows(model) -> list[list[tuple[str, torch.Tensor]]]:
    """ROWS with random codes over the whole codebook (semantic ids up to the last one)."""
    generator = torch.Generator().manual_seed(0)
    n, size = model.config.num_codebooks, model.config.codebook_size
    return [[(text, torch.randint(0, size, (n, frames), generator=generator)) for text, frames in row] for row in ROWS]


def pad(model, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Training examples right-padded as the train loop pads them: 0 inputs, IGNORE labels."""
    examples = [training_example(model.tokenizer, turns, model.config.num_codebooks) for turns in rows]
    length = max(x.shape[1] for x, _ in examples)
    inputs = torch.zeros(len(examples), model.config.num_codebooks + 1, length, dtype=torch.long)
    labels = torch.full_like(inputs, IGNORE)
    for i, (x, y) in enumerate(examples):
        inputs[i, :, : x.shape[1]] = x
        labels[i, :, : y.shape[1]] = y
    return inputs, labels


def is_semantic(model, ids: torch.Tensor) -> torch.Tensor:
    return (ids >= model.tokenizer.semantic_begin_id) & (ids <= model.tokenizer.semantic_end_id)


def upstream_decode(model, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fish-speech's token logits at positions 0..length-2 of `sequence` (num_codebooks + 1, length), and
    its codebook logits (frames, num_codebooks, codebook_size) at each of those positions that the next
    position is a frame, fed that frame's codes as synthesis feeds what it sampled."""
    from fish_speech.models.text2semantic.llama import BaseTransformer

    n, begin = model.config.num_codebooks, model.tokenizer.semantic_begin_id
    length = sequence.shape[1]
    prompt_length = int(is_semantic(model, sequence[0]).nonzero()[0])  # synthesis prompts up to the audio
    # inference sizes the caches to config.max_seq_len; the causal mask hides every cache slot past the
    # query, so caches of the sequence's length give the same logits, sooner
    model.setup_caches(max_batch_size=1, max_seq_len=length, dtype=torch.float32)
    # DualARTransformer.forward_generate has no return_all; it is its parent's plus fast_project_in
    prompt = sequence[None, :, :prompt_length]
    prefill = BaseTransformer.forward_generate(model, prompt, torch.arange(prompt_length), return_all=True)
    logits, hidden = [prefill.logits[0]], [model.fast_project_in(prefill.hidden_states[0])]
    for t in range(prompt_length, length - 1):
        step = model.forward_generate(sequence[None, :, t : t + 1], torch.tensor([t]))
        logits.append(step.logits[0])
        hidden.append(step.hidden_states[0])
    hidden = torch.cat(hidden)

    codebook_logits = []
    for t in (is_semantic(model, sequence[0, 1:])).nonzero().squeeze(1).tolist():
        for layer in model.fast_layers:
            layer.attention.kv_cache.k_cache.fill_(0)
            layer.attention.kv_cache.v_cache.fill_(0)
        # as decode_one_token_ar: codebook 0 from the semantic token, then the frame's codes 1..n-2
        fed = torch.cat([sequence[0, t + 1 : t + 2] - begin, sequence[2:n, t + 1]])
        steps = [hidden[t : t + 1]] + [model.fast_embeddings(fed[i : i + 1]) for i in range(n - 1)]
        codebook_logits.append(torch.cat([model.forward_generate_fast(x, torch.tensor([i]))[0] for i, x in enumerate(steps)]))
    return torch.cat(logits), torch.stack(codebook_logits)


@pytest.fixture(scope="module")
def upstream(tiny_model_dir, cpu) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row of the batch: its unshifted sequence, and upstream_decode's token and codebook logits."""
    model = load_llm(tiny_model_dir, cpu)  # a private one: setup_caches changes it
    sequences = [prompt_values(model.tokenizer, turns, model.config.num_codebooks) for turns in batch_rows(model)]
    with torch.inference_mode():
        return [(sequence, *upstream_decode(model, sequence)) for sequence in sequences]


def reference_losses(model, sequence: torch.Tensor, token_logits: torch.Tensor, codebook_logits: torch.Tensor) -> dict:
    """Summed cross-entropies and target counts by the format's rules, from the unshifted sequence: position
    t predicts position t+1; only predictions of a frame or of the <|im_end|> closing a turn count (the
    text is given, not learnt); where t+1 is a frame, codebook k's target is its code k."""
    following = sequence[:, 1:]
    counted = is_semantic(model, following[0]) | (following[0] == model.tokenizer.get_token_id("<|im_end|>"))
    targets = following[0, counted]
    rows = token_logits[counted]
    token_ce = rows.logsumexp(-1) - rows.gather(-1, targets[:, None])[:, 0]
    codes = following[1:, is_semantic(model, following[0])].T  # (frames, num_codebooks)
    codebook_ce = codebook_logits.logsumexp(-1) - codebook_logits.gather(-1, codes[..., None])[..., 0]
    return {
        "token_sum": token_ce.sum(), "tokens": len(targets),
        "codebook_sum": codebook_ce.sum(), "codebook_targets": codes.numel(),
    }


def ours(model, inputs, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our token logits, frame index, and codebook logits at the frames, as forward computes them."""
    token_logits, hidden = slow_forward(model, inputs)
    frames = frame_index(model, labels)
    codes = labels[:, 1:].transpose(1, 2).flatten(0, 1)[frames]
    return token_logits, frames, fast_forward(model, hidden.flatten(0, 1)[frames], codes)


@pytest.mark.parametrize("grouped", [False, True], ids=["fish-speech-attention", "grouped-attention"])
def test_logits_match_fish_speech_inference_at_every_position(tiny_model_dir, cpu, upstream, grouped):
    model = load_llm(tiny_model_dir, cpu)
    if grouped:  # as training runs it: modeling.attend reading grouped keys and values
        use_grouped_attention(model)
        assert all("forward" in vars(block.attention) for block in model.layers)  # the instances now attend through it
    inputs, labels = pad(model, batch_rows(model))
    with torch.inference_mode():
        token_logits, frames, codebook_logits = ours(model, inputs, labels)
    start = 0
    for i, (sequence, their_tokens, their_codebooks) in enumerate(upstream):
        torch.testing.assert_close(token_logits[i, : sequence.shape[1] - 1], their_tokens, **LOGITS)
        # the fast transformer runs exactly where the next position is a frame, in row order
        positions = is_semantic(model, sequence[0, 1:]).nonzero().squeeze(1)
        assert torch.equal(frames[start : start + len(positions)], i * inputs.shape[-1] + positions)
        torch.testing.assert_close(codebook_logits[start : start + len(positions)], their_codebooks, **LOGITS)
        start += len(positions)
    assert start == len(frames)


def cached_decoding(model, sequence: torch.Tensor, prompt_length: int, cache_positions: int) -> list[torch.Tensor]:
    """fish-speech's forward_generate over `sequence` (num_codebooks + 1, length) as synthesis runs it: KV caches of
    `cache_positions` (more than the sequence, as synthesis sizes them: the mask hides the empty slots), the prompt
    prefilled at once, then one position a step, each followed by the fast transformer's steps over the next
    position's codes, one codebook at a time with its own caches. Per slow call: the token logits, the fast
    transformer's input and its codebook logits."""
    model.setup_caches(max_batch_size=1, max_seq_len=cache_positions, dtype=torch.float32)
    calls = [(sequence[None, :, :prompt_length], torch.arange(prompt_length))]
    calls += [(sequence[None, :, t : t + 1], torch.tensor([t])) for t in range(prompt_length, sequence.shape[1])]
    outputs = []
    for x, positions in calls:
        result = model.forward_generate(x, positions)
        codes = sequence[1:, positions[-1] + 1] if positions[-1] + 1 < sequence.shape[1] else sequence[1:, 0]
        fast = [model.forward_generate_fast(result.hidden_states[:, -1:], torch.tensor([0]))]
        fast += [model.forward_generate_fast(model.fast_embeddings(codes[i - 1 : i][None]), torch.tensor([i])) for i in range(1, len(codes))]
        outputs.append(torch.cat([result.logits.flatten(), result.hidden_states.flatten(), *(f.flatten() for f in fast)]))
    return outputs


def test_grouped_attention_reads_the_kv_caches_with_fish_speechs_values_at_every_step(tiny_model_dir, cpu):
    """Synthesis's path (modeling.attend_cached, grouped keys and values read from the caches, in the slow and the fast
    transformer) against fish-speech's own attention (the caches repeated to every head) at every step: a prompt's
    prefill, then 60 frames one by one, each with its fast steps."""
    theirs, ours = load_llm(tiny_model_dir, cpu), load_llm(tiny_model_dir, cpu)
    use_grouped_attention(ours)
    assert theirs.config.n_head > theirs.config.n_local_heads  # grouped, as in the releases
    n, turns = theirs.config.num_codebooks, [("Hello there.", codes_for(theirs, 60))]
    sequence = training_example(theirs.tokenizer, turns, n)[0]
    prompt_length = prompt_values(theirs.tokenizer, [("Hello there.", None)], n).shape[1]
    with torch.inference_mode():
        expected, got = (cached_decoding(model, sequence, prompt_length, 128) for model in (theirs, ours))
    assert len(got) == len(expected) > 60
    for step, (mine, reference) in enumerate(zip(got, expected)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6, msg=lambda m: f"call {step}: {m}")


def test_attention_written_as_sums_equals_sdpa_with_a_mask():
    """The compiled decoding steps' attention (modeling._attention_by_sums) against SDPA's, with a mask that hides
    scattered positions of every row; test_perf_paths checks the compiled steps' codes against eager's."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 6, 16, generator=generator)
    k, v = torch.randn(2, 1, 8, 40, 16, generator=generator)
    mask = torch.rand(1, 1, 6, 40, generator=generator) > 0.4
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_attention_by_sums(q, k, v, attn_mask=mask), expected, rtol=0, atol=1e-6)


# (query heads, key-value heads, cached positions, head size, batch, most parts a head's cache is split in)
DECODE_SHAPES = [
    (16, 8, 300, 128, 1, 32),  # S1-mini's slow heads; one block per part
    (16, 8, 10, 64, 1, 32),  # its fast heads over their ten positions
    (4, 2, 300, 16, 2, 2),  # two rows; parts of several blocks
    (6, 2, 70, 24, 1, 32),  # groups and a head size that are not powers of two
]


def check_decoding_attention() -> None:
    """modeling.decode_attention against SDPA with the cache repeated to every head, as fish-speech attends, for each
    of DECODE_SHAPES: a mask that hides scattered positions and the whole second half of each row, so that some
    parts see nothing. Run where TRITON_INTERPRET=1 was set before Triton was imported (its interpreter runs the
    kernels on CPU tensors; imported first without it, Triton's own reductions can't be interpreted)."""
    for heads, kv_heads, positions, dim, batch, splits in DECODE_SHAPES:
        modeling.DECODE_SPLITS = splits
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(batch, heads, 1, dim, generator=generator)
        k, v = torch.randn(2, batch, kv_heads, positions, dim, generator=generator)
        mask = torch.rand(batch, positions, generator=generator) > 0.3
        mask[:, 0], mask[:, positions // 2 :] = True, False
        groups = heads // kv_heads
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=mask[:, None, None, :])
        with warnings.catch_warnings():  # numpy's, on the -inf of padding rows the kernel never stores
            warnings.simplefilter("ignore", RuntimeWarning)
            got = modeling.decode_attention(q, k, v, mask)
            if positions == 10:  # the op as torch.compile sees it: its schema, its fake (meta) version, traced
                torch.library.opcheck(modeling.decode_attention, (q, k, v, mask),
                                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=lambda m: f"shape {heads, kv_heads, positions, dim, batch}: {m}")


def test_the_decoding_attention_kernel_gives_sdpas_values():
    """The Triton kernels of compiled decoding on CUDA, run by Triton's interpreter in a process of their own."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    check = subprocess.run([sys.executable, "-c", "from tests.test_modeling import check_decoding_attention; check_decoding_attention()"],
                           cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]


def test_decoding_linears_sum_one_rows_products_when_compiled(cpu):
    """modeling.use_decoding_linears: in compiled code a single row is a sum of products (fp32; no matrix product in
    the generated code), more rows take F.linear; both give the layers' values, also under autocast (its dtype, as
    F.linear rounds). LoRA's layers keep their own forward."""
    import loralib
    from torch._inductor.utils import run_and_get_code

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40, bias=False), loralib.Linear(40, 8, r=2))
    modeling.use_decoding_linears(model)
    assert "forward" in vars(model[0]) and "forward" in vars(model[1]) and "forward" not in vars(model[2])
    generator = torch.Generator().manual_seed(0)
    for rows, autocast in ((1, False), (3, False), (1, True)):
        torch._dynamo.reset()
        compiled = torch.compile(model[:2], fullgraph=True, dynamic=False)
        x = torch.randn(1, rows, 64, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = torch.nn.functional.linear(torch.nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight)
            got, code = run_and_get_code(compiled, x)
        assert got.dtype == expected.dtype == (torch.bfloat16 if autocast else torch.float32)
        # under autocast both round each layer's output to bf16, and a rounding apart in the first moves the second
        # by up to a bf16 step (values below 1 here: 4e-3 is two); a bias left out moves them by about 0.1
        torch.testing.assert_close(got, expected, rtol=0, atol=4e-3 if autocast else 1e-5)
        assert ("extern_kernels.mm" in code[0] or "extern_kernels.addmm" in code[0]) == (rows > 1)


def test_loss_matches_a_reference_from_fish_speech_logits(tiny_model_dir, cpu, upstream):
    model = load_llm(tiny_model_dir, cpu)
    with torch.inference_mode():
        result = forward(model, *pad(model, batch_rows(model)))
    expected = {"token_sum": 0.0, "tokens": 0, "codebook_sum": 0.0, "codebook_targets": 0}
    for row in upstream:
        for key, value in reference_losses(model, *row).items():
            expected[key] += value
    assert (int(result.tokens), int(result.codebook_targets)) == (expected["tokens"], expected["codebook_targets"])
    close = lambda ours, theirs, count: torch.testing.assert_close(ours, theirs, rtol=0, atol=PER_TARGET * count)  # noqa: E731
    close(result.token_loss_sum, expected["token_sum"], expected["tokens"])
    close(result.codebook_loss_sum, expected["codebook_sum"], expected["codebook_targets"])
    close(result.token_loss, expected["token_sum"] / expected["tokens"], 1)
    close(result.codebook_loss, expected["codebook_sum"] / expected["codebook_targets"], 1)
    close(result.loss, result.token_loss + result.codebook_loss, 0)


def test_padding_changes_nothing_at_real_positions(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    rows = batch_rows(model)
    inputs, labels = pad(model, rows)
    # whatever the padding holds: fill it with semantic tokens and codes, which a leak would pick up
    lengths = torch.tensor([pad(model, [turns])[0].shape[-1] for turns in rows])
    padding = (torch.arange(inputs.shape[-1]) >= lengths[:, None])[:, None]
    torch.manual_seed(2)
    garbage = torch.randint(0, model.config.codebook_size, inputs.shape)
    garbage[:, 0] += model.tokenizer.semantic_begin_id
    inputs = torch.where(padding, garbage, inputs)
    with torch.inference_mode():
        batch_tokens, batch_frames, batch_codebooks = ours(model, inputs, labels)
        batch = forward(model, inputs, labels)
        start, sums = 0, torch.zeros(4)
        for i, turns in enumerate(rows):
            alone_inputs, alone_labels = pad(model, [turns])
            alone_tokens, alone_frames, alone_codebooks = ours(model, alone_inputs, alone_labels)
            length = alone_inputs.shape[-1]
            torch.testing.assert_close(batch_tokens[i, :length], alone_tokens[0], **LOGITS)
            torch.testing.assert_close(batch_codebooks[start : start + len(alone_frames)], alone_codebooks, **LOGITS)
            start += len(alone_frames)
            alone = forward(model, alone_inputs, alone_labels)
            sums += torch.stack([alone.token_loss_sum, alone.tokens, alone.codebook_loss_sum, alone.codebook_targets])
    assert start == len(batch_frames)
    # a batch's sums and counts are those of its rows: what token-weighted accumulation adds up
    assert (int(batch.tokens), int(batch.codebook_targets)) == (int(sums[1]), int(sums[3]))
    torch.testing.assert_close(batch.token_loss_sum, sums[0], rtol=0, atol=PER_TARGET * sums[1])
    torch.testing.assert_close(batch.codebook_loss_sum, sums[2], rtol=0, atol=PER_TARGET * sums[3])


def test_token_weighted_accumulation_gives_the_whole_batch_gradients(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    rows = batch_rows(model)  # of different token counts, so that a mean of per-row means would differ
    params = [p for p in model.parameters() if p.requires_grad]

    forward(model, *pad(model, rows)).loss.backward()
    whole = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad()

    micro_batches = [pad(model, [turns]) for turns in rows]
    tokens, codebook_targets = map(sum, zip(*(target_counts(model, labels) for _, labels in micro_batches)))
    for inputs, labels in micro_batches:
        result = forward(model, inputs, labels)
        (result.token_loss_sum / tokens + result.codebook_loss_sum / codebook_targets).backward()
    accumulated = torch.cat([p.grad.flatten() for p in params])
    # relative to the largest gradient: fp32 sums in another order differ by ~1e-7 of it
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-5 * whole.abs().max())


def test_synthesis_prompt_is_the_training_sequence_up_to_the_audio(tiny_model_dir, cpu):
    model = load_llm(tiny_model_dir, cpu)
    text, n = "The weather is calm.", model.config.num_codebooks
    codes = codes_for(model, 5)
    inputs, labels = training_example(model.tokenizer, [(text, codes)], n)
    prompt = prompt_values(model.tokenizer, [(text, None)], n)
    assert torch.equal(inputs[:, : prompt.shape[1]], prompt)
    # right after the prompt come the frames: first semantic token, with its codes
    assert inputs[0, prompt.shape[1]] == model.tokenizer.semantic_begin_id + codes[0, 0]
    assert torch.equal(inputs[1:, prompt.shape[1]], codes[:, 0])
    # loss only on the frames and the closing <|im_end|>
    assert (labels[0] != -100).sum() == codes.shape[1] + 1
    assert labels[0, -1] == model.tokenizer.get_token_id("<|im_end|>")
