"""Train: LoRA fine-tuning of the base LLM on the packed data.

Reads   results/<project>/data/train.protos, val.protos (from pack), the base model
Writes  results/<project>/checkpoints/step_*.ckpt (every --checkpoint-every steps, on interrupt, at the end),
        results/<project>/logs/metrics.jsonl and TensorBoard events
Resumes the latest checkpoint when there is one: a run is continued, never overwritten by another. The
        checkpoint must have been made with the same settings (RUN_SETTINGS), base model and packed data;
        otherwise it stops before any work, naming each difference. --max-steps is the total, so it may
        grow, and resuming at that step trains no more.

The story: load the base, add adapters, build the examples, set up the optimizer; restore a checkpoint
when resuming; then step until max_steps, validating and checkpointing on the way. Examples are drawn in
a fixed order (a seeded shuffle per epoch), and a checkpoint records how many were drawn, so a resumed
run sees exactly the batches an uninterrupted run would.

Several GPUs (torchrun, see fs_pipeline/distributed.py) run this same loop, one process each: a step takes
the next `batch_size x processes x accumulation` examples of the same order (the effective batch), each
process its own `batch_size` of them per micro-batch, and DistributedDataParallel sums the adapters'
gradients, so 2 processes of batch 2 compute the step of 1 process of batch 4. One process is the
world-size-1 case. Rank 0 alone writes checkpoints, metrics and test clips; a checkpoint records the
number of processes, and a resume with another number is refused (its steps would see other batches).
"""

import functools
import hashlib
import json
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from fs_pipeline import PipelineError, checkpoints, distributed
from fs_pipeline.device import DeviceChoice
from fs_pipeline.distributed import SINGLE, World
from fs_pipeline.lora import LORA_TARGETS, LoraSettings, add_lora, load_lora_state, lora_state_dict, prepare_for_training
from fs_pipeline.modeling import IGNORE, forward, frame_index, target_counts, use_grouped_attention
from fs_pipeline.fileio import file_hash, write_text_atomic
from fs_pipeline.models import ModelDir, build_llm, load_llm_weights, model_identity
from fs_pipeline.packed import read_protos
from fs_pipeline.project import Project
from fs_pipeline.prompt import sequence_length, training_example
from fs_pipeline.stages.pack import TRAIN_FILE, VAL_FILE


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    gradient_accumulation_steps: int = 1
    lora_config: str = "r_8_alpha_16"
    lora_targets: str = "all"  # which transformer gets adapters: all, slow or fast
    warmup_steps: int = 10
    lr_schedule: str = "constant"  # or "cosine"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (fuses the many small LoRA and norm kernels)
    max_length: int | None = None  # default: tokens_per_row
    pack_utterances: bool = False  # rows of several utterances of one speaker, up to max_length tokens (packs_by_default)
    checkpoint_every: int = 100
    val_every: int | None = None  # default: checkpoint_every
    keep_checkpoints: int = 5
    seed: int = 0
    resume_from: Path | None = None  # a checkpoint to continue exactly (default: the latest of the project)
    resume_latest: bool = False  # the user asked to continue: an error when there is nothing to continue
    warm_start_from: Path | None = None  # a checkpoint whose adapters start a fresh run
    test_clips: bool = False  # speak TEST_SENTENCES with the base and at each checkpoint; score WER and voice similarity
    test_clips_whisper_model: str = "base"
    test_clips_max_frames: int = 400  # each test clip's length limit in frames (about 19 s at S1-mini's 21.5 per second)


# Tokens per packed row unless --max-length says otherwise: the rows of the measured fast path (benchmarks/RESULTS.md).
PACKED_ROW_TOKENS = 4096

# What decides which examples a run sees and how its weights move: a resumed run must have the same values.
# The rest may change between a run and its resume (max_steps is the total to train to).
RUN_SETTINGS = ("batch_size", "learning_rate", "gradient_accumulation_steps", "lora_config", "lora_targets", "warmup_steps", "lr_schedule",
                "max_grad_norm", "max_length", "pack_utterances", "seed")


