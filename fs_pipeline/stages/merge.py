"""Merge: fold a checkpoint's LoRA adapters into the base weights -> a self-contained model directory.

Reads   the base model dir, results/<project>/checkpoints/step_*.ckpt (default: the best by best_by, one of
        checkpoints.BEST_BY: validation loss, or with test clips WER, voice similarity or both combined; else the latest)
Writes  checkpoints/<project>-merged/  the base's layout with the merged LLM weights: for s1-mini model.pth,
        config.json, tokenizer.tiktoken, special_tokens.json; for s2-pro safetensors shards + their index
        (model.safetensors.index.json, the release's key names), config.json, tokenizer.json; then
        codec.pth (+ codec_config.yaml when the base has one), manifest.json
        checkpoints/<project>-lora/    adapter.safetensors + adapter_config.json (the adapters alone)
Skips   when <project>-merged/manifest.json records the same base model, checkpoint and scale

The merge check runs a fixed probe through base + scale·LoRA and through the merged weights, both in fp32
before any cast to the storage dtype, and fails the merge (nothing installed) beyond TOLERANCE. The
storage dtype's rounding (bf16 for real releases) is measured apart, as the merged model as stored against
the fp32 merged weights, and recorded in the manifest: it is information, not a failure.

<project>-merged is a plain directory, so a copy or an archive of it is the whole model. A new version is
built and checked in full in a hidden staging directory beside it; then the old version is renamed aside
(.<project>-merged.old), the new one renamed into place, and the old one deleted. A run killed at any
moment leaves the old model or the new one: killed between the two renames, it leaves the old one aside,
and the next merge puts it back before anything reads <project>-merged/manifest.json. The next merge also
deletes what a killed run left beside it (a staging directory, an old version not yet deleted).
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from loguru import logger

from fs_pipeline import PipelineError, checkpoints, s2pro
from fs_pipeline.device import DeviceChoice
from fs_pipeline.fileio import atomic_path, file_hash, write_json_atomic
from fs_pipeline.lora import LoraSettings, adapted_layers, add_lora, load_lora_state, lora_state_dict, set_adapter_scale
from fs_pipeline.modeling import fast_forward, is_semantic, slow_forward
from fs_pipeline.models import (
    CODEC_CONFIG_FILE, MODEL_CARD, ModelDir, build_llm, load_llm, load_llm_weights, model_identity, open_model_dir, read_weights,
)
from fs_pipeline.project import Project
from fs_pipeline.prompt import training_example
from fs_pipeline.stages.pack import TRAIN_FILE

MODELS_ROOT = Path("checkpoints")
# Merge-check tolerance: max |logit difference| between base + scale·LoRA and the fp32 merged weights, relative to
# the largest logit (at least 1). Merging only reorders fp32 rounding: 4e-7 of the largest logit on the tiny model,
# 2e-6 on a release-sized one (random weights and adapters), so 10x headroom. Leaving out one layer's adapter
# moves the logits by 5e-3 of it or more on the tiny model after 8 steps (tests/test_merge_and_synthesis.py
# checks 100x), by 3e-3 for the weakest sampled layer of the release-sized one. The cast to bf16 moves them by
# 1e-3 to 1e-2 of it, as much as one layer's adapter: the reason the check runs before the cast.
TOLERANCE = 2e-5
# --merge-scale is above 0 (0 is the base itself; below, the voice subtracted) and at most 2: above 1 extrapolates
# past anything training evaluated, which may strengthen a weak voice a little; 2 rules out typos such as 5 for .5.
MAX_SCALE = 2.0
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class MergeSettings:
    checkpoint: Path | None = None  # default: best by validation loss, else latest
    checkpoint_step: int | None = None
    output_root: Path = MODELS_ROOT
    best_by: str = "val_loss"  # or, when training scored test clips, "wer", "similarity" or "combined" (checkpoints.BEST_BY)
    scale: float = 1.0  # the merge is W + scale·(B·A·alpha/r): below 1 a partial merge


@dataclass(frozen=True)
class MergeResult:
    merged_dir: Path
    adapter_dir: Path
    checkpoint: Path
    skipped: bool
    max_logit_diff: float


def merged_path(project: Project, root: Path = MODELS_ROOT) -> Path:
    return Path(root) / f"{project.name}-merged"


def check(settings: MergeSettings) -> None:
    if settings.checkpoint and settings.checkpoint_step is not None:
        raise PipelineError("--checkpoint and --checkpoint-step both given: pass one of them")
    if settings.checkpoint and not Path(settings.checkpoint).exists():
        raise PipelineError(f"--checkpoint: checkpoint not found: {settings.checkpoint}: list them with --list-checkpoints")
    if settings.checkpoint_step is not None and settings.checkpoint_step < 0:
        raise PipelineError(f"--checkpoint-step must be 0 or more (got {settings.checkpoint_step})")
    if settings.best_by not in checkpoints.BEST_BY:
        raise PipelineError(f"unknown --best-by '{settings.best_by}': use one of {', '.join(checkpoints.BEST_BY)}")
    if not 0 < settings.scale <= MAX_SCALE:
        raise PipelineError(f"--merge-scale must be above 0 and at most {MAX_SCALE:g} (got {settings.scale}): "
                            "1 merges the adapters as trained, 0.5 half-way between the base and them")


def choose_checkpoint(project: Project, settings: MergeSettings) -> Path:
    folder = project.dir / "checkpoints"
    check(settings)
    if settings.checkpoint:
        return checkpoints.resolve(settings.checkpoint)
    if settings.checkpoint_step is not None:
        path = folder / checkpoints.checkpoint_name(settings.checkpoint_step)
        if not path.is_file():
            steps = ", ".join(str(i.step) for i in checkpoints.list_checkpoints(folder)) or "none"
            raise PipelineError(f"no checkpoint for step {settings.checkpoint_step} in {folder} (steps there: {steps})")
        return path
    chosen = checkpoints.best(folder, settings.best_by) or checkpoints.latest(folder)
    if chosen is None:
        raise PipelineError(f"no checkpoint in {folder}: train first with --train")
    return chosen.path


def run(settings: MergeSettings, model_dir: ModelDir, choice: DeviceChoice, project: Project) -> MergeResult:
    checkpoint = choose_checkpoint(project, settings)
    payload = checkpoints.load(checkpoint)
    identity = model_identity(model_dir)
    lora = LoraSettings(**payload["lora_config"])
    checkpoints.check_compatible(payload, checkpoint, identity, model_dir.version.name, lora.as_dict())

    final = merged_path(project, settings.output_root)
    adapter_dir = Path(settings.output_root) / f"{project.name}-lora"
    inputs = {"base_identity": identity, "checkpoint": checkpoint.name, "checkpoint_sha256": file_hash(checkpoint),
              "scale": settings.scale}
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    existing = final / "manifest.json"
    # A link is the layout before issue 15 (a link to a hidden version beside it): rebuilt once as a directory.
    if not final.is_symlink() and existing.is_file() and json.loads(existing.read_text())["inputs"] == inputs and (adapter_dir / "adapter_config.json").is_file():
        return MergeResult(final, adapter_dir, checkpoint, True, json.loads(existing.read_text())["merge_check"]["max_logit_diff"])

    adapted = build_llm(model_dir)
    load_llm_weights(adapted, model_dir)
    adapted.float()  # the merge and its check compute in fp32 (an s2-pro base loads in its stored bf16)
    add_lora(adapted, lora)
    load_lora_state(adapted, payload["lora"], checkpoint)
    set_adapter_scale(adapted, settings.scale)
    adapted.eval()

    merged_state = merged_weights(adapted)
    storage_dtype = _stored_dtype(model_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; it becomes the model directory as it is
    try:
        _write_model_dir(staging, model_dir, {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in merged_state.items()})
        check = merge_check(adapted, merged_state, open_model_dir(staging, model_dir.version.name))
        if not check["passed"]:
            raise PipelineError(
                f"merge check failed: fp32 merged logits differ from base+{settings.scale:g}·LoRA by {check['max_logit_diff']:.3g} "
                f"(tolerance {check['tolerance']:.3g}); the merged model was not installed. Report this with {checkpoint}"
            )
        manifest = _manifest(model_dir, identity, checkpoint, payload, lora, settings.scale, project, inputs, check)
        write_json_atomic(staging / "manifest.json", manifest)
        _export_adapter(adapter_dir, adapted, lora, identity, model_dir)
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(final, adapter_dir, checkpoint, False, check["max_logit_diff"])


def _stored_dtype(model_dir: ModelDir) -> torch.dtype:
    """The dtype the release stores its weights in (merged weights are stored the same way)."""
    return next(v.dtype for v in read_weights(model_dir).values() if v.is_floating_point())


@torch.no_grad()
def merged_weights(model) -> dict[str, torch.Tensor]:
    """The model's state dict in fp32 with every adapter folded into its layer's weight (by the layer's
    `scaling`, as its forward applies it), adapters dropped."""
    state = {k: v.float().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    prefixes = {id(module): name for name, module in model.named_modules()}
    for parent, attribute in adapted_layers(model):
        layer = getattr(parent, attribute)
        key = f"{prefixes[id(parent)]}.{attribute}.weight".lstrip(".")
        delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
        state[key] += delta.T if isinstance(layer, torch.nn.Embedding) else delta
    return state


def _write_model_dir(folder: Path, model_dir: ModelDir, state: dict) -> None:
    """The base's files in `folder` (a staging directory, renamed into place whole), with `state` as the LLM weights
    in the base's layout: sharded safetensors with their index for a sharded base, else model.pth."""
    if model_dir.sharded:
        s2pro.write_sharded(folder, state)
    else:
        torch.save(state, folder / "model.pth")
    names = ["config.json", *model_dir.version.tokenizer_files, "codec.pth"]
    # the codec's own config and the model card (which names the weights' licence) travel with the model
    names += [name for name in (CODEC_CONFIG_FILE, MODEL_CARD) if (model_dir.path / name).is_file()]
    for name in names:
        shutil.copy2(model_dir.path / name, folder / name)


