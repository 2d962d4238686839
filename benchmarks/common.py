"""What the benchmark scripts share: where results go and how a row is written."""

import platform
import sys
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Datasheet dense bf16 tensor-core peaks (FLOP/s), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def publish(benchmark: str, device: torch.device, caption: str, columns: list[str], rows: list[list], record: bool) -> str:
    """Print a captioned markdown table and, when `record`, append it to RESULTS.md. Returns the table."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    if record:
        append_result(benchmark, device, table)
    return table


def append_result(benchmark: str, device: torch.device, table: str, notes: str = "") -> None:
    """Append a dated section: the benchmark, device, torch version, the command that produced it, the table."""
    command = f"python -m benchmarks.{Path(sys.argv[0]).stem} " + " ".join(sys.argv[1:])
    section = [
        f"### {benchmark} — {date.today().isoformat()}",
        "",
        f"Device: {device_name(device)}; torch {torch.__version__}; command: `{command}`",
        "",
        table,
    ]
    if notes:
        section += ["", notes]
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n\n")


def model_shape(model_dir) -> SimpleNamespace:
    """A model's config and tokenizer without its weights: all that building training rows needs."""
    from fish_speech.models.text2semantic.llama import BaseModelArgs
    from fish_speech.tokenizer import FishTokenizer

    return SimpleNamespace(config=BaseModelArgs.from_pretrained(str(model_dir.path / "config.json")),
                           tokenizer=FishTokenizer.from_pretrained(str(model_dir.path)))


def peak_flops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if device.type == "cuda" and key in name), None)


def training_flops(config, lengths: list[int], frames: int, lora_rank: int) -> float:
    """FLOPs of one LoRA training step on rows of `lengths` real positions holding `frames` semantic frames.

    Counted honestly for LoRA: every matmul's forward (2 per multiply-add) plus the backward's gradient
    with respect to its input (as much again), but no weight gradients for frozen weights; attention's
    backward counts twice its forward; adapters add their forward, input and weight gradients. Causal
    attention counts the half of the score matrix it computes. Recomputation (gradient checkpointing) is
    not counted. The slow transformer runs at every position, the fast one at each frame's
    num_codebooks positions."""

    def layer(dim, heads, kv_heads, head_dim, hidden):
        shapes = [(dim, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, dim), (dim, hidden), (dim, hidden), (hidden, dim)]
        frozen = sum(2 * a * b for a, b in shapes)
        adapters = sum(2 * lora_rank * (a + b) for a, b in shapes)
        return 2 * frozen + 3 * adapters

    c = config
    slow_per_position = c.n_layer * layer(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size) + 2 * 2 * c.dim * c.vocab_size
    slow_attention = sum(c.n_layer * 3 * 2 * 2 * c.n_head * c.head_dim * length * (length + 1) / 2 for length in lengths)
    n = c.num_codebooks
    fast_per_frame = n * (c.n_fast_layer * layer(c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim, c.fast_intermediate_size)
                          + 2 * 2 * c.fast_dim * c.codebook_size)
    fast_attention = c.n_fast_layer * 3 * 2 * 2 * c.fast_n_head * c.fast_head_dim * n * (n + 1) / 2
    return slow_per_position * sum(lengths) + slow_attention + frames * (fast_per_frame + fast_attention)
