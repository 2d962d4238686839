"""Training throughput of our LoRA trainer on synthetic packed data.

    python -m benchmarks.train_throughput [--llm-size s1-mini] [--batch-size 4] [--frames 400] [--steps 20]
                                          [--pack-utterances --max-length 4096] [--compile]

Builds a base model with random weights (--llm-size tiny or the release-sized s1-mini), writes packed
train/val data of random codes with short texts, trains LoRA (--lora-config) for --steps steps through the same
stage code users run, and reports tokens/s (steps after the first two), MFU (FLOPs as counted by
common.training_flops, on GPUs with a known peak) and peak GPU memory.
"""

import json
import random
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn.attention import SDPBackend
from torch.profiler import record_function

from benchmarks.common import append_result, model_shape, peak_flops, publish, training_flops
from fs_pipeline import modeling
from fs_pipeline.device import select_device
from fs_pipeline.modeling import frame_index
from fs_pipeline.models import open_model_dir
from fs_pipeline.packed import speaker_message, write_protos
from fs_pipeline.project import Project
from fs_pipeline.stages import train
from fs_pipeline.stages.pack import TRAIN_FILE, VAL_FILE
from fs_pipeline.tiny_model import write_tiny_model

WORDS = "the quick brown fox jumps over a lazy dog while seven small voices read clear sentences aloud".split()


