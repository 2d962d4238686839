import re

import pytest
from click.testing import CliRunner

from fs_pipeline import demo
from tests.conftest import load_script


@pytest.mark.parametrize(
    "script, words",
    [
        ("finetune_tts", ["--pretrained-ckpt-path", "--model-version", "--device", "--force-mps"]),
        ("prepare_dataset", ["OUTPUT/SPEAKER/*.wav", "--split-long", "--auto-transcribe", "--max-duration"]),
        ("cli_tts", ["checkpoints/PROJECT-merged"]),
    ],
)
def test_help(script, words):
    result = CliRunner().invoke(load_script(script).main, ["--help"])
    assert result.exit_code == 0, result.output
    unwrapped = re.sub(r"-\n\s+", "-", result.output)  # click wraps long words at their hyphens
    for word in words:
        assert word in unwrapped


def test_check_model_prints_summary(tiny_model_path):
    result = CliRunner().invoke(
        load_script("finetune_tts").main, ["--check-model", "--pretrained-ckpt-path", str(tiny_model_path), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "precision      fp32" in result.output
    assert "s1-mini" in result.output and "4 codebooks" in result.output


def test_check_model_bad_path_is_one_red_line(tmp_path):
    result = CliRunner().invoke(load_script("finetune_tts").main, ["--check-model", "--pretrained-ckpt-path", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: model directory not found:")
    assert len(result.output.strip().splitlines()) == 1


def test_demo_runs_the_pipeline_and_reruns_skip(tmp_path):
    result = CliRunner().invoke(demo.main, ["--workdir", str(tmp_path), "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for line in ["device         cpu", "precision      fp32", "model version  s1-mini",
                 "stages run     extract, pack, train, merge, synthesize", "training       step 4", "report"]:
        assert line in result.output
    assert (tmp_path / "checkpoints" / "tiny-s1-mini" / "model.pth").is_file()
    assert (tmp_path / "checkpoints" / "demo-merged" / "manifest.json").is_file()
    assert (tmp_path / "results" / "demo" / "test_clip.wav").is_file()
    assert (tmp_path / "results" / "demo" / "report.md").is_file()
    again = CliRunner().invoke(demo.main, ["--workdir", str(tmp_path), "--steps", "4", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "stages run     none (all up to date)" in again.output


def test_extract_tokens_end_to_end_and_rerun(tiny_model_path, sample_dataset, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(sample_dataset, tmp_path / "training_data" / "voice")
    args = ["--project", "p", "--data-dir", "training_data/voice", "--extract-tokens",
            "--pretrained-ckpt-path", str(tiny_model_path), "--num-workers-extract", "0", "--device", "cpu"]
    first = CliRunner().invoke(load_script("finetune_tts").main, args)
    assert first.exit_code == 0, first.output
    assert "Extracted 6 clips" in first.output and "5 train / 1 validation" in first.output
    assert (tmp_path / "results" / "p" / "data" / "train.protos").is_file()
    second = CliRunner().invoke(load_script("finetune_tts").main, args)
    assert "Extract: all 6 clips up to date, nothing to do" in second.output
    assert "Packed data up to date" in second.output


def test_extract_tokens_needs_project_and_data(tiny_model_path):
    result = CliRunner().invoke(load_script("finetune_tts").main, ["--extract-tokens", "--pretrained-ckpt-path", str(tiny_model_path)])
    assert result.exit_code == 2 and "this needs --project NAME" in result.output


def test_prepare_dataset_cli_bad_url_and_rerun(tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    monkeypatch.chdir(tmp_path)
    rate = 22050
    sf.write("take one.wav", (0.2 * np.sin(np.arange(3 * rate) / 10)).astype(np.float32), rate)
    (tmp_path / "take one.lab").write_text("hello there")
    script = load_script("prepare_dataset").main
    args = ["--input", "take one.wav", "--output", "training_data/x", "--speaker", "me", "--device", "cpu"]
    first = CliRunner().invoke(script, args)
    assert first.exit_code == 0, first.output
    assert "Prepared 1 clips in training_data/x" in first.output
    again = CliRunner().invoke(script, args)
    assert "Nothing to do: 1 clips in training_data/x are up to date" in again.output
    bad = CliRunner().invoke(script, ["--input", "http://127.0.0.1:9/a.wav", "--output", "training_data/y", "--speaker", "me"])
    assert bad.exit_code == 1 and bad.output.strip().startswith("error: download failed")
