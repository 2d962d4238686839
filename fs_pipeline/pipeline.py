"""The full pipeline: prepare -> extract -> pack -> train -> merge -> synthesize, each only when needed.

Stages are ordered and can be run as a slice (--from-stage / --to-stage, as ESPnet recipes do), and
--force-stage NAME redoes one stage and the ones after it. What is stale is decided from the project's
manifest (results/<project>/manifest.json): prepare, extract and pack skip what their records say is
current; train continues from its latest checkpoint while its settings and data are unchanged; merge and
the test clip are redone only when their inputs changed. A lock on the project stops a second run, and
a run killed at any moment is continued by running the same command again.

Under torchrun (several GPUs, see fs_pipeline/distributed.py) every process runs this, and rank 0 alone
holds the lock and writes: it runs the stages before training while the others wait for it, then all of
them train, and rank 0 alone merges, speaks the test clip and writes the manifest and the report.
"""

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from fs_pipeline import PipelineError, checkpoints, distributed
from fs_pipeline.device import DeviceChoice
from fs_pipeline.lock import project_lock
from fs_pipeline.manifest import DONE, STAGES, Manifest, settings_record, stage_slice
from fs_pipeline.models import ModelDir, open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.stages import extract, merge, pack, prepare, train
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer

TEST_SENTENCE = "This is a test of my new voice, made with fs-pipeline."


@dataclass(frozen=True)
class PipelineSettings:
    prepare: prepare.PrepareSettings | None  # None: the extract settings' data_dir is a prepared dataset
    extract: extract.ExtractSettings
    pack: pack.PackSettings
    train: train.TrainSettings
    merge: merge.MergeSettings
    synthesis: SynthesisSettings = SynthesisSettings()
    from_stage: str = "prepare"
    to_stage: str = "synthesize"
    force_stage: str | None = None


@dataclass
class PipelineResult:
    ran: list[str]
    skipped: list[str]
    interrupted: str | None
    merged_dir: Path | None
    test_clip: Path | None
    report: Path | None
    train_step: int | None = None
    qa_warnings: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # stage -> its own result (ExtractResult, PackResult, ...) where it ran


def is_prepared(data_dir: Path) -> bool:
    """A prepared dataset has a summary, or .wav clips with .lab transcripts beside them."""
    data_dir = Path(data_dir)
    if (data_dir / prepare.SUMMARY_FILE).is_file():
        return True
    wavs = list(data_dir.rglob("*.wav"))
    return bool(wavs) and all(w.with_suffix(".lab").is_file() for w in wavs)


def check_stage(name: str | None, flag: str) -> None:
    if name is not None and name not in STAGES:
        raise PipelineError(f"unknown stage '{name}' for {flag}: use one of {', '.join(STAGES)}")


def validate(settings: PipelineSettings, model_dir: ModelDir, project: Project) -> None:
    """Every option value and named file of the stages in the slice, checked before any stage does work."""
    for name, flag in ((settings.from_stage, "--from-stage"), (settings.to_stage, "--to-stage"), (settings.force_stage, "--force-stage")):
        check_stage(name, flag)
    first, last = STAGES.index(settings.from_stage), STAGES.index(settings.to_stage)
    if first > last:
        raise PipelineError(f"--from-stage {settings.from_stage} comes after --to-stage {settings.to_stage}")
    if settings.force_stage and not first <= STAGES.index(settings.force_stage) <= last:
        raise PipelineError(
            f"--force-stage {settings.force_stage} is outside the stages this command runs ({settings.from_stage} to "
            f"{settings.to_stage}): nothing would be forced; widen --from-stage/--to-stage or force a stage inside them"
        )
    runs = set(stage_slice(settings.from_stage, settings.to_stage))
    if "prepare" in runs and settings.prepare is not None:
        prepare.check(settings.prepare)
    elif runs & {"extract", "pack"} and not Path(settings.extract.data_dir).is_dir():
        raise PipelineError(f"dataset not found: {settings.extract.data_dir}: pass --data-dir training_data/NAME (made by prepare_dataset.py)")
    if "extract" in runs:
        extract.check(settings.extract)
    if "pack" in runs:
        pack.check(settings.pack)
    if "train" in runs:
        train.check(settings.train, model_dir)
        if settings.force_stage is None or STAGES.index(settings.force_stage) > STAGES.index("train"):
            train.starting_point(settings.train, project.dir / "checkpoints")  # e.g. --resume-latest with nothing to resume
    if "merge" in runs:
        merge.check(settings.merge)


