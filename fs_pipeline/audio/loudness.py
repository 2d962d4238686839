"""Loudness normalisation to a target integrated loudness (ITU-R BS.1770, via pyloudnorm), with a peak limit."""

import numpy as np
import pyloudnorm

MIN_MEASURABLE_SECONDS = 0.4  # BS.1770 gates 400 ms blocks


def normalize(audio: np.ndarray, sample_rate: int, target_lufs: float = -23.0, peak_dbfs: float = -1.0) -> tuple[np.ndarray, dict]:
    """Gain `audio` to `target_lufs`; if that would push a sample above `peak_dbfs`, use the largest gain
    that doesn't (the clip ends up quieter than the target rather than clipped)."""
    if len(audio) < MIN_MEASURABLE_SECONDS * sample_rate:
        return audio, {"lufs_before": None, "gain_db": 0.0, "peak_limited": False}
    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(audio.astype(np.float64))
    if not np.isfinite(loudness):  # silence
        return audio, {"lufs_before": None, "gain_db": 0.0, "peak_limited": False}
    gain_db = target_lufs - loudness
    peak = float(np.max(np.abs(audio)))
    ceiling_db = peak_dbfs - 20 * np.log10(max(peak, 1e-9))
    limited = gain_db > ceiling_db
    gain_db = min(gain_db, ceiling_db)
    out = (audio * 10 ** (gain_db / 20)).astype(np.float32)
    return out, {"lufs_before": round(float(loudness), 2), "gain_db": round(float(gain_db), 2), "peak_limited": bool(limited)}