@dataclass(frozen=True)
class TrainResult:
    step: int
    last_checkpoint: Path | None
    interrupted: str | None  # the signal's name when stopped by one
    train_loss: float | None
    val_loss: float | None
    effective_batch: int = 0  # examples per optimizer step: batch_size x processes x accumulation
    processes: int = 1


def run_identity(settings: TrainSettings, model_dir: ModelDir, project: Project) -> dict:
    """What made a run: its RUN_SETTINGS (max_length as tokens_per_row resolves it), the base model and the packed
    data, by content. Checkpoints record it, and a resume must match it. `max_seq_len` reads the max_length of None
    that older checkpoints recorded (it meant the model's max)."""
    data = hashlib.sha256()
    for name in (TRAIN_FILE, VAL_FILE):
        path = project.data_dir / name
        data.update(file_hash(path).encode() if path.is_file() else b"-")
    resolved = {name: getattr(settings, name) for name in RUN_SETTINGS} | {"max_length": tokens_per_row(settings, model_dir)}
    return {"settings": resolved, "base": model_identity(model_dir), "version": model_dir.version.name, "data": data.hexdigest()[:16],
            "max_seq_len": model_dir.config["max_seq_len"]}


def check(settings: TrainSettings, model_dir: ModelDir | None = None) -> None:
    """Every training setting, checked before any stage does work."""
    if settings.resume_from and settings.warm_start_from:
        raise PipelineError("resuming and warm-starting at once: pass either a resume flag or --checkpoint-path, not both")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "test_clips_max_frames"):
        if getattr(settings, name) < 1:
            raise PipelineError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(settings, name)})")
    for name in ("warmup_steps", "keep_checkpoints"):
        if getattr(settings, name) < 0:
            raise PipelineError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(settings, name)})")
    if settings.val_every is not None and settings.val_every < 1:
        raise PipelineError(f"--val-every must be at least 1 (got {settings.val_every})")
    if not settings.learning_rate > 0:
        raise PipelineError(f"--learning-rate must be positive (got {settings.learning_rate})")
    if settings.lr_schedule not in ("constant", "cosine"):
        raise PipelineError(f"unknown --lr-schedule '{settings.lr_schedule}': use constant or cosine")
    LoraSettings.from_name(settings.lora_config)
    if settings.lora_targets not in LORA_TARGETS:
        raise PipelineError(f"unknown --lora-targets '{settings.lora_targets}': use one of {', '.join(LORA_TARGETS)}")
    if settings.max_length is not None and settings.max_length < 1:
        raise PipelineError(f"--max-length must be at least 1 (got {settings.max_length})")
    if model_dir is not None and settings.max_length and settings.max_length > model_dir.config["max_seq_len"]:
        raise PipelineError(f"--max-length {settings.max_length} exceeds the model's max_seq_len {model_dir.config['max_seq_len']}: pass at most that")
    for path, flag in ((settings.resume_from, "--resume-from-checkpoint"), (settings.warm_start_from, "--checkpoint-path")):
        if path is not None and not Path(path).is_file():
            raise PipelineError(f"{flag}: checkpoint not found: {path}: list them with --list-checkpoints")


def starting_point(settings: TrainSettings, ckpt_dir: Path, identity: dict | None = None, processes: int = 1) -> Path | None:
    """The checkpoint a run continues: the one asked for, else the latest, checked to come from the same
    run (`identity`, where given) and, while it has steps to go, from as many `processes`. Never a fresh
    run over the checkpoints of another (that would mix two runs in one folder)."""
    latest = checkpoints.latest(ckpt_dir)
    if settings.warm_start_from:
        if latest is not None:
            raise PipelineError(
                f"{ckpt_dir} already holds checkpoints (up to step {latest.step}): a warm start there would mix two runs; "
                "pass --force-stage train to move them aside first"
            )
        return None
    if settings.resume_latest and latest is None and settings.resume_from is None:
        raise PipelineError(f"--resume-latest: no checkpoint in {ckpt_dir} yet: run without it to start training")
    resume = settings.resume_from or (latest.path if latest else None)
    if resume is not None and identity is not None:
        found = checkpoints.info(resume)
        recorded = found.run
        if recorded and "max_length" in recorded["settings"] and recorded["settings"]["max_length"] is None:
            recorded = {**recorded, "settings": recorded["settings"] | {"max_length": identity["max_seq_len"]}}
        checkpoints.check_same_run(recorded, resume, identity)
        if found.step < settings.max_steps:
            checkpoints.check_same_processes(found.processes, resume, processes)
    return resume


