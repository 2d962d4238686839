"""Training throughput on 1, 2, 4 ... GPUs: torchrun, one process per GPU, DistributedDataParallel.

    python -m benchmarks.train_scaling [--llm-size s1-mini] [--gpus 1,2,4] [--batch-size 2] [--max-length 4096] [--steps 14]

Builds a base model with random weights and packed train/val data of random codes (as train_throughput
does), then for each GPU count trains through the same stage code users run, started by torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N`; the 1-GPU row is the world-size-1
case of the same command). --batch-size is per GPU, so N GPUs take N times the examples per step (weak
scaling). Reports tokens/s of all GPUs together (steps after the first three) and the scaling efficiency:
tokens/s on N GPUs / (N x tokens/s on 1).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

WARMUP_STEPS = 3  # left out of the average: allocator growth, cuDNN/cuBLAS choices, the first all-reduces


def _settings(steps: int, batch_size: int, max_length: int, compile_blocks: bool):
    from fs_pipeline.stages import train

    return train.TrainSettings(max_steps=steps, batch_size=batch_size, checkpoint_every=steps, pack_utterances=True,
                               max_length=max_length, compile=compile_blocks)


def worker(work: Path, device: str | None, steps: int, batch_size: int, max_length: int, compile_blocks: bool) -> None:
    """One of torchrun's processes: train the project of this GPU count."""
    from fs_pipeline import distributed
    from fs_pipeline.device import select_device
    from fs_pipeline.models import open_model_dir
    from fs_pipeline.project import Project
    from fs_pipeline.stages import train

    processes = int(os.environ["WORLD_SIZE"])
    model_dir = open_model_dir(work / "model")
    project = Project(f"gpus_{processes}", root=work / "results")
    with distributed.session(select_device(device)) as (world, choice):
        train.run(_settings(steps, batch_size, max_length, compile_blocks), model_dir, choice, project, world)


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="s1-mini", show_default=True)
@click.option("--gpus", default="1,2,4", show_default=True, help="GPU counts (processes) to run, comma-separated.")
@click.option("--batch-size", default=2, show_default=True, help="Rows per GPU per step.")
@click.option("--max-length", default=4096, show_default=True, help="Tokens per packed row.")
@click.option("--frames", default=400, show_default=True, help="Semantic frames per utterance.")
@click.option("--utterances", default=600, show_default=True, help="Synthetic utterances to pack into rows.")
@click.option("--steps", default=14, show_default=True)
@click.option("--compile", "compile_blocks", is_flag=True, help="torch.compile the transformer blocks.")
@click.option("--device", default=None, help="cuda (default where there is one) or cpu (gloo; a smoke test).")
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md.")
@click.option("--worker", "worker_dir", type=click.Path(path_type=Path), hidden=True)
def main(llm_size, gpus, batch_size, max_length, frames, utterances, steps, compile_blocks, device, no_record, worker_dir):
    if worker_dir is not None:
        worker(worker_dir, device, steps, batch_size, max_length, compile_blocks)
        return
    import torch

    from benchmarks.common import publish
    from benchmarks.train_throughput import synthetic_utterances
    from fs_pipeline.device import select_device
    from fs_pipeline.models import open_model_dir
    from fs_pipeline.packed import speaker_message, write_protos
    from fs_pipeline.stages.pack import TRAIN_FILE, VAL_FILE
    from fs_pipeline.tiny_model import write_tiny_model

    counts = [int(n) for n in gpus.split(",")]
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-scaling-"))
    try:
        model_dir = open_model_dir(write_tiny_model(work / "model", llm_size=llm_size))
        max_length = min(max_length, model_dir.config["max_seq_len"])
        examples = list(synthetic_utterances(model_dir, utterances, frames))
        rows = []
        for n in counts:
            data = work / "results" / f"gpus_{n}" / "data"
            write_protos(data / TRAIN_FILE, [speaker_message("spk", "synthetic", examples[:-4])])
            write_protos(data / VAL_FILE, [speaker_message("spk", "synthetic", examples[-4:])])
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
                       "benchmarks.train_scaling", "--worker", str(work), "--steps", str(steps), "--batch-size", str(batch_size),
                       "--max-length", str(max_length), *(["--compile"] if compile_blocks else []),
                       *(["--device", device] if device else [])]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
            subprocess.run(command, check=True, env=env)
            metrics = [json.loads(line) for line in open(work / "results" / f"gpus_{n}" / "logs" / "metrics.jsonl")]
            timed = metrics[WARMUP_STEPS:] or metrics
            rows.append((n, sum(m["tokens_per_second"] for m in timed) / len(timed), max(m.get("peak_memory_gb", 0.0) for m in metrics),
                         metrics[-1]["loss"]))
        base = next((tps for n, tps, _, _ in rows if n == 1), None)
        table = [[n, f"{tps:.0f}", f"{tps / n:.0f}", f"{tps / (n * base):.1%}" if base else "-", f"{peak:.1f}", f"{loss:.3f}"]
                 for n, tps, peak, loss in rows]
        caption = (f"{llm_size} LLM (random weights), LoRA r_8_alpha_16, {choice.precision}, batch {batch_size} per GPU x rows of up to "
                   f"{max_length} tokens (packed utterances), compiled blocks {'on' if compile_blocks else 'off'}, {steps} steps "
                   f"(tokens/s from step {WARMUP_STEPS + 1} on), torchrun + DistributedDataParallel "
                   f"({'NCCL' if choice.type == 'cuda' else 'gloo'}); efficiency = tokens/s / (GPUs x tokens/s on 1 GPU)")
        publish("Training on several GPUs (issue 20)", choice.device if choice.type != "cuda" else torch.device("cuda", 0), caption,
                ["GPUs", "tokens/s (all GPUs)", "tokens/s per GPU", "scaling efficiency", "peak GPU memory per GPU (GB)", "final loss"],
                table, record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