def run(settings: PipelineSettings, model_dir: ModelDir, choice: DeviceChoice, project: Project) -> PipelineResult:
    with distributed.session(choice) as (world, choice):
        validate(settings, model_dir, project)
        if not world.is_main:
            return _follow(settings.train, model_dir, choice, project, world)
        first, last = STAGES.index(settings.from_stage), STAGES.index(settings.to_stage)
        forced_from = STAGES.index(settings.force_stage) if settings.force_stage else len(STAGES)
        with distributed.leading(world) as tell:
            project.dir.mkdir(parents=True, exist_ok=True)
            with project_lock(project.dir, "pipeline"):
                log_sink = logger.add(project.dir / "logs" / "pipeline.log", rotation="10 MB", retention=5, level="DEBUG")
                try:
                    return _run_stages(settings, model_dir, choice, project, first, last, forced_from, world, tell)
                finally:
                    logger.remove(log_sink)


def _follow(settings: train.TrainSettings, model_dir, choice, project, world: distributed.World) -> PipelineResult:
    """A process other than rank 0: wait while rank 0 runs the stages before training, then train with it. It
    writes nothing into the project."""
    result = PipelineResult([], [], None, None, None, None)
    if distributed.follow(world) == "train":
        trained = result.details["train"] = train.run(settings, model_dir, choice, project, world)
        result.ran, result.train_step, result.interrupted = ["train"], trained.step, trained.interrupted
    return result


def remember(manifest: Manifest, settings: PipelineSettings, model_dir: ModelDir, stage: str) -> None:
    """The project's memory, updated after each stage that worked: the base model, model version, dataset
    and training settings it was last run with, so later commands on it (merge, status, a resume) need
    none of them again."""
    memory = manifest.data.setdefault("project", {})
    memory.update(base_model=str(model_dir.path.resolve()), model_version=model_dir.version.name)
    if stage in ("extract", "pack"):
        memory["data_dir"] = str(Path(settings.extract.data_dir).resolve())
    if stage == "train":
        memory["train"] = {k: v for k, v in settings_record(settings.train).items() if k not in ("resume_from", "resume_latest", "warm_start_from")}
    manifest.save()


