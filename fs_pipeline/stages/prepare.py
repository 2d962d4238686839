"""Prepare: recordings (files, folders, URLs) -> a speaker dataset of clips with exact transcripts.

Reads   audio or video files (anything ffmpeg decodes), folders of them (a folder whose subfolders hold
        the audio is one speaker per subfolder), or URLs (downloaded with yt-dlp)
Writes  <output>/<speaker>/<source>_<nnnn>.wav (mono, the model's sample rate) + .lab transcript,
        <output>/dataset_summary.json; <output>/.prepare_state.json records what each source became
Skips   a source whose content and segmentation settings are unchanged and whose clips are intact;
        an existing .lab (unless --retranscribe)

Per source: decode (up to --max-duration minutes) -> loudness-normalise (--normalize) -> cut at pauses
(--split-long; else a file longer than --max-clip-duration is skipped) -> transcribe each clip
(--auto-transcribe; else a transcript file beside the source, foo.lab or foo.txt, names a whole-file clip).
Clips and transcripts are written atomically, and the source's record is written after them, so a
killed run redoes only the source it was in.
"""

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger
from tqdm import tqdm

from fs_pipeline import PipelineError
from fs_pipeline.audio import loudness, segmentation
from fs_pipeline.audio.io import UnreadableAudio, decode, read_wav, write_wav
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import write_json_atomic, write_text_atomic
from fs_pipeline.lock import project_lock
from fs_pipeline.manifest import Manifest

MEDIA_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".wma", ".mp4", ".webm", ".mkv", ".mov", ".avi"}
TRANSCRIPT_SUFFIXES = (".lab", ".txt")
SILENCE_PEAK = 1e-3  # a decoded file whose peak is below this holds no usable sound
STATE_FILE = ".prepare_state.json"
SUMMARY_FILE = "dataset_summary.json"


@dataclass(frozen=True)
class PrepareSettings:
    inputs: tuple[str, ...]
    output: Path
    speaker: str
    youtube: bool = False
    normalize: bool = False
    target_lufs: float = -23.0
    split_long: bool = False
    segment_duration: float = 10.0
    min_clip_duration: float = 2.0
    max_clip_duration: float = 30.0
    max_duration_minutes: float | None = None
    auto_transcribe: bool = False
    whisper_model: str = "base"
    asr_backend: str = "auto"
    language: str = "auto"
    retranscribe: bool = False
    sample_rate: int = 44100

    def segmentation_key(self) -> str:
        """What decides the clips' audio: a change here redoes a source's clips."""
        fields = ("normalize", "target_lufs", "split_long", "segment_duration", "min_clip_duration", "max_clip_duration",
                  "max_duration_minutes", "sample_rate")
        return hashlib.sha256(json.dumps([getattr(self, f) for f in fields]).encode()).hexdigest()[:16]


@dataclass
class Source:
    path: Path
    speaker: str
    name: str  # stem of its clips' file names


@dataclass
class PrepareResult:
    clips: int
    audio_seconds: float  # decoded in this run
    seconds: float
    sources_done: int  # sources decoded in this run (0: nothing to do)
    transcribed: int
    skipped: list[dict] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.seconds if self.seconds else 0.0


