"""Extraction throughput (audio seconds per second): our batched extractor against upstream's approach.

    python benchmarks/extract_throughput.py [--full-codec] [--clips 48] [--device cuda]

Upstream's tools/vqgan/extract_vq.py (fish-speech 0.1.0), as it intends to run: fp32, files in listing
order in chunks of up to 64 padded to the longest, each file decoded on the main thread before the
chunk is encoded. Re-implemented here from that description (its own script fails on the S1-mini codec,
it reads a sample-rate attribute the modded DAC lacks). Ours: fs_pipeline.stages.extract, clips batched
by length, decoded in DataLoader workers. Both encode the same synthetic clips (2-20 s of noisy tones)
with the same codec weights, loaded beforehand, in the same run (upstream with the library's own layers,
ours as load_codec gives it, one copy per kind of Snake and of compilation); the codec file's hash, which
our first run computes once and later runs reuse, is taken before timing. --full-codec uses the
release-size codec with random weights.

Each row, upstream's included, runs twice, timed the second time ("first run" is the first: it includes
the warm-up of the codec's first calls, and the encoder's compilation with --compile-encoder). Our rows
cover every combination of --batch-sizes, --snakes (the codec's Snake activations: fused on CUDA, as
load_codec gives them, or the library's; off CUDA both are load_codec's in-place Snake), --matmul (the
codec's matmuls in fp32, as the stage runs them, or, as an experiment, TF32 on CUDA: PyTorch's
torch.backends.cuda.matmul.allow_tf32 set for the row's runs and restored after, so every matmul of the codec,
the nearest-codeword searches' too, runs in TF32; CPU runs fp32 either way) and, with --compile-encoder, eager
and compiled. "codes as upstream" is the share of code entries equal to those of
upstream's fp32 run, "semantic codes as upstream" the same for the first codebook alone (the one the LLM's
slow transformer predicts). After the rows, one batch's encode (first --batch-sizes, first --snakes) is
timed alone: the codec's own encode against extract.encode in each --matmul. On CUDA, --snakes with both
kinds also times one activation alone, and --profile lists the CUDA kernels of that batch's encode by time
(first --matmul), then profiles one whole extract.run of the first row: how much of its wall time the GPU
was busy, and the host's calls by time (waits such as cudaStreamSynchronize show where the host held the
GPU up).
"""

import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest.mock import patch

import click
import numpy as np
import soundfile as sf
import torch

from benchmarks.common import publish
from fs_pipeline import models
from fs_pipeline.audio.io import read_wav
from fs_pipeline.device import select_device
from fs_pipeline.fileio import file_hash
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import DERIVED_CODEC_BUFFERS, FusedSnake, build_codec, load_codec, open_model_dir
from fs_pipeline.stages import extract
from fs_pipeline.tiny_model import write_tiny_model

MATMULS = ("fp32", "tf32")  # what --matmul takes


