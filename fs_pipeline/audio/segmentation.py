"""Voice-activity based segmentation: find speech with Silero VAD, then cut at pauses.

plan_clips is arithmetic on speech intervals and a loudness envelope, so its rules are easy to read and
to test. For a clip that begins at `start`, its target window is the lengths between half and 1.5 times
--segment-duration, kept within --min-clip-duration and --max-clip-duration:
- the rest of the speech is one clip when it ends inside the window;
- else the clip ends in a pause the VAD reports: the longest pause that ends it inside the window, or
  failing that the longest before the window (the clip is then short of the target; a short utterance
  keeps enough of the pause after it to reach --min-clip-duration);
- else, speech runs on without a pause from --min-clip-duration to the window's end: the clip ends at the
  quietest point of the window (short-time energy), the one nearest the target among the near-quietest,
  unless that would leave the rest of that speech shorter than --min-clip-duration, in which case the clip
  runs to the next pause if --max-clip-duration allows;
- each clip keeps up to `pad` seconds of the pause (or of the quiet stretch) at its edges; a pause
  shorter than twice that is split at its middle. Speech left shorter than the minimum is dropped.
Every cut inside speech, every clip whose length misses the target window and every dropped piece is
reported, so that the dataset summary can list them.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import soxr
import torch

VAD_RATE = 16000
PAD = 0.2  # seconds of pause kept at a clip's edges
ENVELOPE_HOP = 0.01  # seconds between loudness values
ENVELOPE_WINDOW = 0.05  # seconds each loudness value averages: a gap between words is about this long
QUIET_TOLERANCE_DB = 3.0  # points this close to the window's quietest count as quiet; the one nearest the target wins
QUIET_STRETCH_DB = 6.0  # the quiet stretch around a cut: neighbours no more than this above the cut's level


@dataclass(frozen=True)
class ClipPlan:
    start: float
    end: float
    quiet_db: float | None = None  # the clip ends inside speech, at the quietest point of its window (level there, dBFS)
    window: tuple[float, float] | None = None  # where that cut could go, in seconds of the source
    missed_target: str | None = None  # why its length is outside the target window

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Plan:
    clips: list[ClipPlan] = field(default_factory=list)
    dropped: list[tuple[float, float]] = field(default_factory=list)  # speech shorter than --min-clip-duration, left out


@dataclass(frozen=True)
class Envelope:
    """Short-time energy in dBFS, one value every ENVELOPE_HOP seconds (value i is centred at (i + 0.5) hops)."""

    level_db: np.ndarray
    duration: float

    def quiet_stretch(self, lo: float, hi: float, prefer: float) -> tuple[float, float, float]:
        """(begin, end, level) of the quiet stretch around the quietest point between `lo` and `hi` seconds."""
        last = len(self.level_db) - 1
        first_i = min(last, max(0, math.ceil(lo / ENVELOPE_HOP - 0.5)))
        last_i = max(first_i, min(last, math.floor(hi / ENVELOPE_HOP - 0.5)))
        levels = self.level_db[first_i : last_i + 1]
        quiet = np.flatnonzero(levels <= levels.min() + QUIET_TOLERANCE_DB) + first_i
        best = int(quiet[np.argmin(np.abs((quiet + 0.5) * ENVELOPE_HOP - prefer))])
        ceiling = self.level_db[best] + QUIET_STRETCH_DB
        left, right = best, best
        while left > 0 and self.level_db[left - 1] <= ceiling:
            left -= 1
        while right < last and self.level_db[right + 1] <= ceiling:
            right += 1
        return (left + 0.5) * ENVELOPE_HOP, (right + 0.5) * ENVELOPE_HOP, float(self.level_db[best])


def envelope(audio: np.ndarray, sample_rate: int) -> Envelope:
    hop = max(1, round(sample_rate * ENVELOPE_HOP))
    frames = len(audio) // hop
    power = np.square(audio[: frames * hop].astype(np.float64)).reshape(frames, hop).mean(axis=1)
    width = round(ENVELOPE_WINDOW / ENVELOPE_HOP)
    smooth = np.convolve(power, np.ones(width) / width, mode="same")
    return Envelope(10 * np.log10(smooth + 1e-12), len(audio) / sample_rate)


_vad_model = None


def speech_intervals(audio: np.ndarray, sample_rate: int, min_silence: float = 0.25) -> list[tuple[float, float]]:
    """(start, end) seconds of speech, by Silero VAD."""
    global _vad_model
    from silero_vad import get_speech_timestamps, load_silero_vad

    if _vad_model is None:
        _vad_model = load_silero_vad()
    audio16 = soxr.resample(audio, sample_rate, VAD_RATE) if sample_rate != VAD_RATE else audio
    stamps = get_speech_timestamps(
        torch.from_numpy(np.ascontiguousarray(audio16, dtype=np.float32)), _vad_model,
        sampling_rate=VAD_RATE, min_silence_duration_ms=int(min_silence * 1000), return_seconds=True,
    )
    return [(float(s["start"]), float(s["end"])) for s in stamps]


def plan_clips(speech: list[tuple[float, float]], loudness: Envelope, target: float, min_clip: float, max_clip: float,
               pad: float = PAD) -> Plan:
    """Clip boundaries for audio whose speech is at `speech` (seconds) and whose loudness is `loudness`."""
    plan = Plan()
    total = loudness.duration
    shortest, longest = max(min_clip, target / 2), min(max_clip, 1.5 * target)
    cursor, i = 0.0, 0  # the next clip starts no earlier than cursor, with speech interval i
    while i < len(speech):
        start = max(cursor, speech[i][0] - pad)
        lo, hi = start + shortest, start + longest
        if speech[-1][1] <= hi:
            end = min(total, speech[-1][1] + pad, start + max_clip)
            _add(plan, start, end, min_clip, missed="the recording's speech ends" if end - start < shortest else None)
            break
        pause = _best_pause(speech, i, start, lo, hi, target, min_clip, pad)
        if pause is not None:
            j, end = pause
            _add(plan, start, end, min_clip, missed="ends at a pause short of the target length" if end - start < shortest else None)
            cursor, i = end, j + 1
            continue
        # Speech runs through the whole window: interval k holds it.
        k = next(k for k in range(i, len(speech)) if speech[k][1] > hi)
        room = speech[k][1] - min_clip  # a cut later than this leaves less than a clip's worth of speech
        if room < lo and speech[k][1] - start <= max_clip:
            after = (speech[k][1] + speech[k + 1][0]) / 2 if k + 1 < len(speech) else total
            end = min(speech[k][1] + pad, after, start + max_clip)
            _add(plan, start, end, min_clip,
                 missed="a cut inside the speech would leave less than --min-clip-duration" if end - start > longest else None)
            cursor, i = end, k + 1
            continue
        window = (lo, min(hi, room)) if room >= lo else (lo, hi)
        begin, finish, level = loudness.quiet_stretch(*window, prefer=start + target)
        end = min(max(min(begin + pad, (begin + finish) / 2), window[0]), window[1])
        plan.clips.append(ClipPlan(round(start, 3), round(end, 3), round(level, 1), (round(window[0], 3), round(window[1], 3))))
        cursor, i = max(end, finish - pad), k
    return plan


def _best_pause(speech, i: int, start: float, lo: float, hi: float, target: float, min_clip: float, pad: float):
    """(index of the interval before it, clip end) for the pause to cut in: the longest that ends the clip inside
    [lo, hi], else the longest that leaves it at least min_clip long; None if there is none."""
    best, best_key = None, None
    for j in range(i, len(speech) - 1):
        before, after = speech[j][1], speech[j + 1][0]
        if before > hi:
            break
        if after < start + min_clip:
            continue
        # At least min_clip, even if that takes more of the pause than pad: a short utterance is kept.
        end = min(max(min(before + pad, (before + after) / 2), start + min_clip), hi)
        key = (end >= lo, after - before, -abs(end - start - target))
        if best_key is None or key > best_key:
            best, best_key = (j, end), key
    return best


def _add(plan: Plan, start: float, end: float, min_clip: float, missed: str | None) -> None:
    start, end = round(start, 3), round(end, 3)
    if end <= start:
        return
    if end - start >= min_clip - 1e-6:  # a clip made exactly min_clip long must not lose to rounding
        plan.clips.append(ClipPlan(start, end, missed_target=missed))
    else:
        plan.dropped.append((start, end))
