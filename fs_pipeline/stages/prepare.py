"""Prepare: recordings (files, folders, URLs) -> a speaker dataset of clips with exact transcripts.

Reads   audio or video files (anything ffmpeg decodes), folders of them (a folder whose subfolders hold
        the audio is one speaker per subfolder), or URLs (downloaded with yt-dlp)
Writes  <output>/<speaker>/<source>_<nnnn>.wav (mono, the model's sample rate) + .lab transcript,
        <output>/dataset_summary.json; <output>/.prepare_state.json records what each source became
Skips   a source whose content and segmentation settings are unchanged and whose clips are intact;
        an existing .lab (unless --retranscribe)

Per source: decode (up to --max-duration minutes) -> loudness-normalise (--normalize) -> cut at pauses
(--split-long; else a file longer than --max-clip-duration is skipped) -> transcribe each clip without a
.lab (--auto-transcribe; else a transcript file beside the source, foo.lab or foo.txt, names a whole-file
clip, and split clips wait untranscribed for a later run or a hand-written .lab). Clips and transcripts
are written atomically, and the source's record is written after them, so a killed run redoes only the
source it was in. Clips of sources that are no longer inputs are removed (--keep-removed-sources keeps
them), so the dataset holds what was asked for.
"""

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
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
CLIP_FILES = (".wav", ".lab", ".npy")  # a clip's audio, transcript and codes (written by extract)
SILENCE_PEAK = 1e-3  # a decoded file whose peak is below this holds no usable sound
STATE_FILE = ".prepare_state.json"
SUMMARY_FILE = "dataset_summary.json"
DOWNLOADS = ".downloads"


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
    asr_beam_size: int = 5
    language: str = "auto"
    retranscribe: bool = False
    keep_removed_sources: bool = False
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
    skipped: list[dict] = field(default_factory=list)  # inputs and clips left out, with reasons (earlier runs' too)
    untranscribed: list[str] = field(default_factory=list)  # clips without a .lab: extract refuses them
    cuts_inside_speech: int = 0
    targets_missed: int = 0
    removed: list[dict] = field(default_factory=list)  # sources no longer among the inputs, with their deleted clips

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
        state = Manifest(output / STATE_FILE)
        records = state.data.setdefault("sources", {})
        sources = _gather(settings, output, state, skipped)
        seg_key = settings.segmentation_key()
        asr = _LazyTranscriber(settings, choice)
        decoded_seconds, sources_done, transcribed = 0.0, 0, 0

        for source in tqdm(sources, desc="prepare", unit="file", dynamic_ncols=True):
            key = str(source.path.resolve())
            record = records.get(key)
            source_hash = state.hash(source.path)
            if not _current(record, seg_key, source_hash, output, state):
                try:
                    new, used_seconds = _segment(source, settings, output, seg_key, source_hash, state)
                except UnreadableAudio as e:
                    skipped.append({"input": str(source.path), "reason": str(e).split(": ", 1)[-1]})  # the caller reports it
                    continue
                _remove_clips(record, new, output)
                decoded_seconds += used_seconds
                sources_done += 1
                records[key] = record = new
                state.save()  # this source's clips are complete
            transcribed += _transcribe(record, source, settings, output, state, asr)

        live = {str(s.path.resolve()) for s in sources}
        removed = [] if settings.keep_removed_sources else _remove_sources(records, live, output, state)
        summary = _summary(settings, records, live, skipped, removed, output)
        write_json_atomic(output / SUMMARY_FILE, summary)
        state.complete("prepare", settings=_settings_record(settings))
    if not summary["total_files"]:
        raise PipelineError(f"no clips were produced in {output}: every input was skipped (reasons in {output / SUMMARY_FILE})")
    return PrepareResult(summary["total_files"], decoded_seconds, time.perf_counter() - started, sources_done, transcribed,
                         summary["skipped"], summary["untranscribed"], len(summary["cuts_inside_speech"]),
                         len(summary["targets_missed"]), removed)


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
    if settings.asr_beam_size < 1:
        raise PipelineError(f"--asr-beam-size {settings.asr_beam_size} must be 1 (fastest) or more (5 is Whisper's default)")
    for item in settings.inputs:
        if not (settings.youtube or is_url(item) or Path(item).is_file() or Path(item).is_dir()):
            raise PipelineError(f"input not found: {item}: pass an existing file or folder, or a URL")


