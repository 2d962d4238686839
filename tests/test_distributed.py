"""Training on several processes: torchrun, gloo on the CPU, two processes, the tiny model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from fs_pipeline import PipelineError, checkpoints, distributed
from tests.conftest import REPO, cli, load_script

MAX_STEPS, EVERY = 30, 5
TRAIN = ["--max-steps", str(MAX_STEPS), "--checkpoint-every", str(EVERY), "--learning-rate", "3e-3", "--warmup-steps", "2"]

# Runs finetune_tts.py as torchrun's worker. It records its pid, and an audit hook records every write-like call
# (open for writing, rename, remove, mkdir, ...) under the working directory, per rank: rank 0's list shows the
# hook sees the project's writes, and the other rank's must stay empty.
LAUNCHER = '''
import os, runpy, sys
rank, root, out = os.environ["RANK"], os.getcwd(), sys.argv[1]
with open(os.path.join(out, f"pid.{rank}"), "w") as f:
    f.write(str(os.getpid()))
log = open(os.path.join(out, f"writes.{rank}"), "a", buffering=1)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link", "os.symlink", "os.chmod", "shutil.rmtree"}

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)):
            return
        paths = [path]
    elif event in EVENTS:
        paths = args
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root + os.sep):
            log.write(f"{event} {os.path.relpath(os.fsdecode(path), root)}\\n")

sys.addaudithook(audit)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def workspace(sample_dataset, tiny_model_path, tmp_path_factory):
    """Two projects on one dataset, extracted and packed in this process (so that the torchrun runs only train):
    'one' for a run of one process, 'two' for runs of two."""
    root = tmp_path_factory.mktemp("distributed")
    shutil.copytree(sample_dataset, root / "training_data" / "voice")
    common = ["--data-dir", "training_data/voice", "--pretrained-ckpt-path", str(tiny_model_path), "--num-workers-extract", "0",
              "--device", "cpu"]
    before = os.getcwd()
    os.chdir(root)
    try:
        for project in ("one", "two"):
            result = CliRunner().invoke(load_script("finetune_tts").main, ["--project", project, *common, "--extract-tokens"])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(before)
    return root, common


def torchrun(root, out, args) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    launcher = out / "launch.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(launcher), str(out),
               str(REPO / "finetune_tts.py"), *args]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(root, project):
    return [json.loads(line) for line in open(root / "results" / project / "logs" / "metrics.jsonl")]


def adapters(root, project):
    return checkpoints.load(checkpoints.latest(root / "results" / project / "checkpoints").path)["lora"]


@pytest.mark.timeout(600)
def test_two_processes_train_as_one_with_their_batches_and_resume_after_a_killed_process(workspace, tmp_path):
    root, common = workspace
    two = ["--project", "two", *common, "--train", "--batch-size", "2", *TRAIN]

    # 2 processes x batch 2, killed mid-run: rank 1 dies once the checkpoint of step 10 exists
    killed = torchrun(root, tmp_path / "killed", two)
    ckpt_dir = root / "results" / "two" / "checkpoints"
    deadline = time.time() + 300
    while killed.poll() is None and time.time() < deadline and not (ckpt_dir / checkpoints.checkpoint_name(2 * EVERY)).is_file():
        time.sleep(0.05)
    assert killed.poll() is None, f"the run ended before it could be killed mid-run\n{killed.communicate()[1][-3000:]}"
    os.kill(int((tmp_path / "killed" / "pid.1").read_text()), signal.SIGKILL)
    out, err = killed.communicate(timeout=120)
    assert killed.returncode != 0
    stopped_at = checkpoints.latest(ckpt_dir).step
    assert 2 * EVERY <= stopped_at < MAX_STEPS  # a kill mid-run, not after the end

    # the same command again continues from the last complete checkpoint, to the end
    resumed = torchrun(root, tmp_path / "resumed", two)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from results/two/checkpoints/step_{stopped_at:09d}.ckpt" in err
    assert "effective batch: 2 per process x 2 process(es) x 1 accumulation step(s) = 4 examples per step" in err

    # 1 process x batch 4, uninterrupted, in this process: the same code with one process
    before = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(load_script("finetune_tts").main, ["--project", "one", *common, "--train", "--batch-size", "4", *TRAIN])
    finally:
        os.chdir(before)
    assert result.exit_code == 0, result.output

    # Each step's losses and gradient norm, and the validation losses, as one process of batch 4. fp32 sums in another
    # order moved them by at most 2e-7 (losses) and 5e-6 (gradient norm) relatively here. Another share of the examples
    # changes the step-1 loss by far more, and per-process weighting or a gradient of the wrong scale shows in the
    # gradient norm (Adam would hide a scale in the loss).
    one_rows, two_rows = metrics(root, "one"), metrics(root, "two")
    assert [r["step"] for r in two_rows] == list(range(1, MAX_STEPS + 1))  # each step once, after the resume too
    for key, tolerance in (("loss", 1e-5), ("token_loss", 1e-5), ("codebook_loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-4)):
        ones, twos = ({r["step"]: r[key] for r in rows if key in r} for rows in (one_rows, two_rows))
        assert twos.keys() == ones.keys() and list(twos.values()) == pytest.approx(list(ones.values()), rel=tolerance), key
    # and the adapters at the end (they differed by 1.3e-7 of the largest here)
    mine, reference = adapters(root, "two"), adapters(root, "one")
    scale = max(v.abs().max() for v in reference.values())
    assert all((mine[k] - v).abs().max() <= 1e-5 * scale for k, v in reference.items())
    assert checkpoints.info(checkpoints.latest(ckpt_dir).path).processes == 2

    # Only rank 0 wrote: the hook saw its checkpoints, metrics, manifest and lock, and nothing of rank 1, in both runs
    for run in ("killed", "resumed"):
        rank0 = (tmp_path / run / "writes.0").read_text()
        assert "results/two/checkpoints/step_" in rank0 and "results/two/logs/metrics.jsonl" in rank0
        assert "results/two/.lock" in rank0 and "results/two/manifest.json" in rank0
        assert (tmp_path / run / "writes.1").read_text() == ""

    # a resume with another number of processes is refused with one line
    os.chdir(root)
    try:
        refused = CliRunner().invoke(load_script("finetune_tts").main, ["--project", "two", *common, "--train", "--batch-size", "2",
                                                                        *TRAIN, "--max-steps", str(MAX_STEPS + 5)])
    finally:
        os.chdir(before)
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines()[-1] == (
        f"error: results/two/checkpoints/step_{MAX_STEPS:09d}.ckpt was trained by 2 process(es) and this run has 1: each step's "
        "batch depends on it; resume it with torchrun --nproc-per-node 2, or pass --force-stage train to start over (the old "
        "checkpoints are moved aside)"
    )


def test_the_world_comes_from_torchruns_environment():
    assert distributed.world_from_environment({}) == distributed.SINGLE
    world = distributed.world_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_main) == (3, 4, 1, False)
    with pytest.raises(PipelineError, match="WORLD_SIZE is set, but RANK or LOCAL_RANK is missing"):
        distributed.world_from_environment({"WORLD_SIZE": "2"})
    assert distributed.backend(torch.device("cpu")) == "gloo"
    assert distributed.backend(torch.device("cuda", 1)) == ("gloo" if sys.platform == "win32" else "nccl")


def test_gpus_relaunches_the_same_command_through_torchrun():
    argv = ["--project", "p", "--gpus", "4", "--full-pipeline", "--gpus=4", "--batch-size", "2"]
    assert distributed.torchrun_command("finetune_tts.py", argv, 4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "finetune_tts.py",
        "--project", "p", "--full-pipeline", "--batch-size", "2",
    ]
    with pytest.raises(PipelineError, match="--gpus must be at least 1"):
        distributed.torchrun_command("finetune_tts.py", argv, 0)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    from fs_pipeline.device import DeviceChoice, on_local_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # no GPU here: only the count is mocked
    choice = DeviceChoice(torch.device("cuda"), torch.bfloat16, "auto")
    second = on_local_gpu(choice, 1)
    assert (second.device, second.dtype) == (torch.device("cuda", 1), torch.bfloat16)
    with pytest.raises(PipelineError, match=r"more processes on this machine than the 2 GPU\(s\) torch sees: pass --nproc-per-node 2"):
        on_local_gpu(choice, 2)


def test_gpus_is_refused_before_any_work_without_a_training_command(workspace):
    folder, _ = workspace
    result = cli("--project", "p", "--gpus", "2", "--status")
    assert result.exit_code == 2
    assert "--gpus N trains on N GPUs: use it with --train or --full-pipeline" in result.output
    assert not (folder / "results" / "p").exists()
