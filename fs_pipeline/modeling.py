"""Our forward pass through fish-speech's DualARTransformer, for training and scoring.

fish-speech 0.1.0's `DualARTransformer.forward` raises a TypeError, so this builds the pass from the
model's modules, matching what its inference code (`forward_generate`) computes:

1. Slow transformer over the sequence: token embedding plus, at semantic positions, the sum of the
   codebook embeddings (scaled by 1/sqrt(num_codebooks + 1) when the config says so); causal attention.
   Sequences are right-padded, so plain causal attention never lets a real position see padding.
2. Token logits from the final norm and the output head (or the tied embedding matrix).
3. Fast transformer at every position whose label is a semantic token: its input is the slow hidden
   state followed by the embeddings of codebooks 0..n-2; its outputs predict codebooks 0..n-1.

Loss = cross-entropy on the tokens + cross-entropy on the codebooks, each a mean over its own targets:
the tokens whose label is not IGNORE, and every codebook of every frame. The losses are computed a slice
of positions at a time (head_losses): at S1-mini size, 4 rows of 4096 tokens would otherwise hold their
155776-way logits in fp32 all at once, 10 GB, and as much again for their gradient.
"""

import functools
import math
import types
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from fs_pipeline.device import flash_attention_available

IGNORE = -100
# Logit entries (positions x vocabulary) that exist at once in the loss: 2**28 fp32 values are 1 GiB, so
# about 1700 positions of the 155776-token head, or every frame of a batch through the 4096-code head.
LOSS_CHUNK_ELEMENTS = 2**28


@dataclass
class ForwardResult:
    """One batch's losses. The means weigh every target of this batch alike; the sums and counts let a
    caller weigh every target of several micro-batches alike (token-weighted accumulation): the loss of the
    effective batch is sum(token_loss_sum) / sum(tokens) + sum(codebook_loss_sum) / sum(codebook_targets),
    with the counts known before any micro-batch runs (target_counts)."""

    loss: torch.Tensor  # token_loss + codebook_loss, with gradients
    token_loss: torch.Tensor  # token_loss_sum / tokens, detached
    codebook_loss: torch.Tensor  # codebook_loss_sum / codebook_targets, detached
    top5_accuracy: torch.Tensor  # over the token targets
    token_loss_sum: torch.Tensor  # cross-entropy summed over the token targets, with gradients
    codebook_loss_sum: torch.Tensor  # cross-entropy summed over the codebook targets, with gradients
    tokens: torch.Tensor  # token targets: positions whose label is not IGNORE
    codebook_targets: torch.Tensor  # frames x num_codebooks