def is_url(text: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE) is not None


def _gather(settings: PrepareSettings, output: Path, state: Manifest, skipped: list[dict]) -> list[Source]:
    found: list[tuple[Path, str]] = []
    urls = [i for i in settings.inputs if settings.youtube or is_url(i)]
    for item in settings.inputs:
        if item in urls:
            continue
        path = Path(item)
        if path.is_file():
            found.append((path, settings.speaker))
        else:  # a folder: check() refused anything else
            media = _media_in(path)
            if not media:
                raise PipelineError(f"no audio or video files in {path}: point --input at your recordings")
            top_level = [m for m in media if m.parent == path]
            if top_level:
                found += [(m, settings.speaker) for m in media]
            else:  # only subfolders hold audio: one speaker per subfolder
                found += [(m, m.relative_to(path).parts[0]) for m in media]
    if urls:
        found += [(p, settings.speaker) for p in _download(urls, settings, output, state)]

    # A source keeps the name its clips have; a new one takes a name no recorded source holds, so that its
    # clips never overwrite another source's (even one about to be removed).
    records = state.data["sources"]
    held = {(r["speaker"], _name_of(r)) for r in records.values()}
    sources, names = [], set()
    for path, speaker in found:
        record = records.get(str(path.resolve()))
        if record and record["speaker"] == speaker and _name_of(record):
            name = _name_of(record)
        else:
            stem = re.sub(r"[\x00-\x1f/\\]", "_", path.stem).strip() or "clip"
            name, counter = stem, 2
            while (speaker, name) in names or (speaker, name) in held:
                name, counter = f"{stem}-{counter}", counter + 1
        names.add((speaker, name))
        sources.append(Source(path, speaker, name))
    return sources


def _name_of(record: dict) -> str | None:
    """The stem of a recorded source's clip names (records from before names were recorded: from a clip)."""
    if "name" in record:
        return record["name"]
    return Path(record["clips"][0]["path"]).stem.rsplit("_", 1)[0] if record["clips"] else None


def _download(urls: list[str], settings: PrepareSettings, output: Path, state: Manifest) -> list[Path]:
    """The downloaded files of `urls`, and not those of URLs asked for before and no longer. yt-dlp's archive
    skips a URL it knows without naming its files, so each URL's files are recorded when they first arrive."""
    from fs_pipeline.audio.youtube import download

    folder = output / DOWNLOADS
    max_seconds = settings.max_duration_minutes * 60 if settings.max_duration_minutes else None
    known = state.data.setdefault("downloads", {})
    files: list[Path] = []
    listing: list[Path] = []
    for url in urls:
        before = set(folder.iterdir()) if folder.is_dir() else set()
        listing = download([url], folder, max_seconds)
        known[url] = sorted(set(known.get(url, [])) | {p.name for p in listing if p not in before})
        files += [folder / name for name in known[url]]
    state.save()
    if not all(known[url] for url in urls):
        # A URL downloaded before files were recorded: its files can't be told apart, so keep every unclaimed one.
        claimed = {name for names in known.values() for name in names}
        files += [p for p in listing if p.name not in claimed]
    return list(dict.fromkeys(files))


def _media_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES and not p.name.startswith("."))


