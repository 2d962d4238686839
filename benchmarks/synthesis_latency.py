"""Synthesis as a user meets it: time to first audio from process start, with compilation, cold and cached.

    python -m benchmarks.synthesis_latency [--llm-size s1-mini] [--frames 300] [--upstream-frames 30]
                                           [--cold-timeout 170] [--cached-timeout 75]
                                           [--profile-warmup] [--profile-frames N] [--cli-env NAME=VALUE ...]

Runs `cli_tts.py --compile --stream` twice in fresh processes on the same model. The first ("cold") starts
with empty compile caches: our cache file (XDG_CACHE_HOME), inductor's and triton's folders
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), all under this run's temporary folder. The second ("cached") finds
what the first left there, and Python's bytecode of the modules it imported, as on a machine that has run it once before. Each process speaks a short line, then
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

Two profiles say where the time goes (neither changes the table's figures):
--profile-warmup  one more cached CLI process, run under cProfile: its top entries by cumulative time (imports,
                  loading, dynamo, inductor's cache lookups, the CUDA graph's capture, the codec's first decode).
                  cProfile slows Python-heavy work (imports, tracing) more than the rest: compare the parts, not
                  the total, with the unprofiled run.
--profile-frames N  N frames of the compiled step run without the CUDA graph under torch.profiler: the top
                  kernels by total time, and kernel time per frame against wall time per frame (with and without
                  the graph, unprofiled): a frame whose wall time is far above its kernel time is bound by launches
                  and gaps, not by the kernels' work. Then one slow layer's attention at a decoding step, timed
                  alone: fish-speech's, ours (modeling.attend_cached) and SDPA's enable_gqa.
"""

import io
import os
import pstats
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
from fs_pipeline.stages import synthesize
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parent.parent
SHORT = "Hello there."


def cache_environment(work: Path) -> dict:
    """Every compile cache of a run, under `work`: ours (XDG_CACHE_HOME), inductor's and triton's."""
    return {"XDG_CACHE_HOME": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "cache" / "inductor"),
            "TRITON_CACHE_DIR": str(work / "cache" / "triton")}


