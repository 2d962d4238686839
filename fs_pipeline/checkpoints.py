"""Training checkpoints: the file format, atomic save, safe load, listing, choosing and pruning.

results/<project>/checkpoints/step_000000100.ckpt is a torch.save'd dict (loaded with weights_only=True):

    format      CHECKPOINT_FORMAT
    step        optimizer steps taken
    lora        adapter weights (fp32), keyed as in the model's state dict
    lora_config {"r", "alpha", "dropout"}
    base_model  {"identity": content hash of the base model's files, "version": "s1-mini"}
    optimizer, scheduler    their state dicts
    rng         {"python": random.getstate(), "torch": CPU generator state, "cuda": the current GPU's generator state
                 (a list of every GPU's in checkpoints of older versions), "cpu_threads": torch's CPU thread count}
    data        {"consumed": training examples drawn so far (the data-loader position)}
    metrics     {"train_loss", "val_loss", ...} at this step
    processes   how many training processes (GPUs) made it: 1 without torchrun, and where older checkpoints lack it
    effective_batch  examples per optimizer step: batch size x processes x accumulation steps
    run         what made it: {"settings": the training settings that decide the result, "base": base identity,
                "version", "data": content hash of the packed data}; a resume must match it
    created_at  ISO time

Beside each checkpoint, step_000000100.json (written after it, atomically) holds its step, time, size,
metrics, run record and number of processes, so listing, choosing and pruning never load a checkpoint. A checkpoint without
one (written by an older version) gets it on first listing; one whose size differs from its record is
loaded, so a damaged file is still found.

With test clips, metrics hold "wer" and "similarity" (to the training voice), and base.json holds the same
scores for the base model's own test clips (base_clips/): the reference a fine-tune is compared with.
"""

import json
import random
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from fs_pipeline import PipelineError
from fs_pipeline.fileio import atomic_path, write_json_atomic

CHECKPOINT_FORMAT = 1
PATTERN = "step_*.ckpt"
BASE_RECORD = "base.json"
# What "best" can mean, and whether lower is better. combined = similarity - WER (higher is better) weighs 0.01 of
# similarity to the training voice like 0.01 of word error rate. It scores each checkpoint on its own, unlike a rank
# among checkpoints, so pruning or a new checkpoint never changes which of two others is the better. On Resemblyzer's
# scale another voice scores 0.5-0.75 and the same voice 0.8-0.95, so moving from the base's voice to the speaker's
# gains tenths: a checkpoint that sounds like the speaker wins unless it costs as many points of WER.
BEST_BY = {"val_loss": True, "wer": True, "similarity": False, "combined": False}


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}.ckpt"


def rng_state() -> dict:
    """What a resumed run needs to draw and add up exactly as the run it continues: the random generators,
    and the CPU thread count (it decides how CPU sums are split, and so their last bits)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        # the current GPU's alone: every GPU's would start a CUDA context on each GPU in each of torchrun's processes
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cpu_threads" in state:
        torch.set_num_threads(state["cpu_threads"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], list):  # every GPU's, as older versions saved them
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


def metadata_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def save(folder: Path, payload: dict) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    path = Path(folder) / checkpoint_name(payload["step"])
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    _write_metadata(path, payload)
    return path


def _write_metadata(path: Path, payload: dict) -> dict:
    record = {"step": payload["step"], "created_at": payload["created_at"], "size": path.stat().st_size,
              "metrics": payload.get("metrics", {}), "run": payload.get("run"), "processes": payload.get("processes", 1)}
    write_json_atomic(metadata_path(path), record)
    return record


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}: list them with --list-checkpoints")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises many different errors
        raise PipelineError(f"cannot read checkpoint {path} ({type(e).__name__}): the file is damaged or not ours; use another one") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not an fs-pipeline training checkpoint: pass a step_*.ckpt from results/PROJECT/checkpoints/")
    return payload


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    size_mb: float
    created_at: str
    val_loss: float | None
    wer: float | None
    similarity: float | None  # of its test clips to the training voice (speaker embeddings)
    run: dict | None
    processes: int = 1  # training processes (GPUs) that made it

    @property
    def combined(self) -> float | None:
        return combined(self.wer, self.similarity)


def combined(wer: float | None, similarity: float | None) -> float | None:
    """The --best-by combined score: similarity - WER (see BEST_BY)."""
    return similarity - wer if wer is not None and similarity is not None else None


def info(path: Path) -> CheckpointInfo:
    """A checkpoint's metadata from its small record; the checkpoint itself is read only when the record is
    missing or its size is not the file's (then a damaged file raises PipelineError)."""
    path = Path(path)
    try:
        record = json.loads(metadata_path(path).read_text(encoding="utf-8"))
        fresh = record["size"] == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if not fresh:
        record = _write_metadata(path, load(path))
    metrics = record["metrics"]
    return CheckpointInfo(path, record["step"], record["size"] / 1e6, record["created_at"], metrics.get("val_loss"), metrics.get("wer"),
                          metrics.get("similarity"), record.get("run"), record.get("processes", 1))


def list_checkpoints(folder: Path) -> list[CheckpointInfo]:
    """Readable checkpoints, oldest step first. Unreadable files are left out (unreadable() names them)."""
    infos = []
    for path in sorted(Path(folder).glob(PATTERN)):
        try:
            infos.append(info(path))
        except PipelineError:
            continue
    return sorted(infos, key=lambda i: i.step)


