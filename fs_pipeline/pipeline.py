"""The full pipeline: prepare -> extract -> pack -> train -> merge -> synthesize, each only when needed.

Stages are ordered and can be run as a slice (--from-stage / --to-stage, as ESPnet recipes do), and
--force-stage NAME redoes one stage and the ones after it. What is stale is decided from the project's
manifest (results/<project>/manifest.json): prepare, extract and pack skip what their records say is
current; train continues from its latest checkpoint while its settings and data are unchanged; merge and
the test clip are redone only when their inputs changed. A lock on the project stops a second run, and
a run killed at any moment is continued by running the same command again.
"""

import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from fs_pipeline import PipelineError, checkpoints
from fs_pipeline.device import DeviceChoice
from fs_pipeline.manifest import Manifest, run_lock, settings_record
from fs_pipeline.models import ModelDir, model_identity
from fs_pipeline.project import Project
from fs_pipeline.stages import extract, merge, pack, prepare, train
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer

STAGES = ("prepare", "extract", "pack", "train", "merge", "synthesize")
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


def run(settings: PipelineSettings, model_dir: ModelDir, choice: DeviceChoice, project: Project) -> PipelineResult:
    for name, flag in ((settings.from_stage, "--from-stage"), (settings.to_stage, "--to-stage"), (settings.force_stage, "--force-stage")):
        check_stage(name, flag)
    first, last = STAGES.index(settings.from_stage), STAGES.index(settings.to_stage)
    if first > last:
        raise PipelineError(f"--from-stage {settings.from_stage} comes after --to-stage {settings.to_stage}")
    forced_from = STAGES.index(settings.force_stage) if settings.force_stage else len(STAGES)

    project.dir.mkdir(parents=True, exist_ok=True)
    log_sink = logger.add(project.dir / "logs" / "pipeline.log", rotation="10 MB", retention=5, level="DEBUG")
    try:
        with run_lock(project.dir, "pipeline"):
            return _run_stages(settings, model_dir, choice, project, first, last, forced_from)
    finally:
        logger.remove(log_sink)


