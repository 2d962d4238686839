"""Merge time and peak memory, and synthesis speed, for a release-sized model with random weights.

    python -m benchmarks.merge_synthesis [--llm-size s1-mini] [--full-codec] [--frames 200]

Trains LoRA adapters for two steps on synthetic data (so there is a checkpoint), merges them with
`finetune_tts.py --merge-weights` in a child process (its wall time and peak resident memory are
measured), then synthesizes from the merged model and reports the realtime factor. Random weights
rarely emit the end token, so generation runs to --frames frames.
"""

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import publish
from benchmarks.train_throughput import synthetic_utterances
from fs_pipeline.device import select_device
from fs_pipeline.models import open_model_dir
from fs_pipeline.packed import speaker_message, write_protos
from fs_pipeline.project import Project
from fs_pipeline.stages import train
from fs_pipeline.stages.pack import TRAIN_FILE, VAL_FILE
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parent.parent


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="tiny", show_default=True)
@click.option("--full-codec", is_flag=True, help="Decode with the release-size codec (random weights).")
@click.option("--frames", default=200, show_default=True, help="Frames to generate (21.5 per second of audio).")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(llm_size, full_codec, frames, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-merge-"))
    try:
        model_dir = open_model_dir(write_tiny_model(work / "base", llm_size=llm_size, full_codec=full_codec))
        project = Project("bench", root=work / "results")
        utterances = list(synthetic_utterances(model_dir, 8, 100))
        write_protos(project.data_dir / TRAIN_FILE, [speaker_message("spk", "synthetic", utterances[:6])])
        write_protos(project.data_dir / VAL_FILE, [speaker_message("spk", "synthetic", utterances[6:])])
        train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, batch_size=2), model_dir, choice, project)

        started = time.perf_counter()
        merged = subprocess.run(
            [sys.executable, str(REPO / "finetune_tts.py"), "--project", "bench", "--merge-weights", "--pretrained-ckpt-path",
             str(model_dir.path), "--device", choice.type],
            cwd=work, capture_output=True, text=True,
        )
        merge_seconds = time.perf_counter() - started
        if merged.returncode != 0:
            raise click.ClickException(f"merge failed: {merged.stderr.strip()}")
        merge_peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux

        synthesizer = Synthesizer(open_model_dir(work / "checkpoints" / "bench-merged"), choice)
        settings = SynthesisSettings(max_new_frames=frames)
        synthesizer.speak("Warm up.", work / "warmup.wav", SynthesisSettings(max_new_frames=8))
        speech = synthesizer.speak("The quick brown fox jumps over the lazy dog.", work / "out.wav", settings)
        codec = "full-size codec" if full_codec else "tiny codec"
        rows = [
            ["merge wall time (child process, incl. start-up and merge check)", f"{merge_seconds:.1f} s"],
            ["merge peak resident memory", f"{merge_peak_gb:.2f} GB"],
            ["synthesis: frames generated", f"{speech.frames} ({speech.audio_seconds:.1f} s of audio)"],
            ["synthesis: wall time (LLM + codec decode)", f"{speech.seconds:.2f} s"],
            ["synthesis: realtime factor", f"{speech.realtime_factor:.2f}x"],
        ]
        publish("Merge and synthesis", choice.device, f"{llm_size} LLM with random weights, {codec}, {choice.precision}",
                ["measure", "value"], rows, record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
