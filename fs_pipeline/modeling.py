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

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
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
            gradient_checkpointing: bool = False, loss_chunk: int | None = LOSS_CHUNK_ELEMENTS) -> ForwardResult:
    """Losses for a batch made by prompt.training_example (padded with 0 inputs and IGNORE labels);
    `frames` is frame_index(model, labels), found here when not given. `loss_chunk` bounds the logits held
    at once (head_losses; None: the whole batch's, as before)."""
    if frames is None:
        frames = frame_index(model, labels)
    tokens, codebook_targets = target_counts(model, labels)
    hidden = slow_hidden(model, inputs, gradient_checkpointing)
    token_loss_sum, hits = head_losses(partial(token_head, model), model.norm(hidden).flatten(0, 1), labels[:, 0].flatten(),
                                       model.config.vocab_size, loss_chunk)

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
