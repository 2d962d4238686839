"""Dataset QA: per-clip and per-speaker checks that catch bad transcripts and bad audio before training."""

import re
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from urllib.parse import quote

import numpy as np

from fs_pipeline.dataset import TRANSCRIPT_SUFFIX

SPEED_OUTLIER = 2.5  # chars/s this many times above (or below 1/this of) the median suggests a wrong transcript
CLIPPED_LIMIT = 0.001  # fraction of samples at full scale
LOUDNESS_OUTLIER_DB = 10.0  # a clip this far from its speaker's median RMS level is flagged
# Between the 5th and 95th percentile of a speaker's clip levels. One steady setup varies by a few dB with
# content and pauses; more means other distances, gains or unnormalised sources, whose level the model learns.
LOUDNESS_SPREAD_DB = 8.0
SMALL_DATASET_MINUTES = 10.0
# A validation set under either holds too little to tell overfitting from the noise of which clips it holds.
MIN_VAL_UTTERANCES = 5
MIN_VAL_SECONDS = 30.0
FAR_ABOVE_FRACTION = 2.0  # a speaker's validation share above this many times --val-fraction is reported
# A clip whose speaker embedding (fs_pipeline/audio/speaker.py) has a cosine similarity below this to the reference
# of its speaker's other clips holds another voice. Measured with Resemblyzer's encoder on LibriSpeech test-other (10
# readers, 10 utterances each, 7.7 s on average): against the reader's own other clips, 0.82 or more (cut to 2-3 s,
# 1-2% fell below 0.75, the lowest at 0.748); against another reader's clips, at most 0.75 (1 in 900 above it; cut
# to 2-3 s, at most 0.74). espeak-ng: en-us clips 0.85 or more against en-us, en+f3 clips at most 0.74 against it.
VOICE_OUTLIER = 0.75
MIN_VOICE_CLIPS = 3  # with fewer, the "other clips" of a speaker are too few to say which voice is the odd one


@dataclass
class ClipQA:
    key: str
    speaker: str
    seconds: float
    chars: int
    tokens: int
    clipped: float | None
    rms_db: float | None
    voice_similarity: float | None = None  # to the speaker's other clips (voice_similarities); None below MIN_VOICE_CLIPS
    flags: list[str] = field(default_factory=list)

    @property
    def chars_per_second(self) -> float:
        return self.chars / self.seconds if self.seconds else 0.0