def run(settings: PrepareSettings, choice: DeviceChoice) -> PrepareResult:
    started = time.perf_counter()
    check(settings)
    output = Path(settings.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"cannot write to {output} ({e.strerror}): choose another --output or fix its permissions") from e

    with project_lock(output, "prepare"):
        skipped: list[dict] = []
        sources = _gather(settings, output, skipped)
        state = Manifest(output / STATE_FILE)
        records = state.data.setdefault("sources", {})
        seg_key = settings.segmentation_key()
        transcriber = None
        decoded_seconds, sources_done, transcribed = 0.0, 0, 0

        for source in tqdm(sources, desc="prepare", unit="file", dynamic_ncols=True):
            key = str(source.path.resolve())
            record = records.get(key)
            source_hash = state.hash(source.path)
            if not (record and record["segmentation"] == seg_key and record["source_hash"] == source_hash and _clips_intact(record, output, state)):
                try:
                    record, used_seconds = _segment(source, settings, output, seg_key, source_hash, state)
                except UnreadableAudio as e:
                    skipped.append({"input": str(source.path), "reason": str(e).split(": ", 1)[-1]})
                    logger.warning(f"skipped {source.path}: {str(e).split(': ', 1)[-1]}")
                    continue
                _remove_clips(records.get(key), record, output)
                decoded_seconds += used_seconds
                sources_done += 1
                records[key] = record
                state.save()  # this source's clips are complete

            kept = []
            for clip in record["clips"]:
                wav = output / clip["path"]
                lab = wav.with_suffix(".lab")
                if lab.is_file() and not settings.retranscribe:
                    kept.append(clip)
                    continue
                text = ""
                if settings.auto_transcribe:
                    if transcriber is None:
                        from fs_pipeline.audio.asr import Transcriber

                        transcriber = Transcriber(settings.asr_backend, settings.whisper_model, choice, settings.language)
                    text = transcriber.transcribe(read_wav(wav, settings.sample_rate), settings.sample_rate)
                    transcribed += 1
                elif len(record["clips"]) == 1 and record.get("whole_file"):
                    text = _sidecar_transcript(source.path)
                if text:
                    write_text_atomic(lab, text + "\n")
                    kept.append(clip)
                else:
                    reason = "ASR heard no words" if settings.auto_transcribe else "no transcript (use --auto-transcribe, or put a .lab beside the source)"
                    skipped.append({"input": f"{source.path} -> {clip['path']}", "reason": reason})
                    wav.unlink(missing_ok=True)
            if len(kept) != len(record["clips"]):
                record["clips"] = kept
                state.save()

        live = {str(s.path.resolve()) for s in sources}
        clips = [c for k, r in records.items() if k in live for c in r["clips"]]
        summary = _summary(settings, records, live, skipped)
        write_json_atomic(output / SUMMARY_FILE, summary)
        state.complete("prepare", settings=_settings_record(settings))
    if not clips:
        raise PipelineError(f"no clips were produced in {output}: every input was skipped (reasons in {output / SUMMARY_FILE})")
    return PrepareResult(len(clips), decoded_seconds, time.perf_counter() - started, sources_done, transcribed, skipped)


def check(settings: PrepareSettings) -> None:
    if not settings.inputs:
        raise PipelineError("no --input given: pass a folder, a file or a URL")
    if not re.fullmatch(r"[^/\\\0]+", settings.speaker) or settings.speaker.startswith("."):
        raise PipelineError(f"invalid --speaker '{settings.speaker}': use a plain name such as alice")
    if not 0 < settings.min_clip_duration <= settings.segment_duration <= settings.max_clip_duration:
        raise PipelineError(
            "clip lengths must satisfy 0 < --min-clip-duration <= --segment-duration <= --max-clip-duration "
            f"(got {settings.min_clip_duration}, {settings.segment_duration}, {settings.max_clip_duration})"
        )
    if settings.max_duration_minutes is not None and settings.max_duration_minutes <= 0:
        raise PipelineError(f"--max-duration {settings.max_duration_minutes} must be a positive number of minutes")


def is_url(text: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE) is not None


def _gather(settings: PrepareSettings, output: Path, skipped: list[dict]) -> list[Source]:
    found: list[tuple[Path, str]] = []
    urls = [i for i in settings.inputs if settings.youtube or is_url(i)]
    for item in settings.inputs:
        if item in urls:
            continue
        path = Path(item)
        if path.is_file():
            found.append((path, settings.speaker))
        elif path.is_dir():
            media = _media_in(path)
            if not media:
                raise PipelineError(f"no audio or video files in {path}: point --input at your recordings")
            top_level = [m for m in media if m.parent == path]
            if top_level:
                found += [(m, settings.speaker) for m in media]
            else:  # only subfolders hold audio: one speaker per subfolder
                found += [(m, m.relative_to(path).parts[0]) for m in media]
        else:
            raise PipelineError(f"input not found: {item}: pass an existing file or folder, or a URL")
    if urls:
        from fs_pipeline.audio.youtube import download

        max_seconds = settings.max_duration_minutes * 60 if settings.max_duration_minutes else None
        found += [(p, settings.speaker) for p in download(urls, output / ".downloads", max_seconds)]

    sources, names = [], set()
    for path, speaker in found:
        stem = re.sub(r"[\x00-\x1f/\\]", "_", path.stem).strip() or "clip"
        name = stem
        counter = 2
        while (speaker, name) in names:
            name, counter = f"{stem}-{counter}", counter + 1
        names.add((speaker, name))
        sources.append(Source(path, speaker, name))
    return sources


def _media_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES and not p.name.startswith("."))


