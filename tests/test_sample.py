import json

import soundfile as sf

from fs_pipeline.sample import SAMPLE_SPEAKER, SENTENCES


def test_sample_dataset_layout(sample_dataset, tiny_model_dir):
    clips = sorted((sample_dataset / SAMPLE_SPEAKER).glob("*.wav"))
    assert len(clips) == len(SENTENCES)
    for clip, text in zip(clips, SENTENCES):
        info = sf.info(clip)
        assert (info.samplerate, info.channels) == (tiny_model_dir.version.sample_rate, 1)
        assert 1.0 < info.duration < 10.0
        assert clip.with_suffix(".lab").read_text().strip() == text
    summary = json.loads((sample_dataset / "dataset_summary.json").read_text())
    assert summary["total_files"] == len(SENTENCES)
    assert summary["speakers"][SAMPLE_SPEAKER]["files"] == len(SENTENCES)
    total = sum(sf.info(c).duration for c in clips) / 60
    assert abs(summary["total_duration_minutes"] - total) < 1e-3
