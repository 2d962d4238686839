"""One source of truth for stage state, and every command as safe as --full-pipeline (issue 15)."""

import subprocess
import sys

import pytest

from fs_pipeline import checkpoints
from tests.conftest import REPO, cli, status_states

DONE_THROUGH_SYNTHESIS = {"extract": "done", "pack": "done", "train": "done", "merge": "done", "synthesize": "done"}


def states_without_prepare():
    return {stage: state for stage, state in status_states().items() if stage != "prepare"}


def test_each_stage_command_records_its_stage_and_status_agrees(workspace):
    _, flags = workspace
    extracted = cli(*flags, "--extract-tokens")
    assert extracted.exit_code == 0, extracted.output
    assert "Extracted 6 clips" in extracted.output and "up to date: -" in extracted.output  # prepare does not apply here
    assert states_without_prepare() == {"extract": "done", "pack": "done", "train": "not run", "merge": "not run", "synthesize": "not run"}

    trained = cli(*flags, "--train")
    assert trained.exit_code == 0, trained.output
    assert "Trained to step 12" in trained.output
    assert status_states()["train"] == "done"
    again = cli(*flags, "--train")
    assert "Ran: nothing (all up to date); up to date: extract, pack, train" in again.output

    # The project remembers its base model (not the default path) and dataset: --project is enough.
    merged = cli("--project", "p", "--merge-weights", "--device", "cpu")
    assert merged.exit_code == 0, merged.output
    assert "Project p remembers: --pretrained-ckpt-path" in merged.output and "Merged step_" in merged.output
    assert status_states()["merge"] == "done"

    full = cli(*flags, "--full-pipeline")
    assert "Ran: synthesize; up to date: extract, pack, train, merge" in full.output
    assert states_without_prepare() == DONE_THROUGH_SYNTHESIS
    assert "Ran: nothing (all up to date)" in cli(*flags, "--full-pipeline").output


def test_a_second_train_never_overwrites_an_earlier_run(workspace):
    root, flags = workspace
    assert cli(*flags, "--train").exit_code == 0
    folder = root / "results" / "p" / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}
    other = cli(*flags, "--train", "--learning-rate", "1e-3")
    assert other.exit_code == 1
    assert other.output.splitlines()[-1].startswith("error: results/p/checkpoints/step_000000012.ckpt was trained with other settings: "
                                                   "--learning-rate 0.001 (checkpoint: 0.003)")
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == before
    assert status_states()["train"] == "done"
    longer = cli(*flags, "--train", "--max-steps", "16")  # the total may grow: the same run continues
    assert longer.exit_code == 0 and "Trained to step 16" in longer.output
    assert (folder / "step_000000012.ckpt").read_bytes() == before["step_000000012.ckpt"]


def test_identical_bytes_rewritten_leave_later_stages_done(workspace):
    root, flags = workspace
    assert cli(*flags, "--full-pipeline").exit_code == 0
    packed = (root / "results" / "p" / "data" / "train.protos").read_bytes()
    repacked = cli(*flags, "--full-pipeline", "--force-stage", "pack", "--to-stage", "pack")
    assert repacked.exit_code == 0 and "Ran: pack" in repacked.output
    assert (root / "results" / "p" / "data" / "train.protos").read_bytes() == packed
    assert states_without_prepare() == DONE_THROUGH_SYNTHESIS
    assert "Ran: nothing (all up to date)" in cli(*flags, "--full-pipeline").output

    (root / "results" / "p" / "data" / "val.protos").write_bytes(b"")  # other bytes: what follows pack is stale, run and status agree
    assert status_states()["pack"] == "stale: outputs changed or deleted"
    rerun = cli(*flags, "--full-pipeline")
    assert "Ran: pack;" in rerun.output  # the same bytes again, so training stays current


def test_the_same_data_under_another_path_spelling_is_the_same_data(workspace):
    root, flags = workspace
    assert cli(*flags, "--full-pipeline").exit_code == 0
    absolute = [str(root / "training_data" / "voice") if f == "training_data/voice" else f for f in flags]
    again = cli(*absolute, "--full-pipeline")
    assert again.exit_code == 0, again.output
    assert "Ran: nothing (all up to date)" in again.output