def _run_stages(settings, model_dir, choice, project, first, last, forced_from) -> PipelineResult:
    manifest = Manifest(project.manifest_path)
    result = PipelineResult([], [], None, None, None, None)
    needs_prepare = settings.prepare is not None

    for index, stage in enumerate(STAGES):
        if not first <= index <= last:
            continue
        forced = index >= forced_from
        started = time.perf_counter()
        if stage == "prepare":
            if not needs_prepare:
                result.skipped.append(stage)
                continue
            prepared = prepare.run(replace(settings.prepare, retranscribe=settings.prepare.retranscribe or forced), choice)
            did_work = prepared.sources_done > 0 or prepared.transcribed > 0
            summary = Path(settings.prepare.output) / prepare.SUMMARY_FILE
            if did_work or "completed_at" not in manifest.entry("prepare"):
                manifest.complete("prepare", outputs=manifest.hash_outputs(project.dir, [summary]), clips=prepared.clips)
        elif stage == "extract":
            if forced:
                manifest.update("extract", clips={})
            did_work = extract.run(settings.extract, model_dir, choice, manifest).extracted > 0
        elif stage == "pack":
            if forced:
                manifest.update("pack", inputs={})
            did_work = not pack.run(settings.pack, model_dir, project, manifest).skipped
        elif stage == "train":
            trained = _train(settings.train, model_dir, choice, project, manifest, forced)
            if trained is None:
                did_work = False
            else:
                did_work = True
                result.train_step = trained.step
                if trained.interrupted:
                    result.interrupted = trained.interrupted
                    return result
        elif stage == "merge":
            if forced:
                (merge.merged_path(project, settings.merge.output_root) / "manifest.json").unlink(missing_ok=True)
            merged = merge.run(settings.merge, model_dir, choice, project)
            result.merged_dir, did_work = merged.merged_dir, not merged.skipped
            if did_work or "completed_at" not in manifest.entry("merge"):
                model_files = [merged.merged_dir / "manifest.json", merged.merged_dir / "model.pth"]
                manifest.complete("merge", checkpoint=merged.checkpoint.name, outputs=manifest.hash_outputs(project.dir, model_files))
        else:
            clip, did_work = _test_clip(settings, model_dir, choice, project, manifest, forced)
            result.test_clip = clip
        (result.ran if did_work else result.skipped).append(stage)
        if did_work:
            timings = manifest.data.setdefault("timings", {})
            timings[stage] = {"seconds": round(time.perf_counter() - started, 2),
                              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            manifest.save()

    from fs_pipeline.report import write_report

    result.report = write_report(project, manifest_path=project.manifest_path, merged_dir=result.merged_dir, test_clip=result.test_clip)
    return result


def _train(settings: train.TrainSettings, model_dir, choice, project, manifest: Manifest, forced: bool):
    """Train unless the project already holds a finished run of these settings and data. Returns None when
    skipped. Continues from the latest checkpoint of an unfinished run with the same settings."""
    ckpt_dir = project.dir / "checkpoints"
    identity = {
        "settings": {k: v for k, v in settings_record(settings).items() if k not in ("max_steps", "resume_from", "warm_start_from")},
        "base": model_identity(model_dir, manifest.hash),
        "data": manifest.entry("pack").get("outputs", {}),
    }
    entry = manifest.entry("train")
    latest = checkpoints.latest(ckpt_dir)
    if forced and ckpt_dir.exists():
        aside = ckpt_dir.with_name(f"checkpoints.old-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        shutil.move(ckpt_dir, aside)
        logger.info(f"--force-stage: previous checkpoints moved to {aside}")
        latest = None
    elif latest is not None and entry.get("identity") not in (None, identity):
        raise PipelineError(
            f"the checkpoints in {ckpt_dir} come from other training settings or data: pass --force-stage train to start "
            "over (they are moved aside), or use the settings they were made with"
        )
    if not forced and entry.get("completed_at") and entry.get("identity") == identity and latest and latest.step >= settings.max_steps:
        return None
    manifest.update("train", identity=identity)
    result = train.run(replace(settings, resume_from=latest.path if latest else None), model_dir, choice, project)
    if not result.interrupted:
        final = checkpoints.latest(ckpt_dir)
        manifest.complete("train", identity=identity, step=result.step, outputs=manifest.hash_outputs(project.dir, [final.path]))
    return result


def _test_clip(settings, model_dir, choice, project, manifest: Manifest, forced: bool) -> tuple[Path, bool]:
    """A test sentence spoken by the merged model: results/<project>/test_clip.wav."""
    merged_dir = merge.merged_path(project, settings.merge.output_root)
    clip = project.dir / "test_clip.wav"
    inputs = {"merged_manifest": manifest.hash(merged_dir / "manifest.json"), "text": TEST_SENTENCE, "settings": asdict(settings.synthesis)}
    if not forced and manifest.is_current("synthesize", {}, inputs, project.dir):
        return clip, False
    from fs_pipeline.models import open_model_dir

    speech = Synthesizer(open_model_dir(merged_dir, model_dir.version.name), choice).speak(TEST_SENTENCE, clip, settings.synthesis)
    manifest.complete("synthesize", settings={}, inputs=inputs, outputs=manifest.hash_outputs(project.dir, [clip]),
                      realtime_factor=round(speech.realtime_factor, 2), audio_seconds=round(speech.audio_seconds, 2))
    return clip, True


def status(project: Project) -> list[dict]:
    """One row per stage: done, stale (with why), incomplete, or not run."""
    manifest = Manifest(project.manifest_path)
    rows, previous_done_at = [], None
    for stage in STAGES:
        entry = manifest.entry(stage)
        timing = manifest.data.get("timings", {}).get(stage, {})
        done_at = entry.get("completed_at")
        if not entry:
            state = "not run"
        elif not done_at:
            state = "incomplete (rerun to continue)"
        elif not manifest.outputs_intact(stage, project.dir):
            state = "stale: outputs changed or deleted"
        elif previous_done_at and done_at < previous_done_at:
            state = "stale: an earlier stage ran since"
        else:
            state = "done"
        rows.append({"stage": stage, "state": state, "completed_at": done_at or "-", "seconds": timing.get("seconds")})
        if done_at:
            previous_done_at = max(previous_done_at or done_at, done_at)
    return rows