def synthetic_utterances(model_dir, count: int, frames: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = [model_dir.config["codebook_size"]] + [1024 if model_dir.config["codebook_size"] > 1024 else 32] * (model_dir.num_codebooks - 1)
    words = random.Random(seed)
    for _ in range(count):
        text = " ".join(words.choice(WORDS) for _ in range(frames // 12)).capitalize() + "."
        codes = np.stack([rng.integers(0, size, frames) for size in sizes])
        yield text, codes


def profile_steps(settings, model_dir, choice, project, record: bool, warmup: int = 3, measured: int = 5) -> None:
    """torch.profiler over `measured` training steps (after `warmup`), model loading excluded: the same
    forward, backward and optimizer step as the train stage."""
    from fs_pipeline.lora import LoraSettings

    model = train.prepare_model(model_dir, LoraSettings.from_name(settings.lora_config), choice)
    if settings.compile:
        train.compile_blocks(model)
    examples = train._examples(project.data_dir / TRAIN_FILE, model, settings.max_length, settings.pack_utterances)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)

    def batch(index: int):
        return train._batch(examples, index * settings.batch_size, settings.batch_size, 0, model, choice.device)

    def step(index: int, current):  # the train stage's step, in its order: all queued, the next batch made, one wait
        with record_function("## forward and backward"):
            sums = train.accumulate_gradients(model, [current], choice, settings.gradient_checkpointing,
                                              trainer=train.TrainingForward(model, settings.compile))
        with record_function("## clip and optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function("## next batch"):
            following = batch(index + 1)
        with record_function("## wait"):
            sums.read(grad_norm)
        return following

    current = batch(0)
    for index in range(warmup):
        current = step(index, current)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if choice.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for index in range(warmup, warmup + measured):
            current = step(index, current)
    sort_key = "cuda_time_total" if choice.type == "cuda" else "cpu_time_total"
    averages = profiler.key_averages()
    top = averages.table(sort_by=sort_key, row_limit=15, max_name_column_width=60)
    top += "\n" + "\n".join(f"{e.key}: host {e.cpu_time_total / 1e3 / measured:.1f} ms a step"
                             for e in averages if e.key.startswith("## "))
    if choice.type == "cuda":
        top += "\n" + gpu_idle(profiler, measured)
    print(top)
    if record:
        append_result(f"Training step profile ({measured} steps after {warmup} warm-up, top 15)", choice.device, "```\n" + top + "\n```")


def gpu_idle(profiler, steps: int, largest: int = 8) -> str:
    """How much of the profiled span the GPU had no kernel or copy running, and the largest of those gaps with the
    kernel that came after each: where the GPU waited for the host."""
    from torch.autograd import DeviceType

    work = sorted((e.time_range.start, e.time_range.end, e.name) for e in profiler.events() if e.device_type == DeviceType.CUDA)
    if not work:
        return "no GPU work profiled"
    gaps, busy, end = [], 0.0, work[0][0]
    for start, stop, name in work:
        if start > end:
            gaps.append((start - end, name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - work[0][0]
    lines = [f"GPU busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms ({busy / span:.1%}) over {steps} steps; "
             f"gaps over 0.1 ms: {sum(g for g, _ in gaps if g > 100) / 1e3:.1f} ms in {sum(g > 100 for g, _ in gaps)}",
             "largest gaps (ms, the kernel after it):"]
    lines += [f"  {gap / 1e3:.2f}  {name[:100]}" for gap, name in sorted(gaps, reverse=True)[:largest]]
    return "\n".join(lines)


def model_flops_utilization(settings, model_dir, project, choice, tokens_per_second: float) -> str:
    """MFU at this rate, from the FLOPs per real position of the training rows (see common.training_flops)."""
    from fs_pipeline.lora import LoraSettings

    shape = model_shape(model_dir)
    examples = train._examples(project.data_dir / TRAIN_FILE, shape, settings.max_length, settings.pack_utterances)
    lengths = [x.shape[1] for x, _ in examples]
    frames = sum(len(frame_index(shape, y[None])) for _, y in examples)
    flops_per_position = training_flops(shape.config, lengths, frames, LoraSettings.from_name(settings.lora_config).r) / sum(lengths)
    peak = peak_flops(choice.device)
    if peak is None:
        return "n/a"
    return f"{tokens_per_second * flops_per_position / peak:.1%}"


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="tiny", show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--frames", default=400, show_default=True, help="Semantic frames per utterance (21.5 per second of audio).")
@click.option("--steps", default=20, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--compile", "compile_blocks", is_flag=True, help="torch.compile the transformer blocks.")
@click.option("--lora-config", default="r_8_alpha_16", show_default=True)
@click.option("--pack-utterances", is_flag=True, help="Rows of several utterances up to --max-length tokens (the train stage's option).")
@click.option("--max-length", type=int, default=None, help="Row length in tokens [default: 4096, or the model's max if lower].")
@click.option("--device", default=None)
@click.option("--profile", is_flag=True, help="Also profile the run with torch.profiler and record the top kernels.")
@click.option("--attention", type=click.Choice(["cudnn", "flash"]), default="cudnn", show_default=True,
              help="The slow transformer's causal attention kernel: modeling.CAUSAL_KERNELS as it is (cuDNN first), or flash only.")
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md (smoke tests).")
def main(llm_size, batch_size, frames, steps, gradient_checkpointing, compile_blocks, lora_config, pack_utterances, max_length, device,
         profile, attention, no_record):
    choice = select_device(device)
    if attention == "flash":
        modeling.CAUSAL_KERNELS = (SDPBackend.FLASH_ATTENTION,)  # read by modeling.attend at each call
    work = Path(tempfile.mkdtemp(prefix="fs-bench-train-"))
    try:
        model_dir = open_model_dir(write_tiny_model(work / "model", llm_size=llm_size))
        project = Project("bench", root=work / "results")
        max_length = max_length or min(4096, model_dir.config["max_seq_len"])
        utterances = list(synthetic_utterances(model_dir, 64, frames))
        write_protos(project.data_dir / TRAIN_FILE, [speaker_message("spk", "synthetic", utterances[:60])])
        write_protos(project.data_dir / VAL_FILE, [speaker_message("spk", "synthetic", utterances[60:])])
        settings = train.TrainSettings(
            max_steps=steps, batch_size=batch_size, checkpoint_every=steps, gradient_checkpointing=gradient_checkpointing,
            compile=compile_blocks, lora_config=lora_config, pack_utterances=pack_utterances, max_length=max_length,
        )
        if profile:
            profile_steps(settings, model_dir, choice, project, record=not no_record)
            if choice.type == "cuda":  # the measured run below reports its own peak
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        train.run(settings, model_dir, choice, project)
        metrics = [json.loads(line) for line in open(project.dir / "logs" / "metrics.jsonl")]
        timed = metrics[2:] or metrics
        tokens_per_second = sum(m["tokens_per_second"] for m in timed) / len(timed)
        peak = max(m.get("peak_memory_gb", 0.0) for m in metrics)
        mfu = model_flops_utilization(settings, model_dir, project, choice, tokens_per_second)
        rows = f"rows of up to {max_length} tokens (packed utterances)" if pack_utterances else f"~{frames + 40} tokens"
        caption = (f"{llm_size} LLM (random weights), LoRA {lora_config}, {choice.precision}, batch {batch_size} x {rows}, "
                   f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}, compiled blocks {'on' if compile_blocks else 'off'}, "
                   f"{steps} steps (tokens/s from step 3 on), attention {attention}")
        publish("Training throughput", choice.device, caption, ["trainer", "tokens/s", "MFU", "peak GPU memory (GB)", "final loss"],
                [["fs-pipeline", f"{tokens_per_second:.0f}", mfu, f"{peak:.1f}", f"{metrics[-1]['loss']:.3f}"]], record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
