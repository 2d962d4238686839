"""Synthesis as a user meets it: time to first audio from process start, with compilation, cold and cached.

    python -m benchmarks.synthesis_latency [--llm-size s1-mini] [--frames 300] [--upstream-frames 30]
                                           [--cold-timeout 170] [--cached-timeout 75]

Runs `cli_tts.py --compile --stream` twice in fresh processes on the same model. The first ("cold") starts
with empty compile caches: our cache file (XDG_CACHE_HOME), inductor's and triton's folders
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), all under this run's temporary folder. The second ("cached") finds
what the first left there, as on a machine that has run it once before. Each process speaks a short line, then
a long one (a --text-file of two lines, up to --frames frames each). Reported per run: seconds from spawning
the process to the first audio chunk of the first line (as the CLI reports it, plus the interpreter's start
measured here), the warm-up, the first chunk's delay after generation starts, and the long line's end-to-end
real-time factor (seconds of generation, LLM and streamed codec decode, per second of audio; lower is faster).
A run that has not finished within its timeout is stopped and reported as such, with how far it got; the
cached run is skipped when the cold one did not finish (there is no cache file to start from).

Then, in this process and from the same caches, the LLM loop alone (Synthesizer.generate, compiled) and one
codec decode of its frames are timed, and upstream's eager `generate` (fish-speech 0.1.0) runs on the same
model as the baseline, --upstream-frames frames. As in synthesis_vs_upstream, the model's vocabulary is cut to
the tokenizer's ids so that upstream's unconstrained sampling stays in range with random weights.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import torch

from benchmarks.common import publish
from benchmarks.synthesis_vs_upstream import FRAMES_PER_SECOND, TEXT, _fit_vocabulary_to_tokenizer, synchronize
from fs_pipeline.device import select_device
from fs_pipeline.models import open_model_dir
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
SHORT = "Hello there."


def cache_environment(work: Path) -> dict:
    """Every compile cache of a run, under `work`: ours (XDG_CACHE_HOME), inductor's and triton's."""
    return {"XDG_CACHE_HOME": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "cache" / "inductor"),
            "TRITON_CACHE_DIR": str(work / "cache" / "triton")}


def cli_run(model: Path, lines: Path, out: Path, work: Path, frames: int, device: str, timeout: float) -> dict:
    """One cli_tts.py process, stopped after `timeout` seconds; what it printed, read into the figures
    (None where it did not get that far), and whether it finished."""
    environ = {**os.environ, **cache_environment(work), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "cli_tts.py"), "--model-path", str(model), "--text-file", str(lines), "--output-dir", str(out),
               "--compile", "--stream", "--max-new-frames", str(frames), "--device", device]
    spawned = time.perf_counter()
    # its own process group, so that a stop also ends inductor's compile workers
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ, cwd=REPO,
                               start_new_session=True)
    printed = []

    def read():
        for line in process.stdout:
            printed.append((time.perf_counter() - spawned, line.rstrip()))
            print(f"[{printed[-1][0]:7.1f} s] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    reader.join(timeout=5)
    finished = process.returncode == 0
    if process.returncode not in (0, -signal.SIGKILL):
        raise click.ClickException(f"cli_tts.py failed: {printed[-5:]}")

    def first(pattern):
        return next((float(match.group(1)) for _, line in printed if (match := re.search(pattern, line))), None)

    wrote = [re.search(r": ([\d.]+) s of audio \((\d+) frames\) in ([\d.]+) s", line) for _, line in printed if line.startswith("Wrote")]
    first_chunks = [float(re.search(r"after ([\d.]+) s of generation", line).group(1)) for _, line in printed if line.startswith("First audio")]
    return {"finished": finished, "elapsed": time.perf_counter() - spawned,
            "first_audio_from_spawn": next((t for t, line in printed if line.startswith("First audio after")), None),
            "warmup": first(r"Warm-up: ([\d.]+) s"),
            "first_chunk_warm": first_chunks[-1] if first_chunks else None,
            "rtf": float(wrote[-1].group(3)) / float(wrote[-1].group(1)) if finished else None,
            "frames": int(wrote[-1].group(2)) if finished else None}


def loop_alone(model: Path, choice, work: Path, frames: int) -> dict:
    """The compiled LLM loop alone, and one codec decode of its frames, in this process from `work`'s caches."""
    os.environ.update(cache_environment(work))
    synthesizer = Synthesizer(open_model_dir(model), choice, compile=True, compile_cache=work / "cache" / "fs-pipeline" / "compile")
    warmup = synthesizer.warm_up()
    settings = SynthesisSettings(max_new_frames=frames)
    synthesizer.generate(TEXT, settings)  # the first text: the prompt's prefill shape, the KV caches
    synchronize(choice.device)
    started = time.perf_counter()
    codes = synthesizer.generate(TEXT, settings)
    synchronize(choice.device)
    loop = time.perf_counter() - started
    started = time.perf_counter()
    audio = synthesizer._decode(codes)
    decode = time.perf_counter() - started
    synthesizer.release_caches()
    return {"synthesizer": synthesizer, "warmup": warmup, "frames": codes.shape[1], "loop": loop, "decode": decode,
            "audio": len(audio) / synthesizer.model_dir.version.sample_rate}