@contextmanager
def matmul_precision(matmul: str):
    """CUDA matmuls in TF32 inside for "tf32", in fp32 for "fp32"; PyTorch's process-wide flag restored after, so
    that the rows after (and upstream's reference run) keep PyTorch's default. The legacy flag, as torch 2.9+
    refuses to report a precision set through a mix of its two APIs."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def write_clips(folder: Path, count: int, sample_rate: int, max_seconds: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    speaker = folder / "speaker"
    speaker.mkdir(parents=True)
    total = 0.0
    for i in range(count):
        seconds = float(rng.uniform(2.0, max_seconds))
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(speaker / f"clip_{i:04d}.wav", audio.astype(np.float32), sample_rate, subtype="PCM_16")
        (speaker / f"clip_{i:04d}.lab").write_text("benchmark clip")
        total += seconds
    return total


def upstream_style(data: Path, codec, device, sample_rate: int, chunk_size: int) -> None:
    files = sorted(data.rglob("*.wav"))
    for start in range(0, len(files), chunk_size):
        chunk = files[start : start + chunk_size]
        audios = [torch.from_numpy(read_wav(f, sample_rate)) for f in chunk]
        lengths = torch.tensor([len(a) for a in audios])
        batch = torch.zeros(len(audios), 1, int(lengths.max()))
        for row, audio in enumerate(audios):
            batch[row, 0, : len(audio)] = audio
        with torch.inference_mode():
            codes, frames = codec.encode(batch.to(device), lengths.to(device))
        for row, f in enumerate(chunk):
            np.save(f.with_suffix(".npy"), codes[row, :, : frames[row]].cpu().numpy())


def codes_as(reference: dict[Path, np.ndarray]) -> tuple[float, float]:
    """The shares of code entries, and of the first codebook's, equal to `reference`'s (wav -> codes) in the .npy
    files now beside those wavs."""
    codes = {wav: np.load(wav.with_suffix(".npy")) for wav in reference}
    every = np.concatenate([(codes[wav] == reference[wav]).ravel() for wav in reference])
    semantic = np.concatenate([codes[wav][0] == reference[wav][0] for wav in reference])
    return float(every.mean()), float(semantic.mean())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_activations(library_codec, fused_codec, device, sample_rate: int, seconds: float = 10.0, batch: int = 16) -> None:
    """The encoder's first Snake (64 channels at the full sample rate) alone, the library's against the fused one."""
    from dac.nn.layers import Snake1d

    library, fused = (next(m for m in codec.encoder.modules() if isinstance(m, (Snake1d, FusedSnake))) for codec in (library_codec, fused_codec))
    x = torch.randn(batch, library.alpha.shape[1], int(seconds * sample_rate), device=device)
    results = {}
    with torch.inference_mode():
        for name, activation in (("library's", library), ("fused", fused)):
            for _ in range(3):  # warm-up: Triton's compile, TorchScript's profiling runs
                activation(x)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(10):
                results[name] = activation(x)
            synchronize(device)
            seconds_each = (time.perf_counter() - start) / 10
            gbps = 2 * x.numel() * x.element_size() / seconds_each / 1e9
            click.echo(f"Snake over {tuple(x.shape)}, {name} ({type(activation).__name__}): {seconds_each * 1e3:.2f} ms, "
                       f"{gbps:.0f} GB/s if it read and wrote the tensor once")
    equal = (results["library's"] == results["fused"]).float().mean().item()
    diff = (results["library's"] - results["fused"]).abs().max().item()
    click.echo(f"fused vs library's Snake: {equal:.4%} of values equal, max |difference| {diff:.2e}")


def first_batch(data: Path, sample_rate: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch_size` clips in listing order, padded to the longest, on `device`, and their lengths."""
    audios = [torch.from_numpy(read_wav(f, sample_rate)) for f in sorted(data.rglob("*.wav"))[:batch_size]]
    batch = torch.zeros(len(audios), 1, max(len(a) for a in audios))
    for row, audio in enumerate(audios):
        batch[row, 0, : len(audio)] = audio
    return batch.to(device), torch.tensor([len(a) for a in audios], device=device)


def time_encodes(codec, batch: torch.Tensor, lengths: torch.Tensor, matmuls: list[str], sample_rate: int) -> None:
    """One batch's encode alone: the codec's own encode against extract.encode (codes only) in each precision,
    with the share of codes equal to the first's."""
    calls = [("codec.encode (fp32)", "fp32", lambda: codec.encode(batch, lengths)[0])]
    calls += [(f"extract.encode ({matmul})", matmul, lambda: extract.encode(codec, batch)) for matmul in matmuls]
    results = {}
    for name, matmul, call in calls:
        with torch.inference_mode(), matmul_precision(matmul):
            call()  # warm-up
            synchronize(batch.device)
            start = time.perf_counter()
            for _ in range(3):
                results[name] = call()
            synchronize(batch.device)
        seconds = (time.perf_counter() - start) / 3
        same = (results[name] == next(iter(results.values()))).float().mean().item()
        click.echo(f"One encode of {tuple(batch.shape)} ({batch.shape[-1] / sample_rate:.1f} s each padded), {name}: "
                   f"{seconds * 1e3:.1f} ms, {batch.shape[0] * batch.shape[-1] / sample_rate / seconds:.0f} audio-s/s padded, "
                   f"{same:.2%} of codes as codec.encode's")