def unreadable(folder: Path) -> list[Path]:
    readable = {i.path for i in list_checkpoints(folder)}
    return [p for p in sorted(Path(folder).glob(PATTERN)) if p not in readable]


def latest(folder: Path) -> CheckpointInfo | None:
    infos = list_checkpoints(folder)
    return infos[-1] if infos else None


def best(folder: Path, by: str = "val_loss", infos: list[CheckpointInfo] | None = None) -> CheckpointInfo | None:
    """The best checkpoint by one of BEST_BY: the lowest validation loss or test-clip WER, the highest
    similarity to the training voice or combined score. Ties go to the later step."""
    sign = 1 if BEST_BY[by] else -1
    scored = [i for i in (list_checkpoints(folder) if infos is None else infos) if getattr(i, by) is not None]
    return min(scored, key=lambda i: (sign * getattr(i, by), -i.step)) if scored else None


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and the best by each of BEST_BY, with their records and
    test clips. Returns what was deleted."""
    infos = list_checkpoints(folder)
    keep_paths = {i.path for i in infos[-keep:]} if keep > 0 else set()
    keep_paths |= {top.path for top in (best(folder, by, infos) for by in BEST_BY) if top is not None}
    removed = [i.path for i in infos if i.path not in keep_paths]
    for path in removed:
        path.unlink()
        metadata_path(path).unlink(missing_ok=True)
        shutil.rmtree(path.with_name(path.stem + "_clips"), ignore_errors=True)
    return removed


def save_base_scores(folder: Path, metrics: dict) -> None:
    """The base model's test-clip scores ("wer", "similarity"), the reference row of listings and the report."""
    write_json_atomic(Path(folder) / BASE_RECORD, {"metrics": metrics})


def base_scores(folder: Path) -> dict | None:
    """What save_base_scores recorded in `folder`, or None."""
    try:
        return json.loads((Path(folder) / BASE_RECORD).read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve(path: Path) -> Path:
    """A checkpoint file, or the latest checkpoint in a directory (a project's checkpoints/ or its root)."""
    path = Path(path)
    if path.is_dir():
        for folder in (path, path / "checkpoints"):
            if (found := latest(folder)) is not None:
                return found.path
        raise PipelineError(f"no checkpoint found in {path}: pass a step_*.ckpt file or a folder holding some")
    return path


def check_compatible(payload: dict, source: Path, base_identity: str, version: str, lora_config: dict | None = None) -> None:
    """A clear error, not a silent mismatch, when a checkpoint was made for another base, version or rank."""
    base = payload["base_model"]
    if base["version"] != version:
        raise PipelineError(f"{source} was trained on model version {base['version']}, not {version}: pass --model-version {base['version']}")
    if base["identity"] != base_identity:
        raise PipelineError(
            f"{source} was trained on another base model (identity {base['identity']}, this one is {base_identity}): "
            "point --pretrained-ckpt-path at the base it was trained on"
        )
    if lora_config is None:
        return
    theirs = payload["lora_config"]
    if theirs.get("targets", "all") != lora_config.get("targets", "all"):
        raise PipelineError(
            f"{source} has adapters on the {theirs.get('targets', 'all')} transformer(s), this run puts them on "
            f"{lora_config.get('targets', 'all')}: pass --lora-targets {theirs.get('targets', 'all')}"
        )
    if (theirs["r"], theirs["alpha"]) != (lora_config["r"], lora_config["alpha"]):
        raise PipelineError(
            f"{source} has LoRA rank {theirs['r']} / alpha {theirs['alpha']}, this run uses rank {lora_config['r']} / alpha "
            f"{lora_config['alpha']}: pass --lora-config r_{theirs['r']}_alpha_{theirs['alpha']}"
        )


def check_same_run(recorded: dict | None, source: Path, run: dict) -> None:
    """Resuming continues one run exactly, so everything that decides its result must be what `source` was
    made with: one error naming each difference and the flag that restarts cleanly."""
    restart = "or pass --force-stage train to start over (the old checkpoints are moved aside)"
    if recorded is None:
        raise PipelineError(f"{source} was made by an older fs-pipeline that did not record its settings: it can't be resumed exactly; {restart}")
    check_compatible({"base_model": {"version": recorded["version"], "identity": recorded["base"]}}, source, run["base"], run["version"])
    if recorded["data"] != run["data"]:
        raise PipelineError(
            f"{source} was trained on other packed data (the dataset, its transcripts or the split changed): "
            f"train on the data it was made with, {restart}"
        )
    differences = [
        f"--{name.replace('_', '-')} {run['settings'].get(name)} (checkpoint: {value})"
        for name, value in sorted(recorded["settings"].items())
        if run["settings"].get(name) != value
    ]
    if differences:
        raise PipelineError(f"{source} was trained with other settings: {', '.join(differences)}: pass the checkpoint's values, {restart}")


def check_same_processes(recorded: int, source: Path, processes: int) -> None:
    """A run continues on as many processes as it was made with: each step's examples are batch size x processes x
    accumulation, so another number would train on other batches from then on."""
    if recorded == processes:
        return
    how = f"torchrun --nproc-per-node {recorded}" if recorded > 1 else "one process (without torchrun)"
    raise PipelineError(
        f"{source} was trained by {recorded} process(es) and this run has {processes}: each step's batch depends on it; resume it "
        f"with {how}, or pass --force-stage train to start over (the old checkpoints are moved aside)"
    )