def _current(record: dict | None, seg_key: str, source_hash: str, output: Path, state: Manifest) -> bool:
    if not (record and record["segmentation"] == seg_key and record["source_hash"] == source_hash):
        return False
    # Records from before dropped clips were recorded lost untranscribed clips without a trace; cut those again.
    if "dropped" not in record and not record["clips"]:
        return False
    return all((output / c["path"]).is_file() and state.hash(output / c["path"]) == c["sha256"] for c in record["clips"])


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
        plan = segmentation.Plan([segmentation.ClipPlan(0.0, duration)])
    else:
        speech = segmentation.speech_intervals(audio, rate)
        if not speech:
            raise UnreadableAudio(f"{source.path}: no speech found")
        plan = segmentation.plan_clips(speech, segmentation.envelope(audio, rate), settings.segment_duration,
                                       settings.min_clip_duration, settings.max_clip_duration)
        if not plan.clips:
            raise UnreadableAudio(f"{source.path}: no stretch of speech as long as --min-clip-duration")

    clips = []
    for index, cut in enumerate(plan.clips):
        relative = Path(source.speaker) / f"{source.name}_{index:04d}.wav"
        piece = audio[int(cut.start * rate) : int(cut.end * rate)]
        write_wav(output / relative, piece, rate)
        clip = {"path": relative.as_posix(), "start": cut.start, "end": cut.end, "seconds": round(len(piece) / rate, 3),
                "sha256": state.hash(output / relative)}
        if cut.quiet_db is not None:
            clip["cut_inside_speech"] = {"level_db": cut.quiet_db, "window": list(cut.window)}
        if cut.missed_target:
            clip["missed_target"] = cut.missed_target
        clips.append(clip)
    record = {
        "source_hash": source_hash, "segmentation": seg_key, "speaker": source.speaker, "name": source.name, "whole_file": whole,
        "used_seconds": round(duration, 3), "limited": max_seconds is not None and duration >= max_seconds - 0.05,
        "loudness": info, "clips": clips, "speech_left_out": [list(s) for s in plan.dropped], "dropped": [],
    }
    return record, duration


class _LazyTranscriber:
    """Loads the Whisper model on the first clip that needs it, so runs with nothing to transcribe load none."""

    def __init__(self, settings: PrepareSettings, choice: DeviceChoice):
        self.settings, self.choice, self.model = settings, choice, None

    def __call__(self, audio: np.ndarray, rate: int) -> str:
        if self.model is None:
            from fs_pipeline.audio.asr import Transcriber

            s = self.settings
            self.model = Transcriber(s.asr_backend, s.whisper_model, self.choice, s.language, beam_size=s.asr_beam_size)
        return self.model.transcribe(audio, rate)


def _transcribe(record: dict, source: Source, settings: PrepareSettings, output: Path, state: Manifest, asr) -> int:
    """Write a .lab for each clip of `record` that has none (every clip with --retranscribe) from Whisper or, for
    a whole-file clip, the transcript beside its source. A clip that gets an empty transcript is deleted and
    recorded as dropped; split clips with no transcript source stay, untranscribed. Returns the clips transcribed."""
    transcribed, dropped = 0, []
    for clip in record["clips"]:
        wav = output / clip["path"]
        lab = wav.with_suffix(".lab")
        if lab.is_file() and not settings.retranscribe:
            continue
        if settings.auto_transcribe:
            text, reason = asr(read_wav(wav, settings.sample_rate), settings.sample_rate), "ASR heard no words"
            transcribed += 1
        elif record["whole_file"]:
            text, reason = _sidecar_transcript(source.path), "no transcript (use --auto-transcribe, or put a .lab beside the source)"
        else:
            continue
        if text:
            write_text_atomic(lab, text + "\n")
        else:
            _delete_clip(output, clip["path"])
            dropped.append({"clip": clip["path"], "reason": reason})
    if dropped:
        gone = {d["clip"] for d in dropped}
        record["clips"] = [c for c in record["clips"] if c["path"] not in gone]
        record["dropped"] = record["dropped"] + dropped
        state.save()
    return transcribed


def _delete_clip(output: Path, path: str) -> None:
    for suffix in CLIP_FILES:
        (output / path).with_suffix(suffix).unlink(missing_ok=True)