def _segment(source: Source, settings: PrepareSettings, output: Path, seg_key: str, source_hash: str, state: Manifest):
    """Decode, normalise and cut one source; write its clips. Returns its record and the seconds decoded."""
    max_seconds = settings.max_duration_minutes * 60 if settings.max_duration_minutes else None
    audio = decode(source.path, settings.sample_rate, max_seconds)
    rate = settings.sample_rate
    duration = len(audio) / rate
    if float(np.max(np.abs(audio))) < SILENCE_PEAK:
        raise UnreadableAudio(f"{source.path}: silent (no sound above {20 * np.log10(SILENCE_PEAK):.0f} dBFS)")
    info = {}
    if settings.normalize:
        audio, info = loudness.normalize(audio, rate, settings.target_lufs)

    whole = not settings.split_long
    if whole:
        if duration > settings.max_clip_duration:
            raise UnreadableAudio(
                f"{source.path}: {duration:.1f} s is longer than --max-clip-duration {settings.max_clip_duration:g} s; add --split-long"
            )
        if duration < settings.min_clip_duration:
            raise UnreadableAudio(f"{source.path}: {duration:.1f} s is shorter than --min-clip-duration {settings.min_clip_duration:g} s")
        plans = [segmentation.ClipPlan(0.0, duration)]
    else:
        speech = segmentation.speech_intervals(audio, rate)
        if not speech:
            raise UnreadableAudio(f"{source.path}: no speech found")
        plans = segmentation.plan_clips(
            speech, duration, settings.segment_duration, settings.min_clip_duration, settings.max_clip_duration
        )
        if any(p.forced for p in plans):
            logger.warning(f"{source.path}: speech ran past --max-clip-duration without a pause; cut there")
        if not plans:
            raise UnreadableAudio(f"{source.path}: no stretch of speech as long as --min-clip-duration")

    clips = []
    for index, plan in enumerate(plans):
        relative = Path(source.speaker) / f"{source.name}_{index:04d}.wav"
        piece = audio[int(plan.start * rate) : int(plan.end * rate)]
        write_wav(output / relative, piece, rate)
        clips.append({"path": relative.as_posix(), "start": plan.start, "end": plan.end, "seconds": round(len(piece) / rate, 3),
                      "sha256": state.hash(output / relative)})
    record = {
        "source_hash": source_hash, "segmentation": seg_key, "speaker": source.speaker, "whole_file": whole,
        "used_seconds": round(duration, 3), "limited": max_seconds is not None and duration >= max_seconds - 0.05,
        "loudness": info, "clips": clips,
    }
    return record, duration


def _clips_intact(record: dict, output: Path, state: Manifest) -> bool:
    return all((output / c["path"]).is_file() and state.hash(output / c["path"]) == c["sha256"] for c in record["clips"])


def _remove_clips(old: dict | None, new: dict, output: Path) -> None:
    """Delete the clips (and transcripts) a source had before that it no longer has; keep none of the old
    transcripts of rewritten clips, since their audio changed."""
    if not old:
        return
    new_paths = {c["path"] for c in new["clips"]}
    for clip in old["clips"]:
        wav = output / clip["path"]
        if clip["path"] not in new_paths:
            wav.unlink(missing_ok=True)
        wav.with_suffix(".lab").unlink(missing_ok=True)


def _sidecar_transcript(source: Path) -> str:
    for suffix in TRANSCRIPT_SUFFIXES:
        sidecar = source.with_suffix(suffix)
        if sidecar.is_file():
            return " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
    return ""


def _settings_record(settings: PrepareSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def _summary(settings: PrepareSettings, records: dict, live: set[str], skipped: list[dict]) -> dict:
    speakers: dict[str, dict] = {}
    sources = []
    for key, record in sorted(records.items()):
        if key not in live:
            continue
        seconds = sum(c["seconds"] for c in record["clips"])
        entry = speakers.setdefault(record["speaker"], {"files": 0, "duration_minutes": 0.0})
        entry["files"] += len(record["clips"])
        entry["duration_minutes"] += seconds / 60
        sources.append({"input": key, "speaker": record["speaker"], "clips": len(record["clips"]),
                        "used_seconds": record["used_seconds"], "limited_by_max_duration": record["limited"]})
    for entry in speakers.values():
        entry["duration_minutes"] = round(entry["duration_minutes"], 4)
    return {
        "total_files": sum(s["files"] for s in speakers.values()),
        "total_duration_minutes": round(sum(s["duration_minutes"] for s in speakers.values()), 4),
        "speakers": speakers,
        "sample_rate": settings.sample_rate,
        "settings": _settings_record(settings),
        "sources": sources,
        "skipped": skipped,
    }
