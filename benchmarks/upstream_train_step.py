"""Training step throughput: ours against upstream fish-speech's, same model, data and GPU, in one run.

    python -m benchmarks.upstream_train_step --upstream .upstream [--batch-size 4] [--frames 1000] [--steps 12]

--upstream is a copy of the upstream repository's `fish_speech/` package (from before its 2026-03
licence change), carried to the GPU machine and never committed. Its DualARTransformer.forward there
works (the PyPI 0.1.0 one does not). The upstream side runs what its Lightning module's training step
does, without Lightning: bf16-true weights (adapters too), its forward with a key padding mask, token +
codebook cross-entropy, AdamW with its recipe's settings, clipping at 1.0. Its setup_lora needs an
untied output head, so both sides train the S1-mini-sized model with untied embeddings. Ours runs the
train stage's step (bf16 base weights, fp32 adapters under autocast, causal attention without a mask,
no LoRA dropout where upstream's recipe has 0.01), eager and with --compile. With --pack-utterances both
get the same rows of several utterances (upstream's own dataset also joins one speaker's utterances).
Tokens/s count real (unpadded) positions, steps after warm-up, GPU synced; MFU as in common.training_flops.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import click
import torch

from benchmarks.common import model_shape, peak_flops, publish, training_flops
from benchmarks.train_throughput import synthetic_utterances
from fs_pipeline.device import select_device
from fs_pipeline.lora import LoraSettings
from fs_pipeline.modeling import LOSS_CHUNK_ELEMENTS, forward
from fs_pipeline.models import open_model_dir
from fs_pipeline.packed import speaker_message, write_protos
from fs_pipeline.stages import train
from fs_pipeline.tiny_model import write_tiny_model

UPSTREAM_STEP = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    import torch.nn.functional as F
    from fish_speech.models.text2semantic.llama import DualARTransformer
    from fish_speech.models.text2semantic.lora import LoraConfig

    model_path, batches_path, warmup = sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = DualARTransformer.from_pretrained(model_path, load_weights=True, lora_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.01))
    model = model.to(device="cuda", dtype=torch.bfloat16).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    batches = torch.load(batches_path, weights_only=True)

    def step(batch):
        inputs, labels, lengths = batch["inputs"].cuda(), batch["labels"].cuda(), batch["lengths"]
        padding = torch.arange(inputs.shape[-1])[None, :] >= lengths[:, None]
        out = model(inp=inputs, key_padding_mask=padding.cuda(), labels=labels)
        base = F.cross_entropy(out.token_logits.view(-1, out.token_logits.size(-1)), labels[:, 0].reshape(-1), ignore_index=-100)
        ids = labels[:, 0]
        semantic = (ids >= model.tokenizer.semantic_begin_id) & (ids <= model.tokenizer.semantic_end_id)
        codes = labels[:, 1 : 1 + model.config.num_codebooks].permute(0, 2, 1)[semantic]
        loss = base + F.cross_entropy(out.codebook_logits.reshape(-1, out.codebook_logits.size(-1)), codes.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss), int(lengths.sum())

    for batch in batches[:warmup]:
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started, tokens, losses = time.perf_counter(), 0, []
    for batch in batches[warmup:]:
        loss, n = step(batch)
        tokens += n
        losses.append(loss)
    torch.cuda.synchronize()
    print(json.dumps({"tokens_per_second": tokens / (time.perf_counter() - started), "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                      "last_loss": losses[-1]}))
    """
)


def make_batches(model_dir, shape, work: Path, batch_size: int, frames: int, steps: int, pack: bool, max_length: int) -> list[dict]:
    """`steps` batches of synthetic utterances of `frames` frames, one per row or packed into rows of up
    to max_length tokens, made by the train stage's own code."""
    per_row = max(1, max_length // (frames + 40)) if pack else 1
    data = work / "train.protos"
    write_protos(data, [speaker_message("spk", "synthetic", list(synthetic_utterances(model_dir, batch_size * steps * per_row, frames)))])
    examples = train._examples(data, shape, max_length, pack)
    batches = []
    for start in range(0, batch_size * steps, batch_size):
        picks = [examples[i % len(examples)] for i in range(start, start + batch_size)]
        batch = train._pad(picks, shape, "cpu")
        batches.append({"inputs": batch.inputs, "labels": batch.labels, "frames": batch.frames, "lengths": torch.tensor([x.shape[1] for x, _ in picks])})
    return batches


def synchronize(choice) -> None:
    if choice.type == "cuda":
        torch.cuda.synchronize()


def ours(model_dir, batches, warmup: int, compile_blocks: bool, choice, loss_chunk: int | None = LOSS_CHUNK_ELEMENTS) -> dict:
    model = train.prepare_model(model_dir, LoraSettings.from_name("r_8_alpha_16"), choice)
    if compile_blocks:
        train.compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)

    def step(batch) -> tuple[float, int]:
        with choice.autocast():
            loss = forward(model, *(batch[key].to(choice.device) for key in ("inputs", "labels", "frames")), loss_chunk=loss_chunk,
                           compiled_loss=compile_blocks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), int(batch["lengths"].sum())

    for batch in batches[:warmup]:
        step(batch)
    synchronize(choice)
    on_gpu = choice.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started, tokens, losses = time.perf_counter(), 0, []
    for batch in batches[warmup:]:
        loss, n = step(batch)
        tokens += n
        losses.append(loss)
    synchronize(choice)
    peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
    return {"tokens_per_second": tokens / (time.perf_counter() - started), "peak_gb": peak, "last_loss": losses[-1]}