def probe_turns(model) -> list[tuple[str, torch.Tensor]]:
    """The probe utterance: the probe sentence followed by seeded random frames."""
    generator = torch.Generator().manual_seed(0)
    return [(PROBE_TEXT, torch.randint(0, model.config.codebook_size, (model.config.num_codebooks, 16), generator=generator))]


def probe_batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed input: the probe utterance as a training example."""
    inputs, labels = training_example(model.tokenizer, probe_turns(model), model.config.num_codebooks)
    return inputs[None], labels[None]


@torch.no_grad()
def probe_logits(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token logits and codebook logits of the probe, flattened into one vector."""
    token_logits, hidden = slow_forward(model, inputs)
    frames = is_semantic(model.tokenizer, labels[:, 0])
    codebook_logits = fast_forward(model, hidden[frames], labels[:, 1:].transpose(1, 2)[frames])
    return torch.cat([token_logits.flatten(), codebook_logits.flatten()]).float()


def merge_check(adapted, merged_state: dict[str, torch.Tensor], stored_dir: ModelDir) -> dict:
    """On the probe: base + scale·LoRA (`adapted`, fp32) against a model holding the fp32 merged weights, which
    passes within TOLERANCE; and the merged model as stored in `stored_dir` against those fp32 weights, which
    is the storage dtype's rounding alone."""
    inputs, labels = probe_batch(adapted)
    reference = probe_logits(adapted, inputs, labels)
    merged = build_llm(stored_dir)
    merged.load_state_dict(merged_state, assign=True)
    merged_logits = probe_logits(merged.eval(), inputs, labels)
    stored = load_llm(stored_dir, DeviceChoice(torch.device("cpu"), torch.float32, "merge check"))
    diff = (merged_logits - reference).abs().max().item()
    tolerance = TOLERANCE * max(1.0, reference.abs().max().item())
    return {
        "max_logit_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance,
        "storage_dtype": str(_stored_dtype(stored_dir)).removeprefix("torch."),
        "storage_cast_max_logit_diff": (probe_logits(stored, inputs, labels) - merged_logits).abs().max().item(),
    }