def run(settings: TrainSettings, model_dir: ModelDir, choice: DeviceChoice, project: Project, world: World = SINGLE) -> TrainResult:
    """Train on this process's `choice`; with several processes (`world`), every one of them calls this."""
    check(settings, model_dir)
    lora = lora_settings(settings)
    ckpt_dir = project.dir / "checkpoints"
    max_length = tokens_per_row(settings, model_dir)
    identity = run_identity(settings, model_dir, project)
    effective_batch = settings.batch_size * world.size * settings.gradient_accumulation_steps

    resume = starting_point(settings, ckpt_dir, identity, world.size)
    if resume:
        payload = checkpoints.load(resume)
    elif settings.warm_start_from:
        payload = checkpoints.load(settings.warm_start_from)
        checkpoints.check_compatible(payload, settings.warm_start_from, identity["base"], model_dir.version.name, lora.as_dict())
    else:
        payload = None

    random.seed(settings.seed)
    torch.manual_seed(settings.seed)  # before the adapters are initialised: every process starts from the same ones
    model = prepare_model(model_dir, lora, choice, payload["lora"] if payload else None, resume or settings.warm_start_from)
    if settings.compile:
        compile_blocks(model)

    train_examples = _examples(project.data_dir / TRAIN_FILE, model, max_length, settings.pack_utterances, settings.seed)
    val_examples = _examples(project.data_dir / VAL_FILE, model, max_length, settings.pack_utterances, settings.seed)
    if not train_examples:
        raise PipelineError(f"{project.data_dir / TRAIN_FILE} holds no utterances: check the dataset and rerun --extract-tokens")
    sizes = _example_sizes(train_examples, model)
    estimate_memory(model, settings.batch_size, max(len(x[0][0]) for x in train_examples), lora, choice, world.size)
    if world.is_main:
        logger.info(f"effective batch: {settings.batch_size} per process x {world.size} process(es) x "
                    f"{settings.gradient_accumulation_steps} accumulation step(s) = {effective_batch} examples per step")

    scorer = _TestClips(settings, model_dir, choice, project.data_dir) if settings.test_clips and world.is_main else None
    # before a resume restores the random state, which scoring may draw from
    if scorer is not None and checkpoints.base_scores(ckpt_dir) is None:
        checkpoints.save_base_scores(ckpt_dir, scorer.score_base(model, ckpt_dir / "base_clips"))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    scaler = choice.grad_scaler()
    trainer = distributed.wrap(TrainingForward(model, settings.compile), world, choice.device)
    step, consumed = 0, 0
    if resume:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload.get("grad_scaler"):  # empty from a run without fp16; a fresh scaler then starts
            scaler.load_state_dict(payload["grad_scaler"])
        checkpoints.restore_rng(payload["rng"])
        step, consumed = payload["step"], payload["data"]["consumed"]
        logger.info(f"resuming from {resume} at step {step}")
    elif settings.warm_start_from:
        logger.info(f"warm start: adapters from {settings.warm_start_from}, fresh optimizer, step 0")

    def save(metrics: dict) -> Path:
        if scorer is not None:
            metrics |= scorer.score(model, ckpt_dir / f"{checkpoints.checkpoint_name(step).removesuffix('.ckpt')}_clips")
        path = checkpoints.save(
            ckpt_dir,
            {
                "step": step,
                "lora": lora_state_dict(model),
                "lora_config": lora.as_dict(),
                "base_model": {"identity": identity["base"], "version": model_dir.version.name},
                "run": identity,
                "processes": world.size,
                "effective_batch": effective_batch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "rng": checkpoints.rng_state(),
                "data": {"consumed": consumed},
                "metrics": metrics,
            },
        )
        checkpoints.prune(ckpt_dir, settings.keep_checkpoints)
        return path

    log = _MetricsLog(project.dir / "logs", step) if world.is_main else None
    stop = _StopSignal()
    val_every = settings.val_every or settings.checkpoint_every
    last_path, train_loss, val_loss, stopped_by = None, None, None, 0
    bar = tqdm(total=settings.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not world.is_main)

    def micro_batches(consumed: int) -> list[Batch]:
        # this process's micro-batches of the step's effective batch: the k-th takes the k-th run of
        # batch_size x processes examples, and in it the rank-th batch_size
        return [
            _batch(train_examples, consumed + (k * world.size + world.rank) * settings.batch_size, settings.batch_size,
                   settings.seed, model, choice.device)
            for k in range(settings.gradient_accumulation_steps)
        ]

    try:
        batches = micro_batches(consumed)
        while step < settings.max_steps and not stopped_by:
            started = time.perf_counter()
            positions, counts = _step_sizes(sizes, consumed, effective_batch, settings.seed)
            sums = accumulate_gradients(model, batches, choice, settings.gradient_checkpointing, scaler, world, trainer, counts)
            # the next step's batches are made and their copies queued while the GPU works on this step
            batches = micro_batches(consumed + effective_batch)
            scaler.unscale_(optimizer)  # clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed (the scaler waits for the GPU to know)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            *values, grad_norm = sums.read(grad_norm)  # a single process's one wait for the GPU in a bf16 or fp32 step
            totals = sums.totals(values)
            _check_finite(step + 1, totals["loss"], grad_norm, ckpt_dir, overflow_skips=scaler.is_enabled())
            step += 1
            consumed += effective_batch
            train_loss = totals["loss"]
            stopped_by = distributed.agree_on_signal(stop.number, world, choice.device)

            metrics = {
                "step": step, **totals, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                "tokens_per_second": positions / (time.perf_counter() - started),  # of all processes together
            }
            if choice.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(choice.device) / 1e9  # of this process's GPU
            at_checkpoint = step % settings.checkpoint_every == 0 or step == settings.max_steps or stopped_by
            if val_examples and (step % val_every == 0 or at_checkpoint):
                val_loss = evaluate(model, val_examples, settings.batch_size, choice, world)
                metrics["val_loss"] = val_loss
            if log is not None:
                log.write(metrics)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
            bar.update(1)
            if at_checkpoint and world.is_main:
                last_path = save({"train_loss": train_loss, "val_loss": metrics.get("val_loss")})
    except torch.OutOfMemoryError as e:
        raise PipelineError(
            f"out of GPU memory on {choice.device} at step {step + 1} with --batch-size {settings.batch_size} per GPU: lower "
            f"--batch-size and raise --gradient-accumulation-steps to keep the effective batch of {effective_batch}, or pass "
            "--gradient-checkpointing; rerun the same command to continue from the last checkpoint"
        ) from e
    except torch.distributed.DistError as e:
        last = checkpoints.latest(ckpt_dir)
        raise PipelineError(
            f"another training process stopped at step {step + 1} ({type(e).__name__}), so this one stopped too; rerun the same "
            f"command to continue from {last.path if last else 'the start'}"
        ) from e
    finally:
        bar.close()
        if log is not None:
            log.close()
        stop.restore()
    interrupted = signal.Signals(stopped_by).name if stopped_by else None
    return TrainResult(step, last_path, interrupted, train_loss, val_loss, effective_batch, world.size)