@click.command()
@click.option("--upstream", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding upstream's fish_speech/ package (carried, not committed); without it only our rows run.")
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="s1-mini", show_default=True)
@click.option("--device", default="cuda", show_default=True, help="Upstream's step needs cuda; ours runs anywhere.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--frames", default=1000, show_default=True)
@click.option("--steps", default=12, show_default=True, help="Steps per trainer, the first --warmup not timed.")
@click.option("--warmup", default=4, show_default=True)
@click.option("--pack-utterances", is_flag=True, help="Rows of several utterances up to --max-length tokens, for both trainers.")
@click.option("--max-length", type=int, default=None, help="Row length in tokens [default: 4096, or the model's max if lower].")
@click.option("--eager/--no-eager", default=True, show_default=True, help="Time our eager step too.")
@click.option("--whole-loss", is_flag=True, help="Also time our compiled step with the loss over the whole batch's logits at once "
                                                 "(the code before chunking it).")
@click.option("--no-record", is_flag=True)
def main(upstream, llm_size, batch_size, frames, steps, warmup, pack_utterances, max_length, eager, whole_loss, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-upstream-"))
    try:
        path = write_tiny_model(work / "model", llm_size=llm_size)
        config = json.loads((path / "config.json").read_text())
        config["tie_word_embeddings"] = False  # upstream's setup_lora needs an output head of its own
        (path / "config.json").write_text(json.dumps(config))
        state = torch.load(path / "model.pth", weights_only=True)
        state.setdefault("output.weight", state["embeddings.weight"].clone())
        torch.save(state, path / "model.pth")
        model_dir = open_model_dir(path)
        max_length = max_length or min(4096, model_dir.config["max_seq_len"])
        shape = model_shape(model_dir)
        batches = make_batches(model_dir, shape, work, batch_size, frames, steps, pack_utterances, max_length)
        torch.save(batches, work / "batches.pt")

        rows = []
        if upstream:
            theirs = subprocess.run([sys.executable, "-c", UPSTREAM_STEP, str(upstream.resolve()), str(path), str(work / "batches.pt"),
                                     str(warmup)], capture_output=True, text=True)
            if theirs.returncode != 0:
                raise click.ClickException(f"upstream step failed:\n{theirs.stderr[-3000:]}")
            rows.append(("upstream fish-speech step (bf16-true, key padding mask)", json.loads(theirs.stdout.strip().splitlines()[-1])))
        if eager or choice.type != "cuda":
            rows.append(("fs-pipeline step, eager", ours(model_dir, batches, warmup, False, choice)))
        if choice.type == "cuda":
            rows.append(("fs-pipeline step, --compile", ours(model_dir, batches, warmup, True, choice)))
            if whole_loss:
                rows.append(("fs-pipeline step, --compile, loss over the whole batch's logits", ours(model_dir, batches, warmup, True, choice, None)))
        base = rows[0][1]["tokens_per_second"]
        timed = batches[warmup:]
        flops = training_flops(shape.config, [int(n) for b in timed for n in b["lengths"]],
                               sum(len(b["frames"]) for b in timed), 8) / sum(int(b["lengths"].sum()) for b in timed)
        peak = peak_flops(choice.device)
        rows_of = f"rows of up to {max_length} tokens (packed utterances)" if pack_utterances else f"~{frames + 40} tokens"
        caption = (f"{llm_size} DualAR (random weights, untied head), LoRA r=8, batch {batch_size} x {rows_of}, "
                   f"{steps - warmup} timed steps after {warmup} warm-up, no gradient checkpointing")
        publish("Training step vs upstream", choice.device, caption,
                ["trainer", "tokens/s", "× upstream", "MFU", "peak GPU memory (GB)", "last loss"],
                [[name, f"{r['tokens_per_second']:.0f}", f"{r['tokens_per_second'] / base:.2f}",
                  f"{r['tokens_per_second'] * flops / peak:.1%}" if peak else "n/a", f"{r['peak_gb']:.1f}", f"{r['last_loss']:.3f}"]
                 for name, r in rows], record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