def _normalized(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def check(clips: list[ClipQA], texts: dict[str, str], max_tokens: int) -> dict:
    """Flag outliers on `clips` (in place) and return the report as a dict. `texts` maps clip keys to transcripts."""
    median_speed = statistics.median(c.chars_per_second for c in clips)
    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip)
    _flag_duplicates(clips, texts)

    for clip in clips:
        speed = clip.chars_per_second
        if median_speed and (speed > SPEED_OUTLIER * median_speed or speed < median_speed / SPEED_OUTLIER):
            clip.flags.append(
                f"{speed:.1f} chars/s against a median of {median_speed:.1f}: the transcript may not match the audio"
            )
        if clip.clipped is not None and clip.clipped > CLIPPED_LIMIT:
            clip.flags.append(f"clipping: {clip.clipped:.2%} of samples at full scale")
        if clip.tokens > max_tokens:
            clip.flags.append(f"{clip.tokens} tokens exceed the model's max length {max_tokens}: it would be truncated")
        if clip.voice_similarity is not None and clip.voice_similarity < VOICE_OUTLIER:
            clip.flags.append(f"voice similarity {clip.voice_similarity:.2f} to the speaker's other clips, below {VOICE_OUTLIER}: "
                              "another person may be speaking; listen, and delete the clip (with its .lab) if so")

    speakers = {}
    for speaker, members in sorted(by_speaker.items()):
        levels = [c.rms_db for c in members if c.rms_db is not None]
        median_level = statistics.median(levels) if levels else None
        for clip in members:
            if median_level is not None and clip.rms_db is not None and abs(clip.rms_db - median_level) > LOUDNESS_OUTLIER_DB:
                clip.flags.append(f"loudness {clip.rms_db:.1f} dB is {clip.rms_db - median_level:+.1f} dB from the speaker's median")
        speakers[speaker] = {
            "clips": len(members),
            "minutes": round(sum(c.seconds for c in members) / 60, 3),
            "tokens": sum(c.tokens for c in members),
            "loudness_spread_db": _spread(levels),
        }

    total_minutes = sum(c.seconds for c in clips) / 60
    warnings = [f"{c.key}: {flag}" for c in clips for flag in c.flags]
    for name, s in speakers.items():
        if s["loudness_spread_db"] is not None and s["loudness_spread_db"] > LOUDNESS_SPREAD_DB:
            warnings.append(f"{name}: loudness spread {s['loudness_spread_db']:.1f} dB over the middle 90% of its clips, above "
                            f"{LOUDNESS_SPREAD_DB:g} dB: its clips differ in level (distance, gain or source), which the model learns as part "
                            "of the voice; prepare with --normalize, or leave out the odd recordings")
    if total_minutes < SMALL_DATASET_MINUTES:
        warnings.append(
            f"the dataset holds {total_minutes:.1f} minutes of speech; under {SMALL_DATASET_MINUTES:.0f} minutes a voice is learned poorly"
        )
    return {
        "total": {"clips": len(clips), "minutes": round(total_minutes, 3), "tokens": sum(c.tokens for c in clips)},
        "median_chars_per_second": round(median_speed, 2),
        "speakers": speakers,
        "clips": [asdict(c) | {"chars_per_second": round(c.chars_per_second, 2)} for c in clips],
        "warnings": warnings,
    }


def voice_similarities(embeddings: list[np.ndarray]) -> list[float | None]:
    """Each clip's cosine similarity to the mean embedding of its speaker's other clips (all of one speaker).
    Two passes: the second mean leaves out the clips that the first puts below VOICE_OUTLIER, so that a second
    voice does not pull the reference towards itself (with 5 clips of another reader among 10 of one, 90% of them
    are then flagged, against 74% in one pass; LibriSpeech test-other). None for all below MIN_VOICE_CLIPS."""
    if len(embeddings) < MIN_VOICE_CLIPS:
        return [None] * len(embeddings)
    units = np.stack([e / max(float(np.linalg.norm(e)), 1e-12) for e in embeddings])
    first = _to_the_others(units, np.ones(len(units), dtype=bool))
    kept = first >= VOICE_OUTLIER
    second = _to_the_others(units, kept) if kept.sum() >= MIN_VOICE_CLIPS - 1 else first
    return [round(float(x), 4) for x in second]


