"""Synthesis as a user meets it: time to first audio from process start, with compilation, cold and cached.

    python -m benchmarks.synthesis_latency [--llm-size s1-mini] [--frames 300] [--upstream-frames 100]

Runs `cli_tts.py --compile --stream` twice in fresh processes on the same model, with an empty compile
cache folder (XDG_CACHE_HOME) the first time ("cold": everything compiles) and the cache the first run
left the second time ("cached": a machine that has run it once before). Each process speaks a short line,
then a long one (a --text-file of two lines, up to --frames frames each). Reported per run: seconds from
spawning the process to the first audio chunk of the first line (as the CLI reports it, plus the
interpreter's start measured here), the warm-up, and the long line's end-to-end real-time factor (seconds
of generation, LLM and streamed codec decode, per second of audio; lower is faster).

Upstream's eager `generate` (fish-speech 0.1.0) runs in the same job as the baseline for the LLM loop,
--upstream-frames frames on the same model. As in synthesis_vs_upstream, the model's vocabulary is cut to
the tokenizer's ids so that upstream's unconstrained sampling stays in range with random weights.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.common import publish
from benchmarks.synthesis_vs_upstream import FRAMES_PER_SECOND, TEXT, _fit_vocabulary_to_tokenizer, synchronize
from fs_pipeline.device import select_device
from fs_pipeline.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
SHORT = "Hello there."


def cli_run(model: Path, lines: Path, out: Path, cache: Path, frames: int, device: str) -> dict:
    """One cli_tts.py process; what it printed, with each line's arrival time since the spawn."""
    environ = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "cli_tts.py"), "--model-path", str(model), "--text-file", str(lines), "--output-dir", str(out),
               "--compile", "--stream", "--max-new-frames", str(frames), "--device", device]
    spawned = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ, cwd=REPO)
    printed = []
    for line in process.stdout:
        printed.append((time.perf_counter() - spawned, line.rstrip()))
        print(f"[{printed[-1][0]:7.1f} s] {line.rstrip()}", flush=True)
    if process.wait() != 0:
        raise click.ClickException(f"cli_tts.py failed: {printed[-5:]}")
    first = next(t for t, line in printed if line.startswith("First audio after"))
    warmup = next(float(re.search(r"Warm-up: ([\d.]+) s", line).group(1)) for _, line in printed if line.startswith("Warm-up:"))
    wrote = [re.search(r": ([\d.]+) s of audio \((\d+) frames\) in ([\d.]+) s", line) for _, line in printed if line.startswith("Wrote")]
    audio, made, seconds = float(wrote[-1].group(1)), int(wrote[-1].group(2)), float(wrote[-1].group(3))
    first_chunks = [float(re.search(r"after ([\d.]+) s of generation", line).group(1)) for _, line in printed if line.startswith("First audio")]
    return {"first_audio_from_spawn": first, "warmup": warmup, "rtf": seconds / audio, "frames": made,
            "first_chunk_warm": first_chunks[-1], "total": printed[-1][0]}


def upstream_frames_per_second(model_path: Path, choice, frames: int) -> float:
    from fish_speech.models.text2semantic.inference import decode_one_token_ar, generate

    from fs_pipeline.models import load_llm, open_model_dir
    from fs_pipeline.prompt import prompt_values

    model = load_llm(open_model_dir(model_path), choice)
    prompt = prompt_values(model.tokenizer, [(TEXT, None)], model.config.num_codebooks).to(choice.device)
    with torch.device(choice.device):
        model.setup_caches(max_batch_size=1, max_seq_len=model.config.max_seq_len, dtype=next(model.parameters()).dtype)

    def run(n):
        with torch.inference_mode():
            result = generate(model=model, prompt=prompt, max_new_tokens=n, audio_masks=None, audio_parts=None,
                              decode_one_token=decode_one_token_ar, temperature=0.8, top_p=0.8, repetition_penalty=1.1)
        return result.shape[1] - prompt.shape[1]

    run(16)
    synchronize(choice.device)
    started = time.perf_counter()
    made = run(frames)
    synchronize(choice.device)
    return made / (time.perf_counter() - started)


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="s1-mini", show_default=True)
@click.option("--full-codec/--tiny-codec", default=True, show_default=True)
@click.option("--frames", default=300, show_default=True, help="Frames of the long line (random weights rarely end earlier).")
@click.option("--upstream-frames", default=100, show_default=True, help="Frames of upstream's eager loop; 0 skips it.")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(llm_size, full_codec, frames, upstream_frames, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-latency-"))
    try:
        model = write_tiny_model(work / "model", llm_size=llm_size, full_codec=full_codec)
        _fit_vocabulary_to_tokenizer(model)
        lines = work / "lines.txt"
        lines.write_text(f"{SHORT}\n{TEXT}\n")
        cache = work / "cache"
        runs = [(name, cli_run(model, lines, work / name, cache, frames, choice.type)) for name in ("cold", "cached")]
        rows = [[f"fs-pipeline cli_tts.py --compile --stream, {name} compile cache", f"{r['first_audio_from_spawn']:.1f}", f"{r['warmup']:.1f}",
                 f"{r['first_chunk_warm']:.2f}", f"{r['rtf']:.3f}", r["frames"]] for name, r in runs]
        if upstream_frames:
            rate = upstream_frames_per_second(model, choice, upstream_frames)
            rows.append(["upstream generate (eager), LLM loop alone", "-", "-", "-", f"{FRAMES_PER_SECOND / rate:.3f}", upstream_frames])
        codec = "full-size codec" if full_codec else "tiny codec"
        publish("Synthesis latency", choice.device,
                f"{llm_size} LLM with random weights (vocabulary cut to the tokenizer's), {codec}, {choice.precision}; "
                f"each CLI process speaks {SHORT!r} then a {len(TEXT)}-character line",
                ["run", "first audio from process start (s)", "warm-up (s)", "first chunk after generation start (s)",
                 "RTF of the long line (s per audio s)", "frames of the long line"], rows, record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
