"""Voice-activity based segmentation: find speech with Silero VAD, then cut at pauses.

plan_clips is pure arithmetic on speech intervals, so its rules are easy to read and to test:
- a cut is placed in a pause, never inside speech, at the pause's middle;
- among the pauses that make the clip between half and 1.5 times --segment-duration long (within the
  clip limits), the longest wins; failing that, the longest pause that keeps the clip within limits;
- a stretch of speech longer than --max-clip-duration with no pause in it is cut at the limit (rare in
  read speech; reported);
- each clip keeps up to `pad` seconds of silence at its edges; pieces shorter than the minimum are dropped.
"""

from dataclasses import dataclass

import numpy as np
import soxr
import torch

VAD_RATE = 16000


@dataclass(frozen=True)
class ClipPlan:
    start: float
    end: float
    forced: bool = False  # cut inside speech because no pause was within reach

    @property
    def duration(self) -> float:
        return self.end - self.start


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


def plan_clips(speech: list[tuple[float, float]], total: float, target: float, min_clip: float, max_clip: float,
               pad: float = 0.2) -> list[ClipPlan]:
    """Clip boundaries for audio of length `total` seconds whose speech is at `speech`."""
    if not speech:
        return []
    plans = []
    first = 0
    while first < len(speech):
        start = max(0.0, speech[first][0] - pad)
        if plans:
            start = max(start, plans[-1].end)
        last, forced = _choose_last(speech, first, start, target, min_clip, max_clip)
        end = min(total, speech[last][1] + pad)
        if last + 1 < len(speech):
            end = min(end, (speech[last][1] + speech[last + 1][0]) / 2)
        if forced:
            end = start + max_clip
        if end - start >= min_clip:
            plans.append(ClipPlan(round(start, 3), round(end, 3), forced))
        if forced:
            # the rest of this speech stretch starts a new clip
            speech = speech[: last] + [(end, speech[last][1])] + speech[last + 1 :]
            first = last
        else:
            first = last + 1
    return plans


def _choose_last(speech, first: int, start: float, target: float, min_clip: float, max_clip: float) -> tuple[int, bool]:
    """Index of the last speech interval of the clip that begins at `start` with interval `first`."""
    if speech[first][1] - start > max_clip:
        return first, True
    fits = [i for i in range(first, len(speech)) if speech[i][1] - start <= max_clip]
    last_fit = fits[-1]
    if last_fit == len(speech) - 1 and speech[-1][1] - start <= max_clip and speech[-1][1] - start <= 1.5 * target:
        return last_fit, False
    # candidate cuts: the pauses after intervals first..last_fit (none after the final interval)
    candidates = [i for i in fits if i + 1 < len(speech) and speech[i][1] - start >= min_clip]
    if not candidates:
        return last_fit, False
    near = [i for i in candidates if 0.5 * target <= speech[i][1] - start <= 1.5 * target] or candidates
    return max(near, key=lambda i: (speech[i + 1][0] - speech[i][1], -abs(speech[i][1] - start - target))), False