def cli_run(model: Path, lines: Path, out: Path, work: Path, frames: int, device: str, timeout: float, profile: Path | None = None,
            environment: dict | None = None) -> dict:
    """One cli_tts.py process, stopped after `timeout` seconds; what it printed, read into the figures
    (None where it did not get that far), and whether it finished. With `profile`, it runs under cProfile,
    which writes its statistics there; `environment` adds to its environment variables."""
    environ = {**os.environ, **(environment or {}), **cache_environment(work), "PYTHONUNBUFFERED": "1"}
    # Python keeps its bytecode (.pyc) as on a user's machine, so that a process after the first finds it, as it
    # finds the compiled kernels: some machines (our GPU machines) switch that off, and every process then compiles
    # the source of torch and transformers again, seconds of each start-up
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    command = [sys.executable, *profiler, str(REPO / "cli_tts.py"), "--model-path", str(model), "--text-file", str(lines), "--output-dir", str(out),
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
    # the CLI times from its main() on; the process began before it by when it printed its start-up less that start-up
    startup = next(((t, float(match.group(1))) for t, line in printed if (match := re.match(r"Start-up: ([\d.]+) s", line))), None)
    first_audio = first(r"First audio after [\d.]+ s of generation, ([\d.]+) s from start")
    return {"finished": finished, "elapsed": time.perf_counter() - spawned,
            "first_audio_from_spawn": None if None in (startup, first_audio) else startup[0] - startup[1] + first_audio,
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


def print_profile(path: Path, top: int = 40) -> None:
    """The `top` entries of a cProfile file by cumulative time."""
    text = io.StringIO()
    pstats.Stats(str(path), stream=text).sort_stats("cumulative").print_stats(top)
    print(f"\nWhere a cached CLI process spends its time (cProfile, cumulative seconds; {path.name}):\n{text.getvalue()}")


def frame_profile(synthesizer: Synthesizer, frames: int, top: int = 15) -> None:
    """Runs `frames` frames of the compiled step without its CUDA graph under torch.profiler, and prints the top
    kernels by total time, and kernel time per frame against wall time per frame: without the graph and with it
    (on CUDA), both unprofiled, and under the profiler. The frames are fed dummy frames at positions 0, 1, ..:
    every step attends over the whole KV cache whatever its position, so their cost is a text's."""
    from torch.profiler import ProfilerActivity, profile

    choice, device = synthesizer.choice, synthesizer.choice.device
    cuda = device.type == "cuda"
    synthesizer._ensure_caches(min(synthesize.SHORT_CONTEXT, synthesizer.model.config.max_seq_len))
    with torch.inference_mode(), choice.autocast():
        frame, window, sampling = synthesizer._example_frame(), synthesizer._empty_window(), synthesizer._sampling(SynthesisSettings())

        def run(step) -> float:
            synchronize(device)
            started = time.perf_counter()
            for position in range(frames):
                step(frame, torch.tensor([position], device=device), window, *sampling)
            synchronize(device)
            return (time.perf_counter() - started) / frames

        run(synthesizer._step)  # compiled already by warm_up: this settles the allocator
        walls = {"compiled step, no CUDA graph": run(synthesizer._step)}
        if cuda:
            walls["compiled step in its CUDA graph (as generation runs it)"] = run(synthesizer._step_function(sampling))
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as profiler:
            walls["compiled step, no CUDA graph, under the profiler"] = run(synthesizer._step)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in profiler.key_averages() if e.device_type == kind]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events.sort(key=own, reverse=True)
    total = sum(own(e) for e in events)  # microseconds
    what = "CUDA kernels" if cuda else "CPU ops (self time; there are no kernels off CUDA)"
    print(f"\n{frames} frames of the compiled step, {what}: {total / frames / 1000:.3f} ms per frame in "
          f"{sum(e.count for e in events) / frames:.0f} launches")
    for label, wall in walls.items():
        print(f"  wall time per frame, {label}: {wall * 1000:.3f} ms")
    print(f"  {'kernel':<90} {'per frame':>9} {'us each':>9} {'share':>6}")
    for e in events[:top]:
        print(f"  {e.key[:90]:<90} {e.count / frames:9.1f} {own(e) / max(e.count, 1):9.1f} {own(e) / max(total, 1e-9):6.1%}")


def decode_attention_timings(model, choice, calls: int = 200) -> None:
    """One slow layer's attention at a decoding step, at `model`'s shapes over SHORT_CONTEXT cached positions, in the
    compute dtype, eager: fish-speech's (the cache repeated to every head, then SDPA with the mask), ours
    (modeling.attend_cached), and SDPA's own enable_gqa with the mask. Prints microseconds per call and per frame
    (one call per slow layer)."""
    from fs_pipeline.modeling import attend_cached

    config, device = model.config, choice.device
    positions = min(synthesize.SHORT_CONTEXT, config.max_seq_len)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, config.n_head, 1, config.head_dim, device=device, dtype=choice.dtype, generator=generator)
    k, v = (torch.randn(1, config.n_local_heads, positions, config.head_dim, device=device, dtype=choice.dtype, generator=generator)
            for _ in range(2))
    mask = model.causal_mask[None, None, torch.tensor([positions // 2]), :positions].to(device)
    groups = config.n_head // config.n_local_heads
    variants = {
        "fish-speech: cache repeated to every head, SDPA with the mask":
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                                                     attn_mask=mask),
        "modeling.attend_cached: grouped cache read as it is": lambda: attend_cached(q, k, v, mask),
        "SDPA enable_gqa with the mask": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
    }
    reference = variants[next(iter(variants))]()
    print(f"\nOne slow layer's attention at a decoding step ({config.n_head} query / {config.n_local_heads} key-value heads of "
          f"{config.head_dim}, {positions} cached positions, {choice.dtype}, eager):")
    with torch.inference_mode():
        for label, attention in variants.items():
            for _ in range(10):
                attention()
            synchronize(device)
            started = time.perf_counter()
            for _ in range(calls):
                out = attention()
            synchronize(device)
            each = (time.perf_counter() - started) / calls
            difference = (out.float() - reference.float()).abs().max().item()
            print(f"  {label:<64} {each * 1e6:8.1f} us, {each * config.n_layer * 1e3:6.3f} ms per frame; "
                  f"max difference from the first {difference:.1e}")


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
@click.option("--profile-warmup", is_flag=True,
              help="Run one more cached CLI process under cProfile and print where its start-up and warm-up go.")
@click.option("--profile-frames", type=click.IntRange(min=0), default=0, show_default=True,
              help="Profile this many frames of the compiled step (no CUDA graph) with torch.profiler: top kernels, kernel vs wall time per frame.")
@click.option("--cli-env", multiple=True, metavar="NAME=VALUE",
              help="An environment variable for the CLI processes (repeatable): torch's own switches, e.g. TORCH_LOGS=recompiles, "
                   "TORCHINDUCTOR_COMPILE_THREADS=1, TORCH_CACHING_PRECOMPILE=1 (experimental in torch).")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(llm_size, full_codec, frames, upstream_frames, cold_timeout, cached_timeout, profile_warmup, profile_frames, cli_env, device,
         no_record):
    if bad := [setting for setting in cli_env if "=" not in setting]:
        raise click.BadParameter(f"{bad[0]!r} is not NAME=VALUE", param_hint="--cli-env")
    environment = dict(setting.split("=", 1) for setting in cli_env)
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-latency-"))
    try:
        model = write_tiny_model(work / "model", llm_size=llm_size, full_codec=full_codec)
        _fit_vocabulary_to_tokenizer(model)
        lines = work / "lines.txt"
        lines.write_text(f"{SHORT}\n{TEXT}\n")
        rows = []
        runs = {"cold": cli_run(model, lines, work / "cold", work, frames, choice.type, cold_timeout, environment=environment)}
        if runs["cold"]["finished"]:
            runs["cached"] = cli_run(model, lines, work / "cached", work, frames, choice.type, cached_timeout, environment=environment)
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
        cached = "cached" in runs and runs["cached"]["finished"]
        if cached and profile_warmup:
            statistics = work / "cached.prof"
            cli_run(model, lines, work / "profiled", work, frames, choice.type, 2 * cached_timeout, profile=statistics, environment=environment)
            if statistics.is_file():
                print_profile(statistics)
            else:
                print("\n--profile-warmup: the profiled process wrote no statistics (stopped before it ended?)")
        model_object = None
        if cached:
            alone = loop_alone(model, choice, work, frames)
            model_object = alone["synthesizer"].model
            if profile_frames:
                frame_profile(alone["synthesizer"], profile_frames)
                decode_attention_timings(alone["synthesizer"].model, choice)
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
