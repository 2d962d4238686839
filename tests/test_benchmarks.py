"""Each benchmark runs for a moment on CPU with the tiny kit, so the scripts don't rot. No timing is asserted."""

import pytest
from click.testing import CliRunner

from benchmarks import extract_throughput


def test_extract_throughput_smoke():
    result = CliRunner().invoke(
        extract_throughput.main, ["--clips", "3", "--max-seconds", "3", "--batch-sizes", "2", "--num-workers", "0", "--no-record", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "| upstream approach" in result.output and "| fs-pipeline, batch 2 (at most 240 audio-s), 0 workers |" in result.output


def test_train_throughput_smoke():
    from benchmarks import train_throughput

    result = CliRunner().invoke(train_throughput.main, ["--steps", "2", "--frames", "20", "--pack-utterances", "--max-length", "256", "--no-record", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| fs-pipeline |" in result.output


def test_merge_synthesis_smoke():
    from benchmarks import merge_synthesis

    result = CliRunner().invoke(merge_synthesis.main, ["--frames", "4", "--no-record", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| merge peak resident memory |" in result.output and "| synthesis: realtime factor |" in result.output


def test_prep_throughput_smoke():
    from benchmarks import prep_throughput

    result = CliRunner().invoke(prep_throughput.main, ["--minutes", "0.1", "--no-record", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| faster-whisper | real tiny.en |" in result.output and "| openai-whisper |" in result.output


def test_upstream_train_step_smoke_ours_only():
    """Upstream's code is never committed, so CI runs only our side of this benchmark."""
    from benchmarks import upstream_train_step

    result = CliRunner().invoke(
        upstream_train_step.main, ["--llm-size", "tiny", "--device", "cpu", "--frames", "20", "--steps", "3", "--warmup", "1", "--pack-utterances", "--max-length", "256", "--no-record"]
    )
    assert result.exit_code == 0, result.output
    assert "| fs-pipeline step, eager |" in result.output


def test_synthesis_vs_upstream_smoke():
    from benchmarks import synthesis_vs_upstream

    result = CliRunner().invoke(synthesis_vs_upstream.main, ["--llm-size", "tiny", "--frames", "5", "--device", "cpu", "--no-record"])
    assert result.exit_code == 0, result.output
    assert "| upstream generate (eager) |" in result.output and "| fs-pipeline Synthesizer.generate (eager) |" in result.output


def test_prep_throughput_asr_only_smoke(sample_dataset):
    from benchmarks import prep_throughput

    result = CliRunner().invoke(prep_throughput.main, ["--asr-only", str(sample_dataset), "--no-record", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| faster-whisper | real tiny.en |" in result.output and "| openai-whisper |" in result.output


@pytest.mark.slow  # 30 s: the adapters of a release-sized model, written twice
def test_checkpoint_listing_smoke():
    from benchmarks import checkpoint_listing

    result = CliRunner().invoke(checkpoint_listing.main, ["--count", "2", "--no-record"])
    assert result.exit_code == 0, result.output
    assert "| read the records beside them |" in result.output