def _check_finite(step: int, loss: float, grad_norm: float, ckpt_dir: Path, overflow_skips: bool = False) -> None:
    """A non-finite loss or gradient stops training before the step is saved, so no checkpoint ever holds
    non-finite weights (the step's update was queued before its loss was known: the GPU never waits for that look).
    With `overflow_skips` (fp16's gradient scaler) a non-finite gradient is an overflow of the scaled loss: the
    scaler skipped that step and lowered its scale."""
    if math.isfinite(loss) and (math.isfinite(grad_norm) or overflow_skips):
        return
    last = checkpoints.latest(ckpt_dir)
    raise PipelineError(
        f"training stopped at step {step}: the loss is {loss} and the gradient norm {grad_norm}, not finite; nothing of this "
        f"step was saved and {last.path if last else 'no checkpoint'} is the last good one: lower --learning-rate and rerun"
    )


def prepare_model(model_dir: ModelDir, lora: LoraSettings, choice: DeviceChoice, lora_state=None, source=None):
    """The base LLM with adapters (fresh, or from `lora_state`), ready to train on the chosen device."""
    model = build_llm(model_dir)
    load_llm_weights(model, model_dir)
    add_lora(model, lora)
    use_grouped_attention(model)
    if lora_state is not None:
        load_lora_state(model, lora_state, source)
    prepare_for_training(model, choice.device, choice.dtype)
    return model.train()