def _run_stages(settings, model_dir, choice, project, first, last, forced_from, world=distributed.SINGLE,
                tell=lambda outcome: None) -> PipelineResult:
    manifest = Manifest(project.manifest_path)
    result = PipelineResult([], [], None, None, None, None)

    for index, stage in enumerate(STAGES):
        if not first <= index <= last:
            continue
        if stage == "prepare" and settings.prepare is None:
            continue  # the data is a prepared dataset: prepare does not apply
        forced = index >= forced_from
        started = time.perf_counter()
        if stage == "prepare":
            prepared = result.details[stage] = prepare.run(replace(settings.prepare, retranscribe=settings.prepare.retranscribe or forced), choice)
            did_work = prepared.sources_done > 0 or prepared.transcribed > 0
            summary = Path(settings.prepare.output) / prepare.SUMMARY_FILE
            if did_work or manifest.state("prepare") != DONE:
                manifest.complete("prepare", outputs=manifest.hash_outputs([summary]), clips=prepared.clips)
        elif stage == "extract":
            result.details[stage] = extract.run(settings.extract, model_dir, choice, manifest, force=forced)
            did_work = result.details[stage].extracted > 0
        elif stage == "pack":
            if forced:
                manifest.update("pack", inputs={})
            packed = result.details[stage] = pack.run(settings.pack, model_dir, project, manifest)
            did_work, result.qa_warnings = not packed.skipped, packed.warnings
        elif stage == "train":
            trained = _train(settings.train, model_dir, choice, project, manifest, forced, world, tell)
            did_work = trained is not None
            if trained is not None:
                result.details[stage], result.train_step = trained, trained.step
                if trained.interrupted:
                    remember(manifest, settings, model_dir, stage)
                    result.interrupted = trained.interrupted
                    return result
        elif stage == "merge":
            merged = result.details[stage] = _merge(settings.merge, model_dir, choice, project, manifest, forced)
            result.merged_dir, did_work = merged.merged_dir, not merged.skipped
        else:
            clip, did_work = _test_clip(settings, model_dir, choice, project, manifest, forced)
            result.test_clip = clip
        (result.ran if did_work else result.skipped).append(stage)
        remember(manifest, settings, model_dir, stage)
        if did_work:
            timings = manifest.data.setdefault("timings", {})
            timings[stage] = {"seconds": round(time.perf_counter() - started, 2),
                              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            manifest.save()

    if last >= STAGES.index("train"):
        from fs_pipeline.report import write_report

        result.report = write_report(project, manifest_path=project.manifest_path, merged_dir=result.merged_dir, test_clip=result.test_clip)
    return result


def _train(settings: train.TrainSettings, model_dir, choice, project, manifest: Manifest, forced: bool,
           world: distributed.World = distributed.SINGLE, tell=lambda outcome: None):
    """Train unless the project already holds a finished run of these settings and data that reached
    max_steps. Returns None when skipped. The train stage itself continues the latest checkpoint, and
    refuses one of other settings or another number of processes; forcing moves the old run (checkpoints
    and metrics) aside first. `tell` lets the other processes of a torchrun join the training, or go."""
    ckpt_dir = project.dir / "checkpoints"
    if forced:
        _move_aside_old_run(project)
    identity = train.run_identity(settings, model_dir, project)
    latest = checkpoints.latest(ckpt_dir)
    if (not forced and not settings.resume_from and not settings.warm_start_from and latest and latest.step >= settings.max_steps
            and manifest.is_current("train", identity=identity)):
        tell("done")
        return None
    # refuses another run's checkpoints before the stage is marked as running
    train.starting_point(settings, ckpt_dir, identity, world.size)
    manifest.update("train", identity=identity)
    tell("train")
    result = train.run(settings, model_dir, choice, project, world)
    if not result.interrupted:
        final = checkpoints.latest(ckpt_dir)
        manifest.complete("train", identity=identity, step=result.step, outputs=manifest.hash_outputs([final.path]),
                          processes=result.processes, effective_batch=result.effective_batch)
    return result


def _move_aside_old_run(project: Project) -> None:
    """--force-stage train: the old checkpoints, metrics and TensorBoard logs go to checkpoints.old-TIME/."""
    old = [project.dir / "checkpoints", project.dir / "logs" / "metrics.jsonl", project.dir / "logs" / "tensorboard"]
    if not any(path.exists() for path in old):
        return
    aside = project.dir / f"checkpoints.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in old:
        if path.exists():
            shutil.move(path, aside / path.name)
    logger.info(f"--force-stage: the previous run's checkpoints and metrics moved to {aside}")


def _merge(settings: merge.MergeSettings, model_dir, choice, project, manifest: Manifest, forced: bool) -> merge.MergeResult:
    if forced:
        (merge.merged_path(project, settings.output_root) / "manifest.json").unlink(missing_ok=True)
    merged = merge.run(settings, model_dir, choice, project)
    if not merged.skipped or manifest.state("merge") != DONE:
        model_files = [merged.merged_dir / "manifest.json", *open_model_dir(merged.merged_dir, model_dir.version.name).weight_files]
        manifest.complete("merge", checkpoint=merged.checkpoint.name, outputs=manifest.hash_outputs(model_files))
    return merged


def _test_clip(settings, model_dir, choice, project, manifest: Manifest, forced: bool) -> tuple[Path, bool]:
    """A test sentence spoken by the merged model: results/<project>/test_clip.wav."""
    merged_dir = merge.merged_path(project, settings.merge.output_root)
    clip = project.dir / "test_clip.wav"
    inputs = {"merged_manifest": manifest.hash(merged_dir / "manifest.json"), "text": TEST_SENTENCE, "settings": asdict(settings.synthesis)}
    if not forced and manifest.is_current("synthesize", inputs=inputs):
        return clip, False
    from fs_pipeline.models import open_model_dir

    speech = Synthesizer(open_model_dir(merged_dir, model_dir.version.name), choice).speak(TEST_SENTENCE, clip, settings.synthesis)
    manifest.complete("synthesize", inputs=inputs, outputs=manifest.hash_outputs([clip]),
                      realtime_factor=round(speech.realtime_factor, 2), audio_seconds=round(speech.audio_seconds, 2))
    return clip, True


def status(project: Project) -> list[dict]:
    """One row per stage, with the state the run itself decides by (Manifest.state)."""
    manifest = Manifest(project.manifest_path)
    rows = []
    for stage in STAGES:
        timing = manifest.data.get("timings", {}).get(stage, {})
        rows.append({"stage": stage, "state": manifest.state(stage), "completed_at": manifest.entry(stage).get("completed_at", "-"),
                     "seconds": timing.get("seconds")})
    return rows