def upstream_frames_per_second(model, choice, frames: int) -> float:
    from fish_speech.models.text2semantic.inference import decode_one_token_ar, generate

    from fs_pipeline.prompt import prompt_values

    prompt = prompt_values(model.tokenizer, [(TEXT, None)], model.config.num_codebooks).to(choice.device)
    with torch.device(choice.device):
        model.setup_caches(max_batch_size=1, max_seq_len=model.config.max_seq_len, dtype=next(model.parameters()).dtype)

    def run(n):
        with torch.inference_mode():
            result = generate(model=model, prompt=prompt, max_new_tokens=n, audio_masks=None, audio_parts=None,
                              decode_one_token=decode_one_token_ar, temperature=0.8, top_p=0.8, repetition_penalty=1.1)
        return result.shape[1] - prompt.shape[1]

    run(8)
    synchronize(choice.device)
    started = time.perf_counter()
    made = run(frames)
    synchronize(choice.device)
    return made / (time.perf_counter() - started)


def seconds(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@click.command()
@click.option("--llm-size", type=click.Choice(["tiny", "s1-mini"]), default="s1-mini", show_default=True)
@click.option("--full-codec/--tiny-codec", default=True, show_default=True)
@click.option("--frames", default=300, show_default=True, help="Frames of the long line (random weights rarely end earlier).")
@click.option("--upstream-frames", default=30, show_default=True, help="Frames of upstream's eager loop; 0 skips it.")
@click.option("--cold-timeout", default=170.0, show_default=True, help="Seconds the cold process may run before it is stopped.")
@click.option("--cached-timeout", default=75.0, show_default=True, help="Seconds the cached process may run before it is stopped.")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(llm_size, full_codec, frames, upstream_frames, cold_timeout, cached_timeout, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-latency-"))
    try:
        model = write_tiny_model(work / "model", llm_size=llm_size, full_codec=full_codec)
        _fit_vocabulary_to_tokenizer(model)
        lines = work / "lines.txt"
        lines.write_text(f"{SHORT}\n{TEXT}\n")
        rows = []
        runs = {"cold": cli_run(model, lines, work / "cold", work, frames, choice.type, cold_timeout)}
        if runs["cold"]["finished"]:
            runs["cached"] = cli_run(model, lines, work / "cached", work, frames, choice.type, cached_timeout)
        for name, timeout in (("cold", cold_timeout), ("cached", cached_timeout)):
            run = runs.get(name)
            if run is None:
                rows.append([f"cli_tts.py --compile --stream, {name} caches", "not run: the cold run did not finish", "-", "-", "-", "-"])
            elif not run["finished"]:
                reached = "warm-up done" if run["warmup"] is not None else "still warming up"
                rows.append([f"cli_tts.py --compile --stream, {name} caches", f"not finished in {timeout:.0f} s ({reached})",
                             seconds(run["warmup"]), seconds(run["first_chunk_warm"], 2), "-", "-"])
            else:
                rows.append([f"cli_tts.py --compile --stream, {name} caches", seconds(run["first_audio_from_spawn"]), seconds(run["warmup"]),
                             seconds(run["first_chunk_warm"], 2), f"{run['rtf']:.3f}", run["frames"]])
        model_object = None
        if "cached" in runs and runs["cached"]["finished"]:
            alone = loop_alone(model, choice, work, frames)
            model_object = alone["synthesizer"].model
            rows.append([f"Synthesizer.generate alone, compiled ({alone['frames'] / alone['loop']:.0f} frames/s), warm-up from the caches", "-",
                         seconds(alone["warmup"]), "-", f"{alone['loop'] / (alone['frames'] / FRAMES_PER_SECOND):.3f}", alone["frames"]])
            rows.append([f"codec decode alone, eager, {alone['audio']:.1f} s of audio in one piece", "-", "-", "-",
                         f"{alone['decode'] / alone['audio']:.4f}", alone["frames"]])
        if upstream_frames:
            if model_object is None:
                from fs_pipeline.models import load_llm

                model_object = load_llm(open_model_dir(model), choice)
            rate = upstream_frames_per_second(model_object, choice, upstream_frames)
            rows.append([f"upstream generate (eager), LLM loop alone ({rate:.1f} frames/s)", "-", "-", "-", f"{FRAMES_PER_SECOND / rate:.3f}",
                         upstream_frames])
        codec = "full-size codec" if full_codec else "tiny codec"
        publish("Synthesis latency", choice.device,
                f"{llm_size} LLM with random weights (vocabulary cut to the tokenizer's), {codec}, {choice.precision}; "
                f"each CLI process speaks {SHORT!r} then a {len(TEXT)}-character line",
                ["run", "first audio from process start (s)", "warm-up (s)", "first chunk after generation start (s)",
                 "RTF (s per audio s)", "frames"], rows, record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