def _remove_clips(old: dict | None, new: dict, output: Path) -> None:
    """Delete the clips a source had before that it no longer has. A rewritten clip keeps its transcript only
    if its audio is unchanged."""
    if not old:
        return
    new_hashes = {c["path"]: c["sha256"] for c in new["clips"]}
    for clip in old["clips"]:
        if clip["path"] not in new_hashes:
            _delete_clip(output, clip["path"])
        elif new_hashes[clip["path"]] != clip["sha256"]:
            (output / clip["path"]).with_suffix(".lab").unlink(missing_ok=True)


def _remove_sources(records: dict, live: set[str], output: Path, state: Manifest) -> list[dict]:
    """Delete the clips of recorded sources that are not among this run's inputs; files first, then records."""
    removed = []
    for key in sorted(set(records) - live):
        clips = [c["path"] for c in records[key]["clips"]]
        for path in clips:
            _delete_clip(output, path)
        del records[key]
        state.save()
        removed.append({"input": key, "clips": clips})
    return removed


def _sidecar_transcript(source: Path) -> str:
    for suffix in TRANSCRIPT_SUFFIXES:
        sidecar = source.with_suffix(suffix)
        if sidecar.is_file():
            return " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
    return ""


def _settings_record(settings: PrepareSettings) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def _summary(settings: PrepareSettings, records: dict, live: set[str], skipped: list[dict], removed: list[dict], output: Path) -> dict:
    """The dataset as it now is: every recorded source (with --keep-removed-sources, also those no longer asked
    for), each clip cut inside speech or off its target length, clips still without a transcript, and what
    this run removed."""
    speakers: dict[str, dict] = {}
    sources, cuts, missed, left_out, untranscribed = [], [], [], [], []
    skipped = list(skipped)
    for key, record in sorted(records.items()):
        seconds = sum(c["seconds"] for c in record["clips"])
        entry = speakers.setdefault(record["speaker"], {"files": 0, "duration_minutes": 0.0})
        entry["files"] += len(record["clips"])
        entry["duration_minutes"] += seconds / 60
        sources.append({"input": key, "speaker": record["speaker"], "clips": len(record["clips"]),
                        "used_seconds": record["used_seconds"], "limited_by_max_duration": record["limited"],
                        **({} if key in live else {"no_longer_an_input": True})})
        for clip in record["clips"]:
            if "cut_inside_speech" in clip:
                cuts.append({"clip": clip["path"], "input": key, "at_seconds": clip["end"], **clip["cut_inside_speech"]})
            if "missed_target" in clip:
                missed.append({"clip": clip["path"], "input": key, "seconds": clip["seconds"], "why": clip["missed_target"]})
            if not (output / clip["path"]).with_suffix(".lab").is_file():
                untranscribed.append(clip["path"])
        left_out += [{"input": key, "from_seconds": a, "to_seconds": b} for a, b in record.get("speech_left_out", [])]
        skipped += [{"input": f"{key} -> {d['clip']}", "reason": d["reason"]} for d in record.get("dropped", [])]
    for entry in speakers.values():
        entry["duration_minutes"] = round(entry["duration_minutes"], 4)
    return {
        "total_files": sum(s["files"] for s in speakers.values()),
        "total_duration_minutes": round(sum(s["duration_minutes"] for s in speakers.values()), 4),
        "speakers": speakers,
        "sample_rate": settings.sample_rate,
        "settings": _settings_record(settings),
        "target_clip_seconds": [max(settings.min_clip_duration, settings.segment_duration / 2),
                                min(settings.max_clip_duration, 1.5 * settings.segment_duration)],
        "sources": sources,
        "cuts_inside_speech": cuts,
        "targets_missed": missed,
        "speech_left_out": left_out,
        "untranscribed": untranscribed,
        "removed_sources": removed,
        "skipped": skipped,
    }