def _to_the_others(units: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Cosine of each row with the sum of the kept rows other than itself."""
    total = units[kept].sum(axis=0)
    others = total - units * kept[:, None]
    norms = np.maximum(np.linalg.norm(others, axis=1), 1e-12)
    return (units * others).sum(axis=1) / norms


def split_warnings(split: dict) -> list[str]:
    """What a user should know about the held-out split (from pack.held_out): speakers it cannot validate,
    speakers that give far more than --val-fraction, and a validation set too small to mean anything."""
    fraction = split["val_fraction"]
    if not fraction:
        return []
    warnings = []
    for name, s in split["speakers"].items():
        if not s["val_clips"]:
            warnings.append(f"{name}: nothing held out for validation: its {_clips(s['clips'])} ({s['seconds']:.1f} s) are too few to "
                            "spare one, so its voice is not validated; add recordings")
        elif s["val_share"] > FAR_ABOVE_FRACTION * fraction:
            warnings.append(f"{name}: validation takes {s['val_clips']} of its {_clips(s['clips'])}, {s['val_share']:.0%} of its audio, "
                            f"far more than --val-fraction {fraction:g}: it has too few clips to give less; add recordings")
    utterances = len(split["val"])
    seconds = sum(s["val_seconds"] for s in split["speakers"].values())
    if not utterances:
        warnings.append("nothing is held out for validation: training runs without a validation loss")
    elif utterances < MIN_VAL_UTTERANCES or seconds < MIN_VAL_SECONDS:
        warnings.append(f"the validation set holds {_clips(utterances, 'utterance')} ({seconds:.1f} s): under {MIN_VAL_UTTERANCES} "
                        f"utterances or {MIN_VAL_SECONDS:g} s its loss is too noisy to show overfitting; add recordings or raise --val-fraction")
    return warnings


def _clips(count: int, noun: str = "clip") -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _spread(levels: list[float]) -> float | None:
    """dB between the 5th and 95th percentile: the odd clip (flagged on its own) does not decide it."""
    if len(levels) < 2:
        return 0.0 if levels else None
    cuts = statistics.quantiles(levels, n=20, method="inclusive")
    return round(cuts[-1] - cuts[0], 2)


def _flag_duplicates(clips: list[ClipQA], texts: dict[str, str]) -> None:
    """Flag clips whose transcripts are the same once case, punctuation and spacing are ignored."""
    groups = defaultdict(list)
    for clip in clips:
        groups[_normalized(texts[clip.key])].append(clip)
    for group in groups.values():
        for clip in group[1:]:
            clip.flags.append(f"near-duplicate transcript of {group[0].key}")


def markdown(report: dict) -> str:
    total = report["total"]
    lines = [
        "# Dataset QA",
        "",
        f"{total['clips']} clips, {total['minutes']:.1f} minutes, {total['tokens']} tokens; "
        f"median {report['median_chars_per_second']} characters per second.",
        "",
        "| speaker | clips | minutes | tokens | loudness spread, middle 90% (dB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in report["speakers"].items():
        lines.append(f"| {name} | {s['clips']} | {s['minutes']:.2f} | {s['tokens']} | {s['loudness_spread_db']} |")
    split = report["split"]
    lines += [
        "",
        "## Validation split",
        "",
        f"By source recording, --val-fraction {split['val_fraction']:g}, --split-seed {split['seed']}: "
        f"{_clips(len(split['val']), 'utterance')} held out.",
        "",
        "| speaker | clips | held out | seconds | share | recordings held out |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in split["speakers"].items():
        held = ", ".join(f"{recording} ({part})" for recording, part in s["val_recordings"].items()) or "none"
        lines.append(f"| {name} | {s['clips']} | {s['val_clips']} | {s['val_seconds']:.1f} | {s['val_share']:.1%} | {held} |")
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["None."]
    flagged = flagged_clips(report)
    if flagged:
        lines += ["", "## Clips to review", "",
                  "Listen to each clip, then correct its transcript or delete the clip with its .lab; the next command that packs "
                  "checks them again (`finetune_tts.py --project P --review` lists them too).", "",
                  "| clip | transcript | why |", "| --- | --- | --- |"]
        for clip in flagged:
            audio, transcript = clip_files(report, clip["key"])
            why = "; ".join(clip["flags"]).replace("|", "\\|")
            lines.append(f"| [{clip['key']}]({quote(audio)}) | [{PurePosixPath(transcript).name}]({quote(transcript)}) | {why} |")
    return "\n".join(lines) + "\n"


def flagged_clips(report: dict) -> list[dict]:
    """The report's clips that carry at least one flag, in dataset order."""
    return [clip for clip in report["clips"] if clip["flags"]]


def clip_files(report: dict, key: str) -> tuple[str, str]:
    """A clip's audio and transcript, relative to the folder of qa.json and qa.md (report["dataset"] is the
    dataset's path from there)."""
    audio = PurePosixPath(report["dataset"]) / key
    return audio.as_posix(), audio.with_suffix(TRANSCRIPT_SUFFIX).as_posix()
