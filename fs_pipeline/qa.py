"""Dataset QA: per-clip and per-speaker checks that catch bad transcripts and bad audio before training."""

import re
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field

SPEED_OUTLIER = 2.5  # chars/s this many times above (or below 1/this of) the median suggests a wrong transcript
CLIPPED_LIMIT = 0.001  # fraction of samples at full scale
LOUDNESS_SPREAD_DB = 10.0  # distance from the speaker's median RMS level
SMALL_DATASET_MINUTES = 10.0


@dataclass
class ClipQA:
    key: str
    speaker: str
    seconds: float
    chars: int
    tokens: int
    clipped: float | None
    rms_db: float | None
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

    speakers = {}
    for speaker, members in sorted(by_speaker.items()):
        levels = [c.rms_db for c in members if c.rms_db is not None]
        median_level = statistics.median(levels) if levels else None
        for clip in members:
            if median_level is not None and clip.rms_db is not None and abs(clip.rms_db - median_level) > LOUDNESS_SPREAD_DB:
                clip.flags.append(f"loudness {clip.rms_db:.1f} dB is {clip.rms_db - median_level:+.1f} dB from the speaker's median")
        speakers[speaker] = {
            "clips": len(members),
            "minutes": round(sum(c.seconds for c in members) / 60, 3),
            "tokens": sum(c.tokens for c in members),
            "loudness_spread_db": round(max(levels) - min(levels), 2) if levels else None,
        }

    total_minutes = sum(c.seconds for c in clips) / 60
    warnings = [f"{c.key}: {flag}" for c in clips for flag in c.flags]
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
        "| speaker | clips | minutes | tokens | loudness spread (dB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in report["speakers"].items():
        lines.append(f"| {name} | {s['clips']} | {s['minutes']:.2f} | {s['tokens']} | {s['loudness_spread_db']} |")
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["None."]
    return "\n".join(lines) + "\n"