def is_semantic(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Where `ids` are semantic tokens: the positions of audio frames (a frame's first code as a token id)."""
    return (ids >= tokenizer.semantic_begin_id) & (ids <= tokenizer.semantic_end_id)


def embed(model, inputs: torch.Tensor) -> torch.Tensor:
    config = model.config
    offsets = torch.arange(config.num_codebooks, device=inputs.device)[None, :, None] * config.codebook_size
    codebook_sum = model.codebook_embeddings(inputs[:, 1:] + offsets).sum(dim=1)
    frames = is_semantic(model.tokenizer, inputs[:, 0])
    x = model.embeddings(inputs[:, 0]) + codebook_sum * frames[..., None]
    if config.scale_codebook_embeddings:
        x = torch.where(frames[..., None], x / math.sqrt(config.num_codebooks + 1), x)
    return x


def _run_layers(layers, x, freqs_cis, mask, gradient_checkpointing: bool):
    for layer in layers:
        if gradient_checkpointing and x.requires_grad:
            x = checkpoint(layer, x, freqs_cis, mask, use_reentrant=False)
        else:
            x = layer(x, freqs_cis, mask)
    return x


# Kernels for causal attention without a mask, fastest first: at S1-mini's training shapes on an H200, cuDNN's forward
# and backward took half of flash's time (benchmarks/RESULTS.md, "Training kernels"). SDPA takes the first that runs.
CAUSAL_KERNELS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q (batch, heads, length, dim) over k and v with fewer (grouped) heads. Without a mask, causal, by
    CAUSAL_KERNELS reading the groups directly (enable_gqa); with one (what causal_mask gives where flash does not
    run, and S2-Pro's KV-cached generation), as fish-speech computes it: keys and values repeated to every head
    (S1-mini's cached generation goes through attend_cached)."""
    if mask is None:
        with sdpa_kernel(list(CAUSAL_KERNELS), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q (batch, heads, length, dim) over a KV cache's k and v (batch, fewer heads, positions, dim) with
    the boolean `mask` (broadcastable to (batch, 1, length, positions)): the values of fish-speech's attention, which
    repeats the whole cache to every head at every step, with the cache read as it is. The query heads that share a
    key-value head become rows of one query block over that head (a query's attention depends on its own row alone),
    and the mask is tiled to match: no copy of the cache, and a kernel that takes a mask (flash takes none, and SDPA's
    enable_gqa on CUDA takes only flash's and the math kernel)."""
    batch, heads, length, dim = q.shape
    if length == 1 and torch.compiler.is_compiling():
        # a compiled decoding step (synthesis's frames). On CUDA one Triton kernel reads the cache split in parts, and
        # a second joins them: in a CUDA graph on an H200, 12 us a slow layer over 2048 positions and 3.8 us a fast
        # one, against 22 and 4.8 us for the sums below, which inductor makes into several reductions over few rows.
        # Elsewhere those sums.
        if q.is_cuda:
            return decode_attention(q, k, v, mask.expand(batch, 1, 1, k.shape[2]).reshape(batch, k.shape[2]))
        attention = _attention_by_sums
    else:  # longer queries (a prompt's prefill, also inside training's compiled blocks when its test clips speak)
        attention = F.scaled_dot_product_attention
    groups = heads // k.shape[1]
    rows = q.reshape(batch, k.shape[1], groups * length, dim)  # row g * length + i: query head (kv head * groups + g), position i
    mask = mask.repeat(1, 1, groups, 1)
    return attention(rows, k, v, attn_mask=mask).reshape(batch, heads, length, dim)


def _attention_by_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, attn_mask) (boolean mask, keys and values of q's heads) as sums of
    products in fp32, as the fused kernels accumulate: for compiled code only (eager, it would hold every product)."""
    scores = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~attn_mask, -float("inf")), dim=-1)
    return (weights.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(q.dtype)


# decode_attention: at most this many parts of the cache per (batch, key-value head), each read by one program in
# blocks of DECODE_BLOCK positions: 8 heads x 64 parts of 32 positions for S1-mini's 2048-position caches. Of 4 block
# sizes x 5 part counts on an H200, the fastest at 2048 and 10 (the fast transformer's) positions, within 4% at 8192.
DECODE_SPLITS = 64
DECODE_BLOCK = 16


@torch.library.custom_op("fs_pipeline::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one position's q (batch, heads, 1, dim) over a KV cache's k and v (batch, fewer heads, positions,
    dim) where mask (batch, positions) is True, which it must be somewhere in each row (a causal mask always shows
    position 0): scaled_dot_product_attention's values (fp32 sums and softmax, output in q's dtype), by two Triton
    kernels. The first splits each key-value head's positions into parts, one program each, which attends every query
    head of the group over its part (a running maximum and sum, as flash attention keeps); the second joins the parts. An opaque op for torch.compile, so that a CUDA graph replays the
    kernels without Python. Needs Triton: on CUDA (or on CPU tensors under TRITON_INTERPRET=1, for tests)."""
    import triton

    partial_kernel, join_kernel = _decode_attention_kernels()
    batch, heads, _, dim = q.shape
    kv_heads, positions = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    splits = min(DECODE_SPLITS, triton.cdiv(positions, DECODE_BLOCK))
    part = triton.cdiv(triton.cdiv(positions, splits), DECODE_BLOCK) * DECODE_BLOCK
    splits = triton.cdiv(positions, part)
    q, k, v, mask = q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous()
    maxima = q.new_empty(batch * kv_heads, splits, groups, dtype=torch.float32)
    sums, weighted = torch.empty_like(maxima), q.new_empty(batch * kv_heads, splits, groups, dim, dtype=torch.float32)
    out = torch.empty_like(q)
    sizes = {"GROUPS": groups, "GROUPS_P2": triton.next_power_of_2(groups), "DIM": dim, "DIM_P2": triton.next_power_of_2(dim)}
    partial_kernel[(batch * kv_heads, splits)](q, k, v, mask, maxima, sums, weighted, kv_heads, positions, splits, dim**-0.5,
                                               PART=part, **sizes, BLOCK=DECODE_BLOCK)
    join_kernel[(batch * kv_heads,)](maxima, sums, weighted, out, splits, **sizes, SPLITS_P2=triton.next_power_of_2(splits))
    return out


@decode_attention.register_fake
def _(q, k, v, mask):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@functools.cache
def _decode_attention_kernels():
    """decode_attention's two Triton kernels, built on first use (Triton is imported only where they run)."""
    import triton
    import triton.language as tl

    @triton.jit
    def attend_part(q_ptr, k_ptr, v_ptr, mask_ptr, maxima_ptr, sums_ptr, weighted_ptr, kv_heads, positions, splits, scale,
                    PART: tl.constexpr, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, DIM: tl.constexpr, DIM_P2: tl.constexpr,
                    BLOCK: tl.constexpr):
        head, split = tl.program_id(0), tl.program_id(1)  # head: batch * kv_heads + key-value head
        batch = head // kv_heads
        rows, dims = tl.arange(0, GROUPS_P2), tl.arange(0, DIM_P2)
        row_ok, dim_ok = rows < GROUPS, dims < DIM
        q = tl.load(q_ptr + (head * GROUPS + rows)[:, None] * DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0).to(tl.float32)
        maximum = tl.full([GROUPS_P2], -float("inf"), tl.float32)
        total = tl.full([GROUPS_P2], 0.0, tl.float32)
        weighted = tl.full([GROUPS_P2, DIM_P2], 0.0, tl.float32)
        for offset in range(0, PART, BLOCK):
            at = split * PART + offset + tl.arange(0, BLOCK)
            inside = at < positions
            seen = inside & (tl.load(mask_ptr + batch.to(tl.int64) * positions + at, mask=inside, other=0) != 0)
            cells = (head.to(tl.int64) * positions + at)[:, None] * DIM + dims[None, :]
            k = tl.load(k_ptr + cells, mask=inside[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (rows, BLOCK)
            scores = tl.where(seen[None, :], scores, -float("inf"))
            new_maximum = tl.maximum(maximum, tl.max(scores, axis=1))
            shift = tl.where(new_maximum == -float("inf"), 0.0, new_maximum)  # nothing seen yet: every weight is 0
            weights = tl.exp(scores - shift[:, None])
            rescale = tl.exp(maximum - shift)
            v = tl.load(v_ptr + cells, mask=inside[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            total = total * rescale + tl.sum(weights, axis=1)
            weighted = weighted * rescale[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            maximum = new_maximum
        slot = head * splits + split
        tl.store(maxima_ptr + slot * GROUPS + rows, maximum, mask=row_ok)
        tl.store(sums_ptr + slot * GROUPS + rows, total, mask=row_ok)
        tl.store(weighted_ptr + (slot * GROUPS + rows)[:, None] * DIM + dims[None, :], weighted, mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def join_parts(maxima_ptr, sums_ptr, weighted_ptr, out_ptr, splits, GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr,
                   DIM: tl.constexpr, DIM_P2: tl.constexpr, SPLITS_P2: tl.constexpr):
        head = tl.program_id(0)
        parts, rows, dims = tl.arange(0, SPLITS_P2), tl.arange(0, GROUPS_P2), tl.arange(0, DIM_P2)
        ok = (parts < splits)[:, None] & (rows < GROUPS)[None, :]  # (parts, rows)
        slots = (head * splits + parts)[:, None] * GROUPS + rows[None, :]
        maxima = tl.load(maxima_ptr + slots, mask=ok, other=-float("inf"))
        maximum = tl.max(maxima, axis=0)  # finite: some part of each row saw a position
        scales = tl.exp(maxima - maximum[None, :])  # 0 for the parts that saw nothing
        total = tl.sum(tl.load(sums_ptr + slots, mask=ok, other=0.0) * scales, axis=0)
        dim_ok = dims < DIM
        weighted = tl.load(weighted_ptr + slots[:, :, None] * DIM + dims[None, None, :], mask=ok[:, :, None] & dim_ok[None, None, :],
                           other=0.0)
        out = tl.sum(weighted * scales[:, :, None], axis=0) / total[:, None]
        tl.store(out_ptr + (head * GROUPS + rows)[:, None] * DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(rows < GROUPS)[:, None] & dim_ok[None, :])

    return attend_part, join_parts


def _fish_attention_forward(self, x, freqs_cis, mask, input_pos=None):
    """fish-speech 0.1.0's Attention.forward, attending through `attend_cached` with KV caches, else through `attend` (its
    SDPA branch) or its own arithmetic (the other branch, which its fast transformer takes)."""
    from fish_speech.models.text2semantic.llama import apply_rotary_emb

    bsz, seqlen, _ = x.shape
    q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
    q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(bsz, seqlen, self.n_head, self.head_dim)
    k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
    v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
    if self.attention_qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dropout = self.dropout if self.training else 0.0
    if self.kv_cache is not None:  # generation: fish-speech always passes a mask with its caches
        y = attend_cached(q, *self.kv_cache.update(input_pos, k, v), mask)
    elif self.use_sdpa:
        y = attend(q, k, v, mask, dropout)
    else:  # the fast transformer's: fish-speech's own arithmetic, the fastest at ten positions (benchmarks/train_kernels.py)
        groups = self.n_head // self.n_local_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = self.eq_scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, q_size))


def use_grouped_attention(model) -> None:
    """Make S1-mini's transformers (fish-speech's modules, which repeat keys and values to every head, and force flash in
    the slow one) attend through `attend` and with KV caches (generation) through `attend_cached`: the same values, by
    faster kernels, without copying the cache. S2-Pro's modules (fs_pipeline.s2pro) call `attend` themselves. Without
    caches the fast transformer keeps fish-speech's own arithmetic."""
    for block in [*model.layers, *model.fast_layers]:
        if hasattr(block.attention, "use_sdpa"):
            block.attention.forward = types.MethodType(_fish_attention_forward, block.attention)


def use_decoding_linears(model) -> None:
    """Make the model's plain linear layers (not LoRA's) compute a single row, in compiled code, as a sum of products in
    fp32 (`_linear_forward`): inductor fuses each such reduction with the norm before it and the activation or residual
    add after it, and w1 with w3, where cuBLAS runs a kernel of its own per layer. For synthesis with --compile, whose
    frames are launch-bound: on an H200 an S1-mini frame went from 1153 kernels to 952, and from 4.36 ms to 3.36 ms
    in its CUDA graph."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward; in compiled code for a single row, the products of x and the weight (in the autocast dtype,
    as F.linear would take them) summed in fp32."""
    if x.shape[:-1].numel() != 1 or not torch.compiler.is_compiling():
        return F.linear(x, self.weight, self.bias)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    y = (x.to(dtype).float().unsqueeze(-2) * self.weight.to(dtype).float()).sum(-1)
    if self.bias is not None:
        y = y + self.bias.to(dtype).float()
    return y.to(dtype)


def causal_mask(model, x: torch.Tensor) -> torch.Tensor | None:
    """The slow transformer's attention mask for hidden states x (batch, length, dim). None where SDPA's flash
    kernel exists for x's device and compute dtype: fish-speech then runs flash attention, causal, the fastest
    kernel. Elsewhere (fp32 on CUDA, GPUs before Ampere, MPS) fish-speech would still force flash and fail
    with 'No available kernel'; the explicit causal mask lets SDPA pick one that exists (memory-efficient or math)."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    if flash_attention_available(x.device, dtype):
        return None
    return model.causal_mask[None, None, : x.shape[1], : x.shape[1]]


def slow_hidden(model, inputs: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
    """The slow transformer's hidden states (batch, length, dim), before its final norm."""
    x = embed(model, inputs)
    freqs_cis = model.freqs_cis[: inputs.shape[-1]]
    return _run_layers(model.layers, x, freqs_cis, causal_mask(model, x), gradient_checkpointing)


def token_head(model, normed: torch.Tensor) -> torch.Tensor:
    return F.linear(normed, model.embeddings.weight) if model.config.tie_word_embeddings else model.output(normed)


def frozen_head_weight(model) -> torch.Tensor | None:
    """The token head's matrix when nothing in the head trains (tied to the embeddings, or untied without an
    adapter), else None."""
    head = model.embeddings if model.config.tie_word_embeddings else model.output
    return None if any(p.requires_grad for p in head.parameters()) else head.weight


def slow_forward(model, inputs: torch.Tensor, gradient_checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(token logits, hidden states) for inputs of shape (batch, num_codebooks + 1, length)."""
    x = slow_hidden(model, inputs, gradient_checkpointing)
    return token_head(model, model.norm(x)), x


def fast_hidden(model, hidden: torch.Tensor, codes: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
    """The fast transformer's normed states (frames, num_codebooks, fast_dim) for slow hidden states
    (frames, dim) and the frames' codes (frames, num_codebooks): what its output head reads."""
    n = model.config.num_codebooks
    x = torch.cat([model.fast_project_in(hidden)[:, None], model.fast_embeddings(codes[:, : n - 1])], dim=1)
    mask = model.causal_mask[None, None, :n, :n]
    x = _run_layers(model.fast_layers, x, model.fast_freqs_cis[:n], mask, gradient_checkpointing)
    return model.fast_norm(x)


def fast_forward(model, hidden: torch.Tensor, codes: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
    """Codebook logits (frames, num_codebooks, codebook_size) for slow hidden states (frames, dim) and the
    frames' codes (frames, num_codebooks)."""
    return model.fast_output(fast_hidden(model, hidden, codes, gradient_checkpointing))


def _head_chunk_losses(head, states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, top-5 hits) of `head`'s logits for `states` (positions, dim) against `targets`.
    A hit is a target with fewer than 5 logits above its own: top-5 without sorting the vocabulary."""
    logits = head(states).float()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        valid = targets != IGNORE
        own = logits.gather(1, targets.clamp(min=0)[:, None])
        hits = ((logits > own).sum(dim=1) < 5) & valid
    return loss, hits.sum()


def head_losses(head, states: torch.Tensor, targets: torch.Tensor, vocabulary: int,
                chunk_elements: int | None = LOSS_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, top-5 hits) of `head`'s logits (`vocabulary` wide) for `states` (positions,
    dim) against `targets` (positions; IGNORE counts nothing). The logits exist for about `chunk_elements`
    entries at a time (None: all at once), and with gradients on, each slice's are recomputed in backward
    instead of kept, so that the fp32 logits of the whole batch are never held: the head's matmul runs
    once more."""
    rows = len(states) if chunk_elements is None else max(1, chunk_elements // vocabulary)
    if rows >= len(states):
        return _head_chunk_losses(head, states, targets)
    recompute = torch.is_grad_enabled() and states.requires_grad
    loss, hits = states.new_zeros((), dtype=torch.float32), targets.new_zeros(())
    for start in range(0, len(states), rows):
        part = (head, states[start : start + rows], targets[start : start + rows])
        part_loss, part_hits = checkpoint(_head_chunk_losses, *part, use_reentrant=False) if recompute else _head_chunk_losses(*part)
        loss, hits = loss + part_loss, hits + part_hits
    return loss, hits


def cross_entropy_and_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, top-5 hits, gradient of that sum for the logits, in the logits' dtype) of logits
    (positions, vocabulary) against targets (IGNORE counts nothing): one pass of fp32 arithmetic over the logits,
    which torch.compile fuses into two kernels."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    valid = targets != IGNORE
    picked = targets.clamp(min=0)[:, None]
    own = z.gather(1, picked).squeeze(1)
    loss = ((lse - own) * valid).sum()
    hits = (((z > own[:, None]).sum(dim=1) < 5) & valid).sum()
    columns = torch.arange(z.shape[1], device=z.device)[None, :]
    gradient = (torch.exp(z - lse[:, None]) - (columns == picked).float()) * valid[:, None]
    return loss, hits, gradient.to(logits.dtype)


@functools.cache
def _compiled_cross_entropy_and_gradient():
    return torch.compile(cross_entropy_and_gradient, dynamic=True)


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of states @ weight.T (a frozen head), a slice of positions at a time, with the
    states' gradient made in the forward pass: each slice's logits exist once, in the states' dtype, and are
    neither kept for backward nor recomputed."""

    @staticmethod
    def forward(ctx, states, weight, targets, rows: int, compiled: bool):
        kernel = _compiled_cross_entropy_and_gradient() if compiled else cross_entropy_and_gradient
        gradient = torch.empty_like(states)
        loss, hits = states.new_zeros((), dtype=torch.float32), targets.new_zeros(())
        for start in range(0, len(states), rows):
            part = slice(start, start + rows)
            part_loss, part_hits, logits_gradient = kernel(states[part] @ weight.T, targets[part])
            gradient[part] = logits_gradient @ weight
            loss, hits = loss + part_loss, hits + part_hits
        ctx.save_for_backward(gradient)
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, loss_gradient, hits_gradient):
        (gradient,) = ctx.saved_tensors
        return (gradient.float() * loss_gradient).to(gradient.dtype), None, None, None, None


def frozen_head_losses(weight: torch.Tensor, states: torch.Tensor, targets: torch.Tensor,
                       chunk_elements: int = LOSS_CHUNK_ELEMENTS, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """head_losses for a head that is a frozen matrix (`weight`, vocabulary x dim), as the token head of the
    releases is (tied to the token embeddings, which get no adapter): the same sums, with the gradient for the
    states computed slice by slice in the forward pass instead of recomputing each slice's logits in backward."""
    rows = max(1, chunk_elements // len(weight))
    # fp16 (GPUs before Ampere): the logits' gradient would round before GradScaler's scale reaches it, so autograd's way
    if not (torch.is_grad_enabled() and states.requires_grad) or states.dtype == torch.float16:
        return head_losses(partial(F.linear, weight=weight), states, targets, len(weight), chunk_elements)
    return _FrozenHeadLoss.apply(states, weight, targets, rows, compiled)


def _is_frame(model, labels: torch.Tensor) -> torch.Tensor:
    return is_semantic(model.tokenizer, labels[:, 0])


def frame_index(model, labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into (batch * length) of the positions whose label is a semantic token, where the fast
    transformer runs. Computed on CPU labels before a batch moves to the GPU, it costs the GPU no sync."""
    return _is_frame(model, labels).flatten().nonzero().squeeze(1)


def target_counts(model, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token targets, codebook targets) of a batch: what its token and codebook losses average over.
    From CPU labels, a training step can add them up over its micro-batches before running any."""
    return (labels[:, 0] != IGNORE).sum(), _is_frame(model, labels).sum() * model.config.num_codebooks


def forward(model, inputs: torch.Tensor, labels: torch.Tensor, frames: torch.Tensor | None = None,
            gradient_checkpointing: bool = False, loss_chunk: int | None = LOSS_CHUNK_ELEMENTS,
            compiled_loss: bool = False) -> ForwardResult:
    """Losses for a batch made by prompt.training_example (padded with 0 inputs and IGNORE labels);
    `frames` is frame_index(model, labels), found here when not given. `loss_chunk` bounds the logits held
    at once (head_losses; None: the whole batch's, as before). `compiled_loss` runs the frozen token head's
    loss arithmetic compiled (frozen_head_losses)."""
    if frames is None:
        frames = frame_index(model, labels)
    tokens, codebook_targets = target_counts(model, labels)
    hidden = slow_hidden(model, inputs, gradient_checkpointing)
    normed, token_targets, frozen = model.norm(hidden).flatten(0, 1), labels[:, 0].flatten(), frozen_head_weight(model)
    if frozen is not None and loss_chunk is not None:
        token_loss_sum, hits = frozen_head_losses(frozen, normed, token_targets, loss_chunk, compiled_loss)
    else:
        token_loss_sum, hits = head_losses(partial(token_head, model), normed, token_targets, model.config.vocab_size, loss_chunk)

    frame_codes = labels[:, 1:].transpose(1, 2).flatten(0, 1).index_select(0, frames)  # (frames, num_codebooks)
    fast = fast_hidden(model, hidden.flatten(0, 1).index_select(0, frames), frame_codes, gradient_checkpointing)
    codebook_loss_sum, _ = head_losses(model.fast_output, fast.flatten(0, 1), frame_codes.flatten(), model.config.codebook_size, loss_chunk)

    # a batch without targets of a kind (e.g. a micro-batch whose frames were all truncated away) adds 0, not NaN
    token_loss = token_loss_sum / tokens.clamp(min=1)
    codebook_loss = codebook_loss_sum / codebook_targets.clamp(min=1)
    return ForwardResult(
        loss=token_loss + codebook_loss,
        token_loss=token_loss.detach(),
        codebook_loss=codebook_loss.detach(),
        top5_accuracy=hits / tokens.clamp(min=1),
        token_loss_sum=token_loss_sum,
        codebook_loss_sum=codebook_loss_sum,
        tokens=tokens,
        codebook_targets=codebook_targets,
    )
