"""Extraction throughput (audio seconds per second): our batched extractor against upstream's approach.

    python benchmarks/extract_throughput.py [--full-codec] [--clips 48] [--device cuda]

Upstream's tools/vqgan/extract_vq.py (fish-speech 0.1.0), as it intends to run: fp32, files in listing
order in chunks of up to 64 padded to the longest, each file decoded on the main thread before the
chunk is encoded. Re-implemented here from that description (its own script fails on the S1-mini codec,
it reads a sample-rate attribute the modded DAC lacks). Ours: fs_pipeline.stages.extract, clips batched
by length, decoded in DataLoader workers. Both encode the same synthetic clips (2-20 s of noisy tones)
with the same codec weights, loaded once beforehand, in the same run (upstream with the library's own
layers, ours as load_codec gives it); the codec file's hash, which our first run computes once and later
runs reuse, is taken before timing. --full-codec uses the release-size codec
with random weights.

Each of our rows runs twice, timed the second time (with --compile-encoder the first run compiles the
encoder on CUDA, for any length). "codes as upstream" is the share of code entries equal to those of
upstream's fp32 run.
"""

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import soundfile as sf
import torch

from benchmarks.common import publish
from fs_pipeline.audio.io import read_wav
from fs_pipeline.device import select_device
from fs_pipeline.fileio import file_hash
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import DERIVED_CODEC_BUFFERS, build_codec, load_codec, open_model_dir
from fs_pipeline.stages import extract
from fs_pipeline.tiny_model import write_tiny_model

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


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@click.command()
@click.option("--full-codec", is_flag=True, help="Release-size codec (random weights) instead of the tiny one.")
@click.option("--clips", default=48, show_default=True)
@click.option("--max-seconds", default=20.0, show_default=True, help="Clip lengths are uniform in [2, this].")
@click.option("--batch-sizes", default="1,8,16,32", show_default=True, help="Our batch sizes to measure.")
@click.option("--num-workers", default=4, show_default=True)
@click.option("--upstream-chunk", default=64, show_default=True,
              help="Files per upstream batch (upstream uses 64; lower it where 64 long clips don't fit in GPU memory).")
@click.option("--compile-encoder", is_flag=True, help="Also time ours with the encoder compiled (ExtractSettings.compile).")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True, help="Print only; don't append to RESULTS.md (smoke tests).")
def main(full_codec, clips, max_seconds, batch_sizes, num_workers, upstream_chunk, compile_encoder, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-extract-"))
    try:
        model_dir = open_model_dir(write_tiny_model(work / "model", full_codec=full_codec))
        data = work / "data"
        audio_seconds = write_clips(data, clips, model_dir.version.sample_rate, max_seconds)
        codec = load_codec(model_dir, choice)
        # upstream runs the library's own layers from the file (load_codec folds weight norm and, off CUDA,
        # swaps in faster Snake activations)
        upstream_codec = build_codec(model_dir.codec_cfg).eval()
        state = torch.load(model_dir.path / "codec.pth", map_location="cpu", weights_only=True)
        missing, unexpected = upstream_codec.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith(DERIVED_CODEC_BUFFERS) for k in missing), (missing, unexpected)
        upstream_codec = upstream_codec.to(choice.device)
        upstream_style(data, upstream_codec, choice.device, model_dir.version.sample_rate, upstream_chunk)  # warm-up
        synchronize(choice.device)

        rows = []
        start = time.perf_counter()
        upstream_style(data, upstream_codec, choice.device, model_dir.version.sample_rate, upstream_chunk)
        synchronize(choice.device)
        upstream_rate = audio_seconds / (time.perf_counter() - start)
        wavs = sorted(data.rglob("*.wav"))
        reference = {wav: np.load(wav.with_suffix(".npy")) for wav in wavs}
        rows.append((f"upstream approach (chunks of {upstream_chunk}, listing order, main-thread decode)", "library's, eager", upstream_rate, 1.0))
        for batch_size in [int(b) for b in batch_sizes.split(",")]:
            for compiled in [False, True] if compile_encoder else [False]:
                settings = extract.ExtractSettings(data, batch_size=batch_size, num_workers=num_workers, compile=compiled)
                file_hash(model_dir.path / "codec.pth")  # a first run hashes the codec once (1-2 s at full size)
                for attempt in ("warm-up", "timed"):
                    (data / extract.CODES_RECORD).unlink(missing_ok=True)  # no records: every clip is extracted
                    manifest = Manifest(work / f"manifest-{batch_size}-{compiled}-{attempt}.json")
                    start = time.perf_counter()
                    extract.run(settings, model_dir, choice, manifest, codec)
                    synchronize(choice.device)
                    seconds = time.perf_counter() - start
                same = np.mean(np.concatenate([(np.load(wav.with_suffix(".npy")) == reference[wav]).ravel() for wav in wavs]))
                encoder = "weight norm folded, " + ("compiled" if compiled and choice.type == "cuda" else "eager")
                rows.append((f"fs-pipeline, batch {batch_size} (at most {settings.max_batch_seconds:.0f} audio-s), {num_workers} workers", encoder,
                             audio_seconds / seconds, same))

        codec_name = "full-size S1-mini codec, random weights" if full_codec else "tiny codec"
        publish("Extraction throughput", choice.device, f"{clips} clips, {audio_seconds:.0f} s of audio, {codec_name}",
                ["extractor", "encoder", "audio-s/s", "× upstream", "codes as upstream"],
                [[name, encoder, f"{rate:.1f}", f"{rate / upstream_rate:.2f}", f"{same:.2%}"] for name, encoder, rate, same in rows],
                record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