def compile_blocks(model) -> None:
    """torch.compile every transformer block, fusing its many small norm, RoPE and LoRA kernels."""
    for block in [*model.layers, *model.fast_layers]:
        block.compile()


def _lr_lambda(settings: TrainSettings):
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.lr_schedule == "constant":
            return 1.0
        progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _examples(path: Path, model, max_length: int, pack: bool = False, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One example per utterance, or with `pack`, rows of several utterances of one speaker (a seeded
    shuffle of them, filled greedily up to max_length tokens); each truncated to max_length."""
    if not path.is_file():
        raise PipelineError(f"packed data not found: {path}: run --extract-tokens first")
    n = model.config.num_codebooks
    rows = []
    for record in read_protos(path):
        turns = [(s.texts[0], torch.tensor([list(v.values) for v in s.semantics])) for s in record.sentences]
        if not pack:
            rows += [[turn] for turn in turns]
            continue
        random.Random(f"{seed}:{record.name}").shuffle(turns)
        row, row_length = [], 0
        for text, codes in turns:
            length = sequence_length(model.tokenizer, text, codes.shape[1])
            if row and row_length + length > max_length:
                rows.append(row)
                row, row_length = [], 0
            row.append((text, codes))
            row_length += length
        rows += [row] if row else []
    examples = []
    for row in rows:
        inputs, labels = training_example(model.tokenizer, row, n)
        examples.append((inputs[:, :max_length], labels[:, :max_length]))
    return examples


@functools.lru_cache(maxsize=4)
def _order(count: int, epoch: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # on the device, like labels and frames
    labels: torch.Tensor
    frames: torch.Tensor  # frame_index of the labels
    positions: int  # real (unpadded) positions
    tokens: int  # targets of the token loss
    codebook_targets: int  # targets of the codebook loss


def _drawn(count: int, consumed: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the `batch_size` examples after `consumed` of the endless stream of seeded per-epoch shuffles
    of `count` examples."""
    return [_order(count, position // count, seed)[position % count] for position in range(consumed, consumed + batch_size)]


def _batch(examples, consumed: int, batch_size: int, seed: int, model, device) -> Batch:
    """The batch after `consumed` examples of the endless stream of seeded per-epoch shuffles."""
    return _pad([examples[i] for i in _drawn(len(examples), consumed, batch_size, seed)], model, device)


def _example_sizes(examples, model) -> list[tuple[int, int, int]]:
    """(positions, token targets, codebook targets) of each example, so that every process knows the counts of a
    whole effective batch, whose examples it mostly does not pad or run."""
    return [(x.shape[1], *(int(n) for n in target_counts(model, y[None]))) for x, y in examples]


def _step_sizes(sizes, consumed: int, count: int, seed: int) -> tuple[int, tuple[int, int]]:
    """(positions, (token targets, codebook targets)) of the `count` examples after `consumed`."""
    drawn = [sizes[i] for i in _drawn(len(sizes), consumed, count, seed)]
    return sum(d[0] for d in drawn), (sum(d[1] for d in drawn), sum(d[2] for d in drawn))


# On CUDA, batches are right-padded to a multiple of this many positions (never past the model's max): fewer shapes for
# the compiled blocks and for cuDNN's attention, which builds a plan for each new one. Real positions never see padding.
PAD_MULTIPLE = 64


def _pad(picks, model, device) -> Batch:
    """Examples right-padded to the longest (on CUDA rounded up to PAD_MULTIPLE), moved to `device`. Frame positions and target counts are found
    here on the CPU, so that the GPU never waits for the host; on CUDA the copies are queued (non_blocking), so that the
    host does not wait for the GPU either: a plain copy to the GPU waits for all the work queued before it, a queued
    one from this pageable memory returned in 0.3-0.4 ms behind 200 ms of queued work, pinning it first took up to 3 ms
    (benchmarks/copy_wait.py, H200)."""
    longest = max(x.shape[1] for x, _ in picks)
    cuda = torch.device(device).type == "cuda"
    multiple = PAD_MULTIPLE if cuda else 1
    length = min(-(-longest // multiple) * multiple, model.config.max_seq_len)
    rows = picks[0][0].shape[0]
    inputs = torch.zeros(len(picks), rows, length, dtype=torch.long)
    labels = torch.full((len(picks), rows, length), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(picks):
        inputs[i, :, : x.shape[1]] = x
        labels[i, :, : y.shape[1]] = y
    tokens, codebook_targets = target_counts(model, labels)
    # queued on CUDA only: elsewhere (MPS) a queued copy from memory freed right after is not safe
    inputs, labels, frames = (t.to(device, non_blocking=cuda) for t in (inputs, labels, frame_index(model, labels)))
    return Batch(inputs, labels, frames, sum(x.shape[1] for x, _ in picks), int(tokens), int(codebook_targets))


class TrainingForward(torch.nn.Module):
    """modeling.forward as a module: DistributedDataParallel needs the forward to go through a module's call
    to know which backward to all-reduce."""

    def __init__(self, model, compiled: bool = False):
        super().__init__()
        self.model = model
        self.compiled = compiled  # the loss arithmetic compiled, as the blocks are (compile_blocks)

    def forward(self, inputs, labels, frames, gradient_checkpointing: bool = False):
        return forward(self.model, inputs, labels, frames, gradient_checkpointing, compiled_loss=self.compiled)


@dataclass(frozen=True)
class StepSums:
    """A step's token loss, codebook loss and top-5 hits summed over the effective batch, still on the device, and
    its token and codebook target counts: reading the sums waits for the GPU, so the caller chooses when."""
    sums: torch.Tensor
    tokens: int
    targets: int

    def read(self, *more: torch.Tensor) -> list[float]:
        """The three sums and then `more` (0-d tensors), in one wait for the GPU."""
        return torch.cat([self.sums, *(value.reshape(1).float() for value in more)]).tolist()

    def totals(self, values: list[float] | None = None) -> dict[str, float]:
        """The step's losses and top-5 accuracy, from `values` (read()'s first three) or by reading them."""
        token_sum, codebook_sum, hits = values or self.read()
        return {"loss": token_sum / self.tokens + codebook_sum / self.targets, "token_loss": token_sum / self.tokens,
                "codebook_loss": codebook_sum / self.targets, "top5_accuracy": hits / self.tokens}


def accumulate_gradients(model, batches: list[Batch], choice: DeviceChoice, gradient_checkpointing: bool = False,
                         scaler: torch.amp.GradScaler | None = None, world: World = SINGLE, trainer: torch.nn.Module | None = None,
                         counts: tuple[int, int] | None = None) -> StepSums:
    """Backward over this process's micro-batches of one optimizer step, token-weighted: each loss is the sum
    of its per-target losses over the whole effective batch divided by the effective batch's number of
    targets (`counts`: token and codebook targets of all processes' micro-batches; by default, those of
    `batches`), so 4 micro-batches of 1 give the gradients of one batch of 4, and so do 2 processes with 2
    micro-batches of 1 each. `trainer` runs the forward: distributed.wrap(TrainingForward(model)) on several
    processes. Returns the sums of the step's losses and top-5 hits over the effective batch, without waiting for
    the GPU to finish them."""
    tokens, targets = counts or (sum(b.tokens for b in batches), sum(b.codebook_targets for b in batches))
    tokens, targets = max(1, tokens), max(1, targets)
    trainer = trainer or TrainingForward(model)
    sums = torch.zeros(3, device=choice.device)
    for index, batch in enumerate(batches):
        # DDP all-reduces the gradients once, in the backward of the step's last micro-batch
        with distributed.no_sync(trainer) if index < len(batches) - 1 else nullcontext():
            with choice.autocast():
                result = trainer(batch.inputs, batch.labels, batch.frames, gradient_checkpointing)
            # DDP averages the processes' gradients; times their number, that is their sum: the effective batch's
            loss = (result.token_loss_sum / tokens + result.codebook_loss_sum / targets) * world.size
            (scaler.scale(loss) if scaler else loss).backward()
        hits = result.top5_accuracy * result.tokens
        sums += torch.stack([result.token_loss_sum.detach(), result.codebook_loss_sum.detach(), hits.detach()]).float()
    return StepSums(distributed.all_sum(sums, world), tokens, targets)


@torch.no_grad()
def evaluate(model, examples, batch_size: int, choice: DeviceChoice, world: World = SINGLE) -> float:
    """Loss over the held-out examples, token-weighted as in training, so it does not depend on the batch size
    or on the number of processes, which each take every world.size-th example."""
    was_training = model.training
    model.eval()
    share = examples[world.rank :: world.size]
    sums = torch.zeros(4, device=choice.device)  # token and codebook loss sums, their target counts
    for start in range(0, len(share), batch_size):
        batch = _pad(share[start : start + batch_size], model, choice.device)
        with choice.autocast():
            result = forward(model, batch.inputs, batch.labels, batch.frames)
        sums += torch.stack([result.token_loss_sum, result.codebook_loss_sum, result.tokens, result.codebook_targets]).float()
    model.train(was_training)
    token_sum, codebook_sum, tokens, targets = distributed.all_sum(sums, world).tolist()
    return token_sum / max(1, tokens) + codebook_sum / max(1, targets)


def lora_settings(settings: TrainSettings) -> LoraSettings:
    return replace(LoraSettings.from_name(settings.lora_config), targets=settings.lora_targets)


def tokens_per_row(settings: TrainSettings, model_dir: ModelDir) -> int:
    """Tokens per training row: --max-length, else PACKED_ROW_TOKENS for packed rows, else the model's max."""
    if settings.max_length:
        return settings.max_length
    return min(PACKED_ROW_TOKENS, model_dir.config["max_seq_len"]) if settings.pack_utterances else model_dir.config["max_seq_len"]


def packs_by_default(settings: TrainSettings, model_dir: ModelDir, choice: DeviceChoice) -> bool:
    """Whether training packs utterances unless told otherwise: where it compiles on a CUDA GPU, when batch_size packed
    rows fit in three quarters of the GPU's memory by estimate_memory's arithmetic (reckoned on the model built
    without its weights; the estimate came 12% under the peak measured at S1-mini size, benchmarks/RESULTS.md)."""
    if not (settings.compile and choice.type == "cuda"):
        return False
    model = model_for_estimate(model_dir, lora_settings(settings), choice.dtype)
    fixed, per_row = _memory_bytes(model, tokens_per_row(replace(settings, pack_utterances=True), model_dir), choice)
    return fixed + settings.batch_size * per_row <= 0.75 * _device_memory(choice)


def model_for_estimate(model_dir: ModelDir, lora: LoraSettings, dtype: torch.dtype):
    """The base LLM with adapters in the dtypes training holds them in (prepare_model's), but without storage (meta):
    what estimate_memory counts, built in seconds and holding no memory."""
    with torch.device("meta"):
        model = build_llm(model_dir)
        add_lora(model, lora)
    prepare_for_training(model, torch.device("meta"), dtype)
    return model


def _memory_bytes(model, length: int, choice: DeviceChoice) -> tuple[int, int]:
    """(weights and optimizer state, each row of `length` tokens) of a rough peak-memory estimate for one GPU."""
    config = model.config
    weight_bytes = sum(p.numel() * (4 if p.requires_grad else p.element_size()) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = trainable * 4 * 3  # gradients and two Adam moments, fp32
    act_bytes_per_token = (config.n_layer + config.n_fast_layer * config.num_codebooks) * config.dim * 16 * (2 if choice.dtype != torch.float32 else 4) // 2
    logits_bytes_per_token = config.vocab_size * 4 * 2
    return weight_bytes + optimizer_bytes, length * (act_bytes_per_token + logits_bytes_per_token)


def estimate_memory(model, batch_size: int, length: int, lora: LoraSettings, choice: DeviceChoice, processes: int = 1) -> float:
    """A rough peak-memory estimate in GB for one GPU (each of `processes` holds the whole model and its own
    batch_size); warns with a batch size per GPU that fits when the device has less."""
    fixed, per_row = _memory_bytes(model, length, choice)
    total = fixed + batch_size * per_row
    available = _device_memory(choice)
    if available and total > 0.9 * available:
        fits = max(1, int((0.9 * available - fixed) // per_row))
        more_gpus = " or more GPUs" if processes > 1 else ""
        logger.warning(
            f"estimated peak memory per GPU {total / 1e9:.1f} GB exceeds the {available / 1e9:.1f} GB of {choice.device}: "
            f"try --batch-size {fits} (per GPU; with --gradient-accumulation-steps{more_gpus} to keep the effective batch) "
            "or --gradient-checkpointing"
        )
    return total / 1e9


def _device_memory(choice: DeviceChoice) -> int | None:
    if choice.type == "cuda":
        return torch.cuda.get_device_properties(choice.device).total_memory
    return None


TEST_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get this message.",
    "It is going to rain in the afternoon.",
)


class _TestClips:
    """Speaks TEST_SENTENCES with the model being trained, keeps the clips, and scores them: their word error
    rate (Whisper) and their voice's similarity to the training speaker's (cosine of speaker embeddings with
    the reference pack wrote; with several speakers, the nearest one)."""

    def __init__(self, settings: TrainSettings, model_dir: ModelDir, choice: DeviceChoice, data_dir: Path):
        from fs_pipeline.audio.asr import Transcriber
        from fs_pipeline.stages.pack import voice_references

        self.model_dir, self.choice = model_dir, choice
        self.max_frames = settings.test_clips_max_frames
        self.references = list(voice_references(data_dir).values())
        self.transcriber = Transcriber("auto", settings.test_clips_whisper_model, choice)
        self.synthesizer = None

    def score(self, model, folder: Path) -> dict[str, float]:
        from fs_pipeline.audio import speaker
        from fs_pipeline.audio.asr import word_error_rate
        from fs_pipeline.audio.io import read_wav
        from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer

        model.eval()
        if self.synthesizer is None:
            self.synthesizer = Synthesizer(self.model_dir, self.choice, model=model)
        synthesizer = self.synthesizer
        rate = self.model_dir.version.sample_rate
        errors, similarities = [], []
        try:
            for index, sentence in enumerate(TEST_SENTENCES):
                clip = synthesizer.speak(sentence, folder / f"sentence_{index}.wav", SynthesisSettings(max_new_frames=self.max_frames))
                heard = self.transcriber.transcribe(read_wav(clip.path, rate), rate) if clip.frames else ""
                errors.append(word_error_rate(sentence, heard))
                voice = speaker.embed(read_wav(clip.path, speaker.SAMPLE_RATE), speaker.SAMPLE_RATE) if clip.frames else None
                similarities.append(max(speaker.similarity(voice, r) for r in self.references) if voice is not None else 0.0)
        finally:
            synthesizer.release_caches()
            model.train()
        return {"wer": sum(errors) / len(errors), "similarity": sum(similarities) / len(similarities)}

    def score_base(self, model, folder: Path) -> dict[str, float]:
        """The scores of the base model's own test clips: the adapters switched off (scale 0) meanwhile."""
        from fs_pipeline.lora import set_adapter_scale

        set_adapter_scale(model, 0.0)
        try:
            return self.score(model, folder)
        finally:
            set_adapter_scale(model, 1.0)


class _MetricsLog:
    """metrics.jsonl (one JSON object per step) and TensorBoard scalars, under results/<project>/logs/.
    A run that starts at `step` (a resume) first drops what was logged after it, by a run that was
    killed after its last checkpoint, so that each step is logged once."""

    def __init__(self, folder: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        path = folder / "metrics.jsonl"
        if path.is_file():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if _logged_step(line) <= step]
            write_text_atomic(path, "".join(rows))
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(path, "a", encoding="utf-8")
        self.board = SummaryWriter(str(folder / "tensorboard"), purge_step=step + 1)

    def write(self, metrics: dict) -> None:
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self.board.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        self.jsonl.close()
        self.board.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a kill mid-write) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag (the signal's number; 0 for none), so the loop can save a checkpoint and
    stop cleanly."""

    def __init__(self):
        self.number = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.number = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
