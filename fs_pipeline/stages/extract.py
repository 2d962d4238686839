"""Extract: audio clips -> semantic codes.

Reads   <data_dir>/<speaker>/*.wav (each with a non-empty .lab, checked first), the base model's codec
Writes  <clip>.npy next to each wav: int64 codes, shape (num_codebooks, frames); per-clip records (hashes
        and audio stats for the QA report) in <data_dir>/.codes.json, which every project on the dataset
        shares, and a copy in the project manifest's "extract" entry
Skips   a clip whose audio hash, codec identity and .npy hash match its record, whichever project made it

Speed: clips are decoded in DataLoader workers; each batch's codes come back to the host by an asynchronous
copy, and a second thread writes them while the GPU encodes the next batch. `encode` computes only the codes
(the codec's own encode also rebuilds features it then drops). On CUDA, load_codec runs each of the codec's
Snake activations as one fused Triton kernel where Triton runs there (else the library's), which writes straight
into the padded input of the causal convolution after it; inside a residual unit the convolutions' biases are
added by the kernels after them (models.FusedResidualUnit). Its transformers build their attention masks on the
GPU. The codec's matmuls run in fp32, as fish-speech's: TF32 matmuls were 1.12x faster
on an H200 but gave other codes for 0.84% of entries (benchmarks/RESULTS.md, issue 22). `compile` (off by
default) compiles the encoder on CUDA: at full size its compilation took over a minute on an H100 and its gain is
not measured yet (benchmarks/RESULTS.md, 2026-11-27).
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from loguru import logger
from tqdm import tqdm

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import read_wav
from fs_pipeline.dataset import DECODE_WORKERS, Clip, list_clips
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import atomic_path
from fs_pipeline.lock import project_lock
from fs_pipeline.manifest import DONE, Manifest
from fs_pipeline.models import ModelDir, codec_identity, load_codec

STAGE = "extract"
CODES_RECORD = ".codes.json"  # in the dataset dir, beside the codes it describes
FULL_SCALE = 0.999  # samples at or above this magnitude count as clipped


@dataclass(frozen=True)
class ExtractSettings:
    data_dir: Path
    batch_size: int = 16
    max_batch_seconds: float = 240.0  # padded audio per codec batch: bounds GPU memory when clips are long
    num_workers: int = DECODE_WORKERS
    compile: bool = False  # compile the encoder on CUDA (see the module's docstring)


@dataclass(frozen=True)
class ExtractResult:
    extracted: int
    skipped: int
    audio_seconds: float  # of the clips extracted in this run
    seconds: float


def check(settings: ExtractSettings) -> None:
    if settings.batch_size < 1:
        raise PipelineError(f"--batch-size-extract must be at least 1 (got {settings.batch_size})")
    if not settings.max_batch_seconds > 0:
        raise PipelineError(f"--batch-seconds-extract must be positive (got {settings.max_batch_seconds})")
    if settings.num_workers < 0:
        raise PipelineError(f"--num-workers-extract must be 0 or more (got {settings.num_workers})")


def run(settings: ExtractSettings, model_dir: ModelDir, choice: DeviceChoice, manifest: Manifest, codec=None,
        force: bool = False) -> ExtractResult:
    """Extract what is stale, or with `force` every clip. `codec` is the loaded codec where the caller holds
    one; else it is loaded when needed."""
    check(settings)
    clips = list_clips(settings.data_dir)
    with project_lock(settings.data_dir, "extract"):  # projects on one dataset share its codes
        return _run(settings, clips, model_dir, choice, manifest, codec, force)


def _run(settings: ExtractSettings, clips: list[Clip], model_dir: ModelDir, choice: DeviceChoice, manifest: Manifest, codec,
         force: bool) -> ExtractResult:
    started = time.perf_counter()
    shared = Manifest(Path(settings.data_dir) / CODES_RECORD)
    codec_id = codec_identity(model_dir, shared.hash)
    shared_records = shared.data.setdefault("clips", {})
    records = {}
    todo = []
    for clip in clips:
        record = shared_records.get(clip.key)
        if not force and _is_done(clip, record, codec_id, shared):
            records[clip.key] = record
        else:
            todo.append(clip)

    audio_seconds = 0.0
    if todo:
        durations = _durations(todo, settings.data_dir)
        audio_seconds = sum(durations.values())
        logger.info(f"extracting codes for {len(todo)} clips ({audio_seconds / 60:.1f} min of audio); {len(records)} up to date")
        codec = fast_encoder(codec or load_codec(model_dir, choice), choice, settings.compile)
        batches = _batches_by_length(todo, durations, settings.batch_size, settings.max_batch_seconds)
        on_gpu = choice.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _ClipAudio(todo, model_dir.version.sample_rate),
            batch_sampler=batches,
            num_workers=settings.num_workers,
            collate_fn=_pad_batch,
            pin_memory=on_gpu,  # page-locked batches copy to the GPU without a wait
        )

        def save(indices, codes, copied, frames, stats) -> None:
            if copied is not None:
                copied.synchronize()  # this batch's copy alone, queued before the next batch's encode
            codes = codes.numpy().astype(np.int64)
            for row, index in enumerate(indices):
                clip = todo[index]
                _save_npy(clip.npy, codes[row, :, : frames[row]])
                records[clip.key] = shared_records[clip.key] = {
                    "audio": shared.hash(clip.wav), "codec": codec_id, "codes": shared.hash(clip.npy), **stats[row]
                }
            shared.save()  # after the batch's codes: a record never names a file that isn't complete
            bar.update(sum(durations[todo[i].key] for i in indices))

        progress = "{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]"
        with tqdm(total=audio_seconds, unit="audio-s", desc="extract", bar_format=progress, dynamic_ncols=True) as bar:
            _encode_batches(loader, codec, choice, save)

    entry = manifest.entry(STAGE)
    # A rerun with nothing to do keeps its completion, so what was made from it stays current.
    if manifest.state(STAGE) != DONE or records != entry.get("clips"):
        manifest.complete(STAGE, data_dir=str(Path(settings.data_dir).resolve()), codec=codec_id, clips=records,
                          outputs=manifest.hash_outputs([c.npy for c in clips]))
    return ExtractResult(len(todo), len(clips) - len(todo), audio_seconds, time.perf_counter() - started)


def _encode_batches(loader, codec, choice: DeviceChoice, save) -> None:
    """Encode each batch of `loader` and hand its codes to `save` on a second thread, one batch at a time and in
    order: on CUDA the host queues a batch's encode without waiting for it, so one batch's files are written while
    the GPU encodes the next, and at most two batches are in flight."""
    on_gpu = choice.type == "cuda"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-save") as writer:
        written = None
        for indices, audio, lengths, stats in loader:
            with torch.inference_mode():
                codes = encode(codec, audio.to(choice.device, non_blocking=on_gpu))
            codes, copied = _to_host(codes)
            if written is not None:
                written.result()  # raises what saving the last batch raised
            written = writer.submit(save, indices, codes, copied, frame_counts(lengths, codec.frame_length).tolist(), stats)
        if written is not None:
            written.result()


def encode(codec: torch.nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """Codes (batch, codebooks, frames) for `audio` (batch, 1, samples): codec.encode's, by the same layers in the
    same order, without the work whose result codec.encode drops. Its quantizer's forward goes on from the codes
    to rebuild the quantized features through a second transformer and upsampling blocks (at S1-mini size 8
    transformer layers and two ConvNeXt blocks: 31% of the encode's matmul FLOPs, 8% of all), which it discards."""
    audio = torch.nn.functional.pad(audio, (0, -audio.shape[-1] % codec.frame_length))  # whole frames, as encode pads
    quantizer = codec.quantizer
    z = quantizer.pre_module(quantizer.downsample(codec.encoder(audio)))
    semantic_z, semantic_codes, *_ = quantizer.semantic_quantizer(z)
    _, residual_codes, *_ = quantizer.quantizer(z - semantic_z)
    return torch.cat([semantic_codes, residual_codes], dim=1)


def frame_counts(lengths: torch.Tensor, frame_length: int) -> torch.Tensor:
    """Each clip's number of frames, from its length in samples: codec.encode's count (the float ceil it computes
    is exact below 2**24 samples, 6 minutes at 44.1 kHz; this stays exact beyond)."""
    return -(-lengths // frame_length)


def _to_host(codes: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """The codes on their way to host memory. On CUDA an asynchronous copy (into page-locked memory) and an event
    recorded behind it: waiting on the event waits for this batch alone, where a plain .cpu() issued after the
    next batch's encode would wait for that encode too. Elsewhere (CPU, MPS) a plain copy to the CPU."""
    if codes.device.type != "cuda":
        return codes.cpu(), None
    host = codes.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def fast_encoder(codec: torch.nn.Module, choice: DeviceChoice, compile: bool) -> torch.nn.Module:
    """The codec with its encoder compiled on CUDA, for any batch length (dynamic shapes), when `compile`:
    inductor fuses each Snake activation at the full sample rate into the convolutions' neighbours, where
    the eager encoder reads and writes the full-rate feature maps once per elementwise op."""
    if compile and choice.type == "cuda" and not getattr(codec.encoder, "_compiled_call_impl", None):
        codec.encoder.compile(dynamic=True)
    return codec


def _is_done(clip: Clip, record: dict | None, codec_id: str, manifest: Manifest) -> bool:
    return (
        record is not None
        and record.get("codec") == codec_id
        and clip.npy.is_file()
        and record.get("codes") == manifest.hash(clip.npy)
        and record.get("audio") == manifest.hash(clip.wav)
    )


def _durations(clips: list[Clip], data_dir: Path) -> dict[str, float]:
    """Each clip's duration from its header; every unreadable clip is reported at once, before work starts."""
    durations, problems = {}, []
    for clip in clips:
        try:
            info = sf.info(clip.wav)
        except (sf.LibsndfileError, RuntimeError) as e:
            problems.append(f"{clip.key} ({str(e).splitlines()[0]})")
            continue
        if info.frames == 0:
            problems.append(f"{clip.key} (no samples)")
        durations[clip.key] = info.frames / info.samplerate
    if problems:
        raise PipelineError(
            f"{len(problems)} clip(s) in {data_dir} can't be decoded: {'; '.join(problems[:10])}: "
            "re-create them with prepare_dataset.py or delete them (with their .lab) and rerun"
        )
    return durations


def _batches_by_length(clips: list[Clip], durations: dict[str, float], batch_size: int, max_seconds: float) -> list[list[int]]:
    """Indices into `clips`, grouped so that clips of similar length share a batch (little padding). A batch
    holds at most `batch_size` clips and, padded to its longest, at most `max_seconds` of audio; a clip
    longer than that goes alone."""
    order = sorted(range(len(clips)), key=lambda i: (durations[clips[i].key], clips[i].key))
    batches: list[list[int]] = []
    for i in order:  # ascending, so clip i is the longest of any batch it joins
        batch = batches[-1] if batches else None
        if batch and len(batch) < batch_size and (len(batch) + 1) * durations[clips[i].key] <= max_seconds:
            batch.append(i)
        else:
            batches.append([i])
    return batches


class _ClipAudio(torch.utils.data.Dataset):
    """Decodes and resamples clips in DataLoader workers, and measures what the QA report needs."""

    def __init__(self, clips: list[Clip], sample_rate: int):
        self.clips, self.sample_rate = clips, sample_rate

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        audio = read_wav(self.clips[index].wav, self.sample_rate)
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        stats = {
            "seconds": round(len(audio) / self.sample_rate, 3),
            "clipped": round(float(np.mean(np.abs(audio) >= FULL_SCALE)), 6),
            "rms_db": round(20 * np.log10(max(rms, 1e-10)), 2),
        }
        return index, torch.from_numpy(audio), stats


def _pad_batch(items):
    indices, audios, stats = zip(*items)
    lengths = torch.tensor([len(a) for a in audios])
    batch = torch.zeros(len(audios), 1, int(lengths.max()))
    for row, audio in enumerate(audios):
        batch[row, 0, : len(audio)] = audio
    return list(indices), batch, lengths, list(stats)


def _save_npy(path: Path, codes: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, codes)


def load_codes(path: Path) -> np.ndarray:
    """Codes saved by extract (or upstream's extractor), checked to be a 2-D integer array."""
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PipelineError(f"{path} is damaged ({e}): rerun --extract-tokens to redo it") from e
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise PipelineError(f"{path} holds {codes.dtype} codes of shape {codes.shape}, not (codebooks, frames) integers: rerun --extract-tokens")
    return codes