@pytest.mark.parametrize("args, message", [
    (["--train", "--max-steps", "-3"], "error: --max-steps must be at least 1 (got -3)"),
    (["--train", "--lora-config", "rank_eight"], "error: unknown --lora-config 'rank_eight'"),
    (["--full-pipeline", "--val-fraction", "2"], "error: --val-fraction 2.0 is out of range"),
    (["--full-pipeline", "--resume-latest"], "error: --resume-latest: no checkpoint in results/p/checkpoints yet"),
    (["--full-pipeline", "--force-stage", "merge", "--to-stage", "pack"], "error: --force-stage merge is outside the stages"),
    (["--train", "--resume-from-checkpoint", "nowhere.ckpt"], "error: --resume-from-checkpoint: checkpoint not found: nowhere.ckpt"),
    (["--extract-tokens", "--batch-size-extract", "0"], "error: --batch-size-extract must be at least 1 (got 0)"),
])
def test_bad_values_are_refused_before_any_work(workspace, args, message):
    root, flags = workspace
    result = cli(*flags, *args)
    assert result.exit_code == 1 and result.output.splitlines()[-1].startswith(message), result.output
    assert not (root / "results").exists() and not list((root / "training_data").rglob("*.npy"))


def test_a_missing_dataset_leaves_nothing_behind(workspace):
    root, flags = workspace
    missing = [f if f != "training_data/voice" else "training_data/nowhere" for f in flags]
    result = cli(*missing, "--extract-tokens")
    assert result.exit_code == 1 and "error: dataset not found: training_data/nowhere" in result.output
    assert not (root / "results").exists()


def test_every_writer_takes_the_project_lock(workspace):
    root, flags = workspace
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom fs_pipeline.lock import project_lock\nwith project_lock(sys.argv[1], 'pipeline'):\n"
         "    print('held', flush=True); sys.stdin.read()", str(root / "results" / "p")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        (root / "results" / "p").mkdir(parents=True)
        assert holder.stdout.readline() == "held\n"
        for action in (["--prepare-data"], ["--extract-tokens"], ["--train"], ["--merge-weights"], ["--full-pipeline"]):
            result = cli(*flags, *action)
            assert result.exit_code == 1, (action, result.output)
            assert f"error: another pipeline run (pid {holder.pid}) is using results/p: wait for it" in result.output, action
    finally:
        holder.communicate("")
    assert not list((root / "training_data").rglob("*.npy"))


def test_a_second_project_on_the_same_dataset_extracts_nothing(workspace):
    _, flags = workspace
    assert cli(*flags, "--extract-tokens").exit_code == 0
    other = cli(*["q" if f == "p" else f for f in flags], "--extract-tokens")
    assert other.exit_code == 0, other.output
    assert "Extract: all 6 clips up to date, nothing to do" in other.output
    assert status_states("q")["extract"] == "done"


def test_status_of_an_unknown_project_is_an_error(workspace):
    assert cli(*workspace[1], "--extract-tokens").exit_code == 0
    result = cli("--project", "pp", "--status")
    assert result.exit_code == 1 and result.output.strip() == "error: no project 'pp' in results/: check the name (projects there: p)"


def test_listing_checkpoints_loads_none(workspace, monkeypatch):
    root, flags = workspace
    assert cli(*flags, "--train").exit_code == 0

    def no_load(path):
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(checkpoints, "load", no_load)
    listing = cli("--project", "p", "--list-checkpoints")
    assert listing.exit_code == 0 and "Latest: step_000000012.ckpt (step 12)" in listing.output


def test_forcing_extract_encodes_every_clip_again(workspace):
    _, flags = workspace
    assert cli(*flags, "--extract-tokens").exit_code == 0
    forced = cli(*flags, "--full-pipeline", "--to-stage", "extract", "--force-stage", "extract")
    assert forced.exit_code == 0 and "Extracted 6 clips" in forced.output
