import pytest
from click.testing import CliRunner

from fs_pipeline import demo
from tests.conftest import load_script


@pytest.mark.parametrize(
    "script, words",
    [
        ("finetune_tts", ["--pretrained-ckpt-path", "--model-version", "--device", "--force-mps"]),
        ("prepare_dataset", ["training_data/NAME/SPEAKER"]),
        ("cli_tts", ["checkpoints/PROJECT-merged"]),
    ],
)
def test_help(script, words):
    result = CliRunner().invoke(load_script(script).main, ["--help"])
    assert result.exit_code == 0, result.output
    for word in words:
        assert word in result.output


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


def test_demo_summary(tmp_path):
    result = CliRunner().invoke(demo.main, ["--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for line in ["device         cpu", "precision      fp32", "model version  s1-mini", "LLM            ", "sample data"]:
        assert line in result.output
    assert (tmp_path / "checkpoints" / "tiny-s1-mini" / "model.pth").is_file()
    assert len(list((tmp_path / "training_data" / "sample").glob("*/*.lab"))) == 6
