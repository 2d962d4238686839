"""The full pipeline through finetune_tts.py: orchestration, status, report, crash safety and faults."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fs_pipeline import fileio
from fs_pipeline.lock import project_lock
from tests.conftest import REPO, cli, status_states


def merged_weights(root):
    return torch.load(root / "checkpoints" / "p-merged" / "model.pth", weights_only=True)


def test_full_pipeline_status_report_and_rerun(workspace):
    root, flags = workspace
    unknown = cli("--project", "p", "--status")
    assert unknown.exit_code == 1 and unknown.output.strip() == "error: no project 'p' in results/: check the name (projects there: none)"

    partial = cli(*flags, "--full-pipeline", "--to-stage", "pack")
    assert partial.exit_code == 0, partial.output
    states = status_states()
    assert states["extract"] == "done" and states["pack"] == "done" and states["train"] == "not run"

    full = cli(*flags, "--full-pipeline")
    assert full.exit_code == 0, full.output
    assert "Ran: train, merge, synthesize" in full.output
    states = status_states()
    assert [states[s] for s in ("extract", "pack", "train", "merge", "synthesize")] == ["done"] * 5
    report = root / "results" / "p" / "report.md"
    text = report.read_text()
    for plot in ("loss.png", "tokens_per_second.png", "speaker_minutes.png"):
        assert f"plots/{plot}" in text and (root / "results" / "p" / "plots" / plot).stat().st_size > 1000
    assert "checkpoints/p-merged" in text and "python cli_tts.py" in text and "QA warnings" in text

    again = cli(*flags, "--full-pipeline")
    assert "Ran: nothing (all up to date)" in again.output

    (root / "results" / "p" / "data" / "train.protos").unlink()
    assert status_states()["pack"] == "stale: outputs changed or deleted"
    redo = cli(*flags, "--full-pipeline")
    assert "Ran: pack" in redo.output  # same bytes again, so training and what follows stay current


def test_force_stage_and_slices(workspace):
    root, flags = workspace
    assert cli(*flags, "--full-pipeline").exit_code == 0
    first = merged_weights(root)
    forced = cli(*flags, "--full-pipeline", "--force-stage", "train")
    assert forced.exit_code == 0, forced.output
    assert "Ran: train, merge, synthesize" in forced.output
    aside = list((root / "results" / "p").glob("checkpoints.old-*"))
    assert len(aside) == 1 and {p.name for p in aside[0].iterdir()} == {"checkpoints", "metrics.jsonl", "tensorboard"}
    assert logged_steps(root) == (list(range(1, 13)), list(range(1, 13)))  # the new run's alone
    assert all(torch.equal(first[k], v) for k, v in merged_weights(root).items())  # same settings, same result

    sliced = cli(*flags, "--full-pipeline", "--from-stage", "merge", "--to-stage", "merge", "--force-stage", "merge")
    assert "Ran: merge;" in sliced.output


def test_changed_training_settings_need_force(workspace):
    _, flags = workspace
    assert cli(*flags, "--full-pipeline", "--to-stage", "train").exit_code == 0
    changed = cli(*flags, "--full-pipeline", "--batch-size", "2")
    assert changed.exit_code == 1
    assert ("step_000000012.ckpt was trained with other settings: --batch-size 2 (checkpoint: 4): pass the checkpoint's values, "
            "or pass --force-stage train to start over") in changed.output


def test_raw_recordings_are_prepared_first(workspace, tmp_path):
    _, flags = workspace
    import soundfile as sf

    raw = tmp_path / "raw"
    raw.mkdir()
    for wav in (tmp_path / "training_data" / "voice" / "sample_speaker").glob("*.wav"):  # recordings as flac + transcripts
        audio, rate = sf.read(wav)
        sf.write(raw / f"{wav.stem}.flac", audio, rate)
        shutil.copy(wav.with_suffix(".lab"), raw / f"{wav.stem}.lab")
    flags = [f if f != "training_data/voice" else "raw" for f in flags]
    result = cli(*flags, "--full-pipeline", "--to-stage", "pack")
    assert result.exit_code == 0, result.output
    assert "Ran: prepare, extract, pack" in result.output
    assert len(list((tmp_path / "training_data" / "p" / "p").glob("*.lab"))) == 6


def test_full_disk_is_one_line_and_keeps_finished_work(workspace, monkeypatch):
    root, flags = workspace
    assert cli(*flags, "--full-pipeline", "--to-stage", "pack").exit_code == 0
    packed = (root / "results" / "p" / "data" / "train.protos").read_bytes()
    real = fileio.atomic_path

    def full_disk(path):
        if str(path).endswith(".protos"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path)

    monkeypatch.setattr("fs_pipeline.packed.atomic_path", full_disk)
    result = cli(*flags, "--full-pipeline", "--to-stage", "pack", "--force-stage", "pack")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left on the device while writing results/p/data/train.protos")
    assert (root / "results" / "p" / "data" / "train.protos").read_bytes() == packed


@pytest.mark.parametrize("stage, target", [
    ("extract", "fs_pipeline.stages.extract._save_npy"),
    ("pack", "fs_pipeline.stages.pack.write_protos"),
    ("merge", "fs_pipeline.stages.merge._swap_in"),
    ("synthesize", "fs_pipeline.stages.synthesize.write_wav"),
])
def test_ctrl_c_in_a_stage_then_rerun_finishes_the_same(workspace, monkeypatch, stage, target, tmp_path_factory):
    root, flags = workspace
    clean_root = tmp_path_factory.mktemp("clean")
    monkeypatch.chdir(clean_root)
    shutil.copytree(root / "training_data", clean_root / "training_data")
    assert cli(*flags, "--full-pipeline").exit_code == 0
    expected = merged_weights(clean_root)

    monkeypatch.chdir(root)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(target, interrupted)
        stopped = cli(*flags, "--full-pipeline")
    assert stopped.exit_code == 130 and "interrupted" in stopped.output
    with project_lock(root / "results" / "p", "test"):  # released
        pass
    finished = cli(*flags, "--full-pipeline")
    assert finished.exit_code == 0, finished.output
    assert all(torch.equal(expected[k], v) for k, v in merged_weights(root).items())


def launch(root, flags):
    return subprocess.Popen([sys.executable, str(REPO / "finetune_tts.py"), *flags, "--full-pipeline"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(root, flags):
    done = subprocess.run([sys.executable, str(REPO / "finetune_tts.py"), *flags, "--full-pipeline"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def clean_run(workspace, tmp_path_factory) -> tuple[dict, float]:
    root, flags = workspace
    clean = tmp_path_factory.mktemp("clean")
    shutil.copytree(root / "training_data", clean / "training_data")
    started = time.perf_counter()
    finish(clean, flags)
    return merged_weights(clean), time.perf_counter() - started


def assert_same_model(expected, root):
    got = merged_weights(root)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.timeout(300)
def test_kill_9_mid_training_then_rerun_equals_a_clean_run(workspace, tmp_path_factory):
    root, flags = workspace
    expected, _ = clean_run(workspace, tmp_path_factory)
    proc = launch(root, flags)
    metrics = root / "results" / "p" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 6):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    finish(root, flags)
    assert_same_model(expected, root)
    assert killed_at > 4 and logged_steps(root) == (list(range(1, 13)), list(range(1, 13)))  # steps 5.. logged once


def logged_steps(root) -> tuple[list[int], list[int]]:
    """The steps in metrics.jsonl, and those TensorBoard shows for the loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = root / "results" / "p" / "logs"
    board = EventAccumulator(str(logs / "tensorboard"))
    board.Reload()
    return [json.loads(line)["step"] for line in open(logs / "metrics.jsonl")], [event.step for event in board.Scalars("loss")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_at_random_points(workspace, tmp_path_factory):
    root, flags = workspace
    expected, duration = clean_run(workspace, tmp_path_factory)
    rng = random.Random(0)
    for _ in range(8):
        proc = launch(root, flags)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finish(root, flags)
    assert_same_model(expected, root)