def profile_encode(codec, batch: torch.Tensor, sample_rate: int, matmul: str) -> None:
    """The CUDA kernels of one extract.encode of `batch`, by total time."""
    device = batch.device
    with torch.inference_mode(), matmul_precision(matmul):
        extract.encode(codec, batch)  # warm-up
        synchronize(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            extract.encode(codec, batch)
            synchronize(device)
    click.echo(f"Profile of one encode ({batch.shape[0]} clips, {batch.shape[-1] / sample_rate:.1f} s each padded, "
               f"{matmul} matmuls):")
    click.echo(profiler.key_averages().table(sort_by="device_time_total", row_limit=15, max_name_column_width=70))


def profile_run(extract_once, device) -> None:
    """One whole extract.run under the profiler: the share of its wall time with a kernel or copy on the GPU, and
    the host's calls by their own time. The profiler's own overhead lowers that share somewhat."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        extract_once()
        synchronize(device)
        wall = time.perf_counter() - start
    # the GPU's own events (kernels, copies) alone: a host op's device time counts its kernels a second time
    on_gpu = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(event.device_time_total for event in on_gpu) / 1e6
    click.echo(f"Profile of one extract.run: {wall:.2f} s of wall time, GPU busy {busy:.2f} s ({busy / wall:.0%}). "
               "The host's calls by their own time (DataLoader...__next__ is waiting for decoded clips):")
    click.echo(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))


@click.command()
@click.option("--full-codec", is_flag=True, help="Release-size codec (random weights) instead of the tiny one.")
@click.option("--clips", default=48, show_default=True)
@click.option("--max-seconds", default=20.0, show_default=True, help="Clip lengths are uniform in [2, this].")
@click.option("--batch-sizes", default="1,8,16,32", show_default=True, help="Our batch sizes to measure.")
@click.option("--num-workers", default=4, show_default=True)
@click.option("--upstream-chunk", default=64, show_default=True,
              help="Files per upstream batch (upstream uses 64; lower it where 64 long clips don't fit in GPU memory).")
@click.option("--compile-encoder", is_flag=True, help="Also time ours with the encoder compiled (ExtractSettings.compile).")
@click.option("--snakes", default="fused", show_default=True,
              help="Our codec's Snake activations to measure: fused (load_codec's default: fused on CUDA), library, or both.")
@click.option("--matmul", default="fp32", show_default=True,
              help=f"The codec's matmul precision on CUDA to measure: {' or '.join(MATMULS)}, or both comma-separated "
                   "(tf32: an experiment, PyTorch's TF32 switch set around the row; the stage runs fp32).")
@click.option("--profile", is_flag=True,
              help="On CUDA, list the kernels of one encode and profile one extract.run (first --batch-sizes, --snakes, --matmul).")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md (smoke tests).")
def main(full_codec, clips, max_seconds, batch_sizes, num_workers, upstream_chunk, compile_encoder, snakes, matmul, profile,
         device, no_record):
    snakes, matmuls = snakes.split(","), matmul.split(",")
    assert set(snakes) <= {"fused", "library"}, snakes
    assert set(matmuls) <= set(MATMULS), matmuls
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-extract-"))
    try:
        model_dir = open_model_dir(write_tiny_model(work / "model", full_codec=full_codec))
        data = work / "data"
        audio_seconds = write_clips(data, clips, model_dir.version.sample_rate, max_seconds)
        # upstream runs the library's own layers from the file (load_codec folds weight norm and swaps in
        # faster Snake activations)
        upstream_codec = build_codec(model_dir.codec_cfg).eval()
        state = torch.load(model_dir.path / "codec.pth", map_location="cpu", weights_only=True)
        missing, unexpected = upstream_codec.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith(DERIVED_CODEC_BUFFERS) for k in missing), (missing, unexpected)
        upstream_codec = upstream_codec.to(choice.device)
        start = time.perf_counter()
        upstream_style(data, upstream_codec, choice.device, model_dir.version.sample_rate, upstream_chunk)  # first run
        synchronize(choice.device)
        upstream_first_rate = audio_seconds / (time.perf_counter() - start)

        codecs = {}  # (snakes, compiled) -> codec: compiling changes the codec's encoder in place

        def codec_for(snake: str, compiled: bool):
            if (snake, compiled) not in codecs:
                # the library's Snake: load_codec as where the fused one fails its check
                with nullcontext() if snake == "fused" else patch.object(models, "fused_snake_works", lambda device: False):
                    codecs[snake, compiled] = load_codec(model_dir, choice)
            return codecs[snake, compiled]

        if choice.type == "cuda" and len(snakes) == 2:
            time_activations(codec_for("library", False), codec_for("fused", False), choice.device, model_dir.version.sample_rate)

        rows = []
        start = time.perf_counter()
        upstream_style(data, upstream_codec, choice.device, model_dir.version.sample_rate, upstream_chunk)
        synchronize(choice.device)
        upstream_rate = audio_seconds / (time.perf_counter() - start)
        wavs = sorted(data.rglob("*.wav"))
        reference = {wav: np.load(wav.with_suffix(".npy")) for wav in wavs}
        rows.append((f"upstream approach (chunks of {upstream_chunk}, listing order, main-thread decode)", "library's, eager, fp32",
                     upstream_first_rate, upstream_rate, 1.0, 1.0))
        variants = [(b, s, c, m) for b in [int(b) for b in batch_sizes.split(",")] for s in snakes
                    for c in ([False, True] if compile_encoder else [False]) for m in matmuls]
        on_gpu = choice.type == "cuda"

        def extract_once(settings: extract.ExtractSettings, snake: str, matmul: str, manifest_name: str) -> None:
            (data / extract.CODES_RECORD).unlink(missing_ok=True)  # no records: every clip is extracted
            with matmul_precision(matmul):
                extract.run(settings, model_dir, choice, Manifest(work / manifest_name), codec_for(snake, settings.compile))

        first_variant = None  # (settings, snake, matmul) of the first row, which --profile profiles
        for batch_size, snake, compiled, precision in variants:
            codec = codec_for(snake, compiled)
            settings = extract.ExtractSettings(data, batch_size=batch_size, num_workers=num_workers, compile=compiled)
            first_variant = first_variant or (settings, snake, precision)
            file_hash(model_dir.path / "codec.pth")  # a first run hashes the codec once (1-2 s at full size)
            rates = []
            for attempt in ("first", "timed"):
                start = time.perf_counter()
                extract_once(settings, snake, precision, f"manifest-{batch_size}-{snake}-{compiled}-{precision}-{attempt}.json")
                synchronize(choice.device)
                rates.append(audio_seconds / (time.perf_counter() - start))
            same, same_semantic = codes_as(reference)
            encoder = ", ".join(["weight norm folded",
                                 "fused Snake" if any(isinstance(m, FusedSnake) for m in codec.modules()) else "library's Snake" if on_gpu else "in-place Snake",
                                 "compiled" if compiled and on_gpu else "eager",
                                 f"{precision} matmuls" if on_gpu or precision == "fp32"
                                 else f"fp32 matmuls ({precision} is CUDA only)"])
            rows.append((f"fs-pipeline, batch {batch_size} (at most {settings.max_batch_seconds:.0f} audio-s), {num_workers} workers", encoder,
                         *rates, same, same_semantic))
            click.echo(f"batch {batch_size}, {encoder}: {rates[1]:.1f} audio-s/s ({rates[1] / upstream_rate:.2f}x upstream; "
                       f"first run {rates[0]:.1f}), {same:.2%} of codes as upstream, "
                       f"{same_semantic:.2%} of semantic codes")  # in case a later row runs out of time

        codec_name = "full-size S1-mini codec, random weights" if full_codec else "tiny codec"
        publish("Extraction throughput", choice.device, f"{clips} clips, {audio_seconds:.0f} s of audio, {codec_name}",
                ["extractor", "encoder", "first run audio-s/s", "audio-s/s", "× upstream", "codes as upstream",
                 "semantic codes as upstream"],
                [[name, encoder, f"{first:.1f}", f"{rate:.1f}", f"{rate / upstream_rate:.2f}", f"{same:.2%}", f"{semantic:.2%}"]
                 for name, encoder, first, rate, same, semantic in rows],
                record=not no_record)
        batch, lengths = first_batch(data, model_dir.version.sample_rate, int(batch_sizes.split(",")[0]), choice.device)
        time_encodes(codec_for(snakes[0], False), batch, lengths, matmuls, model_dir.version.sample_rate)
        if profile and on_gpu:
            profile_encode(codec_for(snakes[0], False), batch, model_dir.version.sample_rate, matmuls[0])
            profile_run(lambda: extract_once(*first_variant, "manifest-profile.json"), choice.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
