"""The training step's kernels one at a time, at S1-mini's shapes: which attention kernel and which loss to use.

    python -m benchmarks.train_kernels [--positions 8192] [--frames 7400] [--no-record]

Each row is a forward plus backward, timed with CUDA events over --iterations calls after 3 warm-up calls, in one
process on the same inputs:
- the slow transformer's attention (16 query heads, 8 key/value heads of 128, causal) over rows of --row-length
  tokens: with the keys and values repeated to 16 heads (fish-speech's Attention) or read grouped by SDPA
  (enable_gqa), by the flash and cuDNN kernels;
- the fast transformer's attention (16 query heads, 8 key/value heads of 64, 10 positions, one sequence per
  frame): fish-speech's own arithmetic (its fast layers don't use SDPA), SDPA with the causal mask, flash, cuDNN;
- the token loss over the 155776-entry head at --positions positions: modeling.head_losses (slices recomputed in
  backward) and modeling.frozen_head_losses (gradient made in the forward pass), eager and compiled.
"""

from contextlib import nullcontext

import click
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import publish
from fs_pipeline.modeling import frozen_head_losses, head_losses


def timed(run, iterations: int) -> float:
    """Milliseconds per call of run() (forward and backward)."""
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def attention_run(q, k, v, backend, grouped: bool, mask=None):
    """Forward and backward of one attention: by SDPA with `backend` (None: SDPA's choice), or with backend "math"
    by fish-speech's own arithmetic (Attention.eq_scaled_dot_product_attention, its fast transformer's)."""
    from fish_speech.models.text2semantic.llama import Attention

    groups = q.shape[1] // k.shape[1]

    def run():
        keys, values = (k, v) if grouped else (k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
        if backend == "math":
            y = Attention.eq_scaled_dot_product_attention(None, q, keys, values, attn_mask=mask)
        else:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=grouped)
        y.backward(torch.ones_like(y))
        return y.detach()
    return run


def attention_rows(batch: int, heads: int, kv_heads: int, length: int, dim: int, iterations: int, variants) -> list[list]:
    torch.manual_seed(0)
    make = lambda h: torch.randn(batch, h, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    causal_flops = 4 * batch * heads * dim * length * (length + 1) / 2 * 3.5  # forward, and backward as 2.5 forwards
    rows, first = [], None
    for name, backend, grouped, masked in variants:
        try:
            run = attention_run(q, k, v, backend, grouped, mask if masked else None)
            q.grad = k.grad = v.grad = None
            output = run()
            gradients = [q.grad.clone(), k.grad.clone()]
            first = first or (output, gradients)
            differences = [(a.float() - b.float()).abs().max().item() for a, b in zip([output, *gradients], [first[0], *first[1]])]
            ms = timed(run, iterations)
            rows.append([name, f"{ms:.2f}", f"{causal_flops / ms / 1e9:.0f}", " / ".join(f"{d:.1e}" for d in differences)])
        except RuntimeError as error:
            rows.append([name, "fails", str(error).splitlines()[0][:80], ""])
    return rows


def loss_rows(positions: int, vocabulary: int, dim: int, iterations: int) -> list[list]:
    torch.manual_seed(0)
    weight = torch.randn(vocabulary, dim, device="cuda", dtype=torch.bfloat16) * 0.02
    states = torch.randn(positions, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocabulary, (positions,), device="cuda")
    variants = [
        ("head_losses (slices recomputed in backward)", lambda: head_losses(lambda s: s @ weight.T, states, targets, vocabulary)[0]),
        ("frozen_head_losses, eager", lambda: frozen_head_losses(weight, states, targets)[0]),
        ("frozen_head_losses, compiled", lambda: frozen_head_losses(weight, states, targets, compiled=True)[0]),
    ]
    rows, reference = [], None
    for name, loss in variants:
        states.grad = None
        value = loss()
        value.backward()
        gradient = states.grad.float()
        reference = reference if reference is not None else (value.item(), gradient)
        difference = (gradient - reference[1]).abs().max().item() / reference[1].abs().max().item()
        ms = timed(lambda: loss().backward(), iterations)
        rows.append([name, f"{ms:.2f}", f"{value.item() / reference[0] - 1:.1e}", f"{difference:.1e}"])
    return rows


@click.command()
@click.option("--row-length", default=4096, show_default=True, help="Tokens per row of the slow transformer.")
@click.option("--rows", default=2, show_default=True)
@click.option("--frames", default=7400, show_default=True, help="Frames of a batch: the fast transformer's sequences.")
@click.option("--positions", default=8192, show_default=True, help="Positions of the token loss.")
@click.option("--iterations", default=10, show_default=True)
@click.option("--no-record", is_flag=True)
def main(row_length, rows, frames, positions, iterations, no_record):
    device = torch.device("cuda")
    slow = attention_rows(rows, 16, 8, row_length, 128, iterations, [
        ("flash, keys/values repeated (fish-speech)", SDPBackend.FLASH_ATTENTION, False, False),
        ("flash, grouped (enable_gqa)", SDPBackend.FLASH_ATTENTION, True, False),
        ("cuDNN, keys/values repeated", SDPBackend.CUDNN_ATTENTION, False, False),
        ("cuDNN, grouped (enable_gqa)", SDPBackend.CUDNN_ATTENTION, True, False),
    ])
    publish("Training kernels: the slow transformer's attention", device,
            f"{rows} rows x {row_length} tokens, 16 query / 8 key-value heads of 128, bf16, causal; forward + backward",
            ["kernel", "ms", "TFLOP/s", "output / dq / dk vs first row (max abs)"], slow, record=not no_record)
    fast = attention_rows(frames, 16, 8, 10, 64, iterations, [
        ("fish-speech's arithmetic, causal mask, repeated (today)", "math", False, True),
        ("SDPA's choice, causal mask, repeated", None, False, True),
        ("flash causal, grouped", SDPBackend.FLASH_ATTENTION, True, False),
        ("cuDNN causal, grouped", SDPBackend.CUDNN_ATTENTION, True, False),
    ])
    publish("Training kernels: the fast transformer's attention", device,
            f"{frames} frames x 10 positions, 16 query / 8 key-value heads of 64, bf16; forward + backward",
            ["kernel", "ms", "TFLOP/s", "output / dq / dk vs first row (max abs)"], fast, record=not no_record)
    publish("Training kernels: the token loss", device,
            f"{positions} positions, 155776-entry frozen head of 1024, bf16 states; forward + backward",
            ["loss", "ms", "loss vs first row", "gradient vs first row (max, relative)"],
            loss_rows(positions, 155776, 1024, iterations), record=not no_record)


if __name__ == "__main__":
    main()