def _manifest(model_dir, identity, checkpoint, payload, lora, scale, project, inputs, check) -> dict:
    train_data = project.data_dir / TRAIN_FILE
    return {
        "inputs": inputs,
        "base_model": {"path": str(model_dir.path), "identity": identity, "version": model_dir.version.name,
                       "license": model_dir.license},
        "checkpoint": {"path": str(checkpoint), "step": payload["step"], **payload.get("metrics", {})},
        "lora_config": lora.as_dict(),
        "scale": scale,
        "data_sha256": file_hash(train_data) if train_data.is_file() else None,
        "merge_check": check,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _export_adapter(folder: Path, model, lora: LoraSettings, identity: str, model_dir: ModelDir) -> None:
    """The adapters alone, loadable on top of the base (cli_tts.py --lora DIR)."""
    from safetensors.torch import save_file

    state = {k: v.float().contiguous() for k, v in lora_state_dict(model).items()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "adapter.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(
        folder / "adapter_config.json",
        {"lora_config": lora.as_dict(), "base_model": {"identity": identity, "version": model_dir.version.name,
                                                       "license": model_dir.license}},
    )


def _swap_in(staging: Path, final: Path) -> None:
    """Replace `final` with `staging`: the old version aside, the new one in, the old one deleted. rename(2)
    can't replace a non-empty directory, hence two renames; a kill between them is undone by _recover."""
    aside = _aside(final)
    if os.path.lexists(final):
        os.replace(final, aside)
    os.replace(staging, final)
    for leftover in _leftovers(final):  # the old version, and the old layout's hidden version
        _remove(leftover, final)
    logger.info(f"merged model installed at {final}")


def _recover(final: Path) -> None:
    """Undo what a killed merge left beside `final`. Killed between the two renames of _swap_in, the old
    version is whole but aside: put it back (the new one was never installed, so this merge redoes it)."""
    aside = _aside(final)
    if os.path.lexists(aside) and not os.path.lexists(final):
        os.replace(aside, final)
    # A link of the old layout serves the hidden version it points at until this merge replaces it.
    in_use = final.resolve()
    for leftover in _leftovers(final):
        if leftover.resolve() != in_use:
            _remove(leftover, final)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _leftovers(final: Path) -> list[Path]:
    """The hidden entries merges of `final` make beside it. Another project's can share the prefix (project
    "P-merged.x" has ".P-merged.x-merged.old"), but never with a dot-free rest."""
    prefix = f".{final.name}."
    return [p for p in final.parent.iterdir() if p.name.startswith(prefix) and "." not in p.name[len(prefix):]]


def _remove(path: Path, final: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as e:
        raise PipelineError(f"cannot delete {path}, left beside {final} by a merge ({e.strerror}): delete it yourself, then rerun") from e


def load_adapter(model, source: Path, base_identity: str) -> None:
    """Add adapters to `model` from an adapter dir (adapter.safetensors + adapter_config.json) or a
    checkpoint, after checking they were trained on this base model."""
    from safetensors.torch import load_file

    source = Path(source)
    if source.is_dir() and (source / "adapter_config.json").is_file():
        config = json.loads((source / "adapter_config.json").read_text())
        lora, trained_on = LoraSettings(**config["lora_config"]), config["base_model"]["identity"]
        state = load_file(str(source / "adapter.safetensors"))
    else:
        payload = checkpoints.load(checkpoints.resolve(source))
        lora, trained_on, state = LoraSettings(**payload["lora_config"]), payload["base_model"]["identity"], payload["lora"]
    if trained_on != base_identity:
        raise PipelineError(f"{source} was trained on another base model: pass the base it was trained on as --model-path")
    add_lora(model, lora)
    load_lora_state(model, state, source)
