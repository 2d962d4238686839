"""Fine-tune Fish Speech on a prepared dataset. Run with --help for the stages and their flags."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from fs_pipeline import PipelineError
from fs_pipeline.cli import device_options, model_summary, prepare_notes, prepare_options, prepare_settings, setup_logging, user_errors
from fs_pipeline.dataset import DECODE_WORKERS
from fs_pipeline.download import default_folder, needs_download
from fs_pipeline.manifest import STAGES, Manifest, stage_slice
from fs_pipeline.project import Project
from fs_pipeline.versions import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, get_version

if TYPE_CHECKING:
    from fs_pipeline.stages import extract, merge, pack, train

# torch, the model code and the stages are imported where they are used, so that --help and a wrong flag
# answer at once.

DEFAULT_BASE_MODEL = Path("checkpoints/openaudio-s1-mini")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--project", help="Project name: outputs go to results/PROJECT/.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Prepared dataset: training_data/NAME (SPEAKER/*.wav + .lab).")
@click.option("--pretrained-ckpt-path", type=click.Path(path_type=Path), default=DEFAULT_BASE_MODEL, show_default=True,
              help="Base model directory in the release layout (config.json, the LLM weights, tokenizer, codec.pth).")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True,
              help="Which Fish Speech generation the base model is.")
@click.option("--check-model", is_flag=True, help="Validate and load the base model, print what was found, and exit.")
@click.option("--download-model", is_flag=True,
              help="Download the --model-version's release from the Hugging Face Hub into --pretrained-ckpt-path "
                   "[default: checkpoints/<release>], resuming an interrupted download, then check it as --check-model does.")
@click.option("--revision", default=None, help="With --download-model: the branch, tag or commit to download [default: the latest].")
@click.option("--accept-license", is_flag=True,
              help="Accept the weights' licence, which the first download of a model version shows (remembered per version).")
# extract + pack
@click.option("--extract-tokens", is_flag=True,
              help="Encode every clip to semantic codes (<clip>.npy), then pack train/val data and the QA report into results/PROJECT/data/.")
@click.option("--batch-size-extract", default=16, show_default=True, help="Clips per codec batch (clips of similar length are batched together).")
@click.option("--batch-seconds-extract", default=240.0, show_default=True,
              help="Most audio seconds per codec batch, counting padding to its longest clip; lower it if extraction runs out of GPU memory.")
@click.option("--num-workers-extract", default=DECODE_WORKERS, show_default=True,
              help="DataLoader workers that decode and resample audio [default: the CPU count, at most 4].")
@click.option("--val-fraction", default=0.05, show_default=True, help="Share of each speaker's audio held out for validation, by source recording.")
@click.option("--split-seed", default=0, show_default=True, help="Seed of the held-out split.")
# train
@click.option("--train", "do_train", is_flag=True, help="Train LoRA adapters (extracts and packs first when that is missing or stale).")
@click.option("--max-steps", default=1000, show_default=True, help="Total optimizer steps; a resumed run trains up to this many.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--learning-rate", default=1e-4, show_default=True)
@click.option("--gradient-accumulation-steps", default=1, show_default=True)
@click.option("--lora-config", default="r_8_alpha_16", show_default=True, help="LoRA rank and alpha as r_RANK_alpha_ALPHA, e.g. r_8_alpha_16, r_4_alpha_8, r_16_alpha_32.")
@click.option("--lora-targets", type=click.Choice(["all", "slow", "fast"]), default="all", show_default=True,
              help="Which transformer gets adapters: the slow one (text and each frame's first code), the fast one (the other codes), or both.")
@click.option("--warmup-steps", default=10, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass: less memory, ~30% slower.")
@click.option("--compile/--no-compile", "compile_blocks", default=None,
              help="torch.compile the transformer blocks: about twice the steps/s after a warm-up of about a minute "
                   "[default: on for CUDA GPUs under Linux, off elsewhere].")
@click.option("--max-length", type=int, default=None, help="Truncate training sequences to this many tokens [default: the model's max].")
@click.option("--pack-utterances/--no-pack-utterances", default=None,
              help="Train on rows of several utterances of one speaker, up to --max-length tokens (default 4096), instead of one "
                   "per row: little padding and many tokens per step (each row is long: lower --batch-size on small GPUs) "
                   "[default: on where training compiles by default and --batch-size such rows fit the GPU's memory].")
@click.option("--checkpoint-every", default=100, show_default=True)
@click.option("--val-every", type=int, default=None, help="Validate every N steps [default: --checkpoint-every].")
@click.option("--keep-checkpoints", default=5, show_default=True,
              help="Keep the newest N checkpoints, plus the best by validation loss (and, with --test-clips, by each --best-by score).")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order and adapter initialisation.")
@click.option("--resume-latest", is_flag=True, help="Continue exactly from the project's latest checkpoint.")
@click.option("--resume-from-checkpoint", type=click.Path(path_type=Path), help="Continue exactly from this checkpoint file.")
@click.option("--checkpoint-path", type=click.Path(path_type=Path),
              help="Warm start: take the adapters of this checkpoint (or the latest in this folder), with a fresh optimizer at step 0.")
@click.option("--test-clips", is_flag=True,
              help="Before training (the base model) and at each checkpoint, speak three fixed sentences, keep the clips, and store "
                   "their WER (ASR by Whisper) and their voice's similarity to the training speaker's.")
@click.option("--test-clips-whisper-model", default="base", show_default=True, help="Whisper size or local path that scores the test clips.")
@click.option("--test-clips-max-frames", type=click.IntRange(min=1), default=400, show_default=True,
              help="Each test clip's length limit in audio frames (21.5 per second for s1-mini).")
@click.option("--list-checkpoints", is_flag=True,
              help="List the project's checkpoints with their step, size, validation loss and test-clip scores.")
@click.option("--review", is_flag=True,
              help="List the clips the dataset QA flagged (results/PROJECT/data/qa.json), with their transcripts and why, to fix before training.")
# merge
@click.option("--merge-weights", is_flag=True,
              help="Fold a checkpoint's adapters into the base: checkpoints/PROJECT-merged/ (self-contained) and checkpoints/PROJECT-lora/.")
@click.option("--checkpoint-step", type=int, help="Merge the checkpoint of this step [default: best validation loss, else latest].")
@click.option("--checkpoint", "merge_checkpoint", type=click.Path(path_type=Path), help="Merge this checkpoint file.")
@click.option("--merge-scale", type=float, default=1.0, show_default=True,
              help="Adapter strength for --merge-weights: W + S·(B·A·alpha/r). 0.5 is half-way between the base and the fine-tuned "
                   "voice; above 0, at most 2.")
@click.option("--best-by", type=click.Choice(["val_loss", "wer", "similarity", "combined"]), default="val_loss", show_default=True,
              help="What 'best checkpoint' means for merging: the lowest validation loss; with --test-clips, the lowest WER, the "
                   "highest voice similarity to the training speaker, or the highest combined score (similarity - WER).")
# the whole pipeline
@click.option("--full-pipeline", is_flag=True,
              help="prepare (if --data-dir holds raw audio) -> extract -> pack -> train -> merge -> test clip, each only when needed.")
@click.option("--prepare-data", is_flag=True, help="Prepare --data-dir (raw recordings) into training_data/PROJECT; alone, only that.")
@click.option("--speaker", default=None, help="Speaker name for prepared raw audio [default: the project name].")
@prepare_options
@click.option("--from-stage", type=click.Choice(STAGES), default="prepare", show_default=True, help="First stage to run.")
@click.option("--to-stage", type=click.Choice(STAGES), default="synthesize", show_default=True, help="Last stage to run.")
@click.option("--force-stage", type=click.Choice(STAGES), help="Redo this stage and those after it, even if up to date.")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="Train on N GPUs of this machine: runs this same command as N processes under torchrun, one per GPU "
                   "(--batch-size is per GPU).")
@click.option("--status", is_flag=True, help="Show which stages are done, stale or missing.")
@click.option("--report", is_flag=True, help="With --status: (re)write results/PROJECT/report.md.")
@device_options
@user_errors
def main(**flags) -> None:
    """Fine-tune a Fish Speech voice model with LoRA, in restartable stages.

    \b
    Download the base model (openaudio-s1-mini, from the Hugging Face Hub) and check it:
      python finetune_tts.py --download-model
      python finetune_tts.py --check-model --pretrained-ckpt-path checkpoints/openaudio-s1-mini
    Extract codes and pack the data (reruns skip clips whose audio and codec are unchanged):
      python finetune_tts.py --project P --data-dir training_data/NAME --extract-tokens
    List the clips its QA flagged (another voice, a transcript that may not match ...), to fix before training:
      python finetune_tts.py --project P --review
    Train, list checkpoints, resume:
      python finetune_tts.py --project P --data-dir training_data/NAME --train --max-steps 1000
      python finetune_tts.py --project P --list-checkpoints
      python finetune_tts.py --project P --data-dir training_data/NAME --train --resume-latest
    Merge the best checkpoint into a self-contained model (checkpoints/P-merged):
      python finetune_tts.py --project P --merge-weights
    Everything at once (raw recordings are prepared first), and what is done:
      python finetune_tts.py --project P --data-dir recordings/ --full-pipeline --split-long --auto-transcribe
      python finetune_tts.py --project P --status
    """
    main_process = is_main_process()
    setup_logging(quiet=not main_process)  # under torchrun, rank 0 speaks for every process
    if flags["gpus"] is not None:
        if not (flags["do_train"] or flags["full_pipeline"]):
            raise click.UsageError("--gpus N trains on N GPUs: use it with --train or --full-pipeline")
        relaunch_on_gpus(flags["gpus"])
    actions = [flags[a] for a in ("check_model", "download_model", "extract_tokens", "do_train", "list_checkpoints", "review",
                                  "merge_weights", "full_pipeline", "prepare_data", "status")]
    if not any(actions):
        raise click.UsageError("nothing to do: pass --full-pipeline, or one stage (--extract-tokens, --train, --merge-weights ...) or --status")
    if flags["resume_latest"] and flags["resume_from_checkpoint"]:
        raise PipelineError("--resume-latest and --resume-from-checkpoint both given: pass one of them")
    if flags["revision"] and not flags["download_model"]:
        raise click.UsageError("--revision picks what --download-model downloads: add --download-model")
    project = Project(flags["project"]) if flags["project"] else None
    recalled = recall(project, flags) if project is not None else []

    if flags["list_checkpoints"] or flags["review"] or flags["status"]:
        if flags["list_checkpoints"]:
            click.echo(format_checkpoints(project_of(flags)))
        if flags["review"]:
            click.echo(format_review(existing_project(flags)))
        if flags["status"]:
            show_status(existing_project(flags), flags["report"])
        if not any(flags[a] for a in ("check_model", "download_model", "extract_tokens", "do_train", "merge_weights", "full_pipeline",
                                      "prepare_data")):
            return

    stages = requested_stages(flags)
    if recalled and main_process:
        click.echo(f"Project {project.name} remembers: {' '.join(recalled)} (pass a flag to override it)")
    if stages:
        project_of(flags)
    if stages and {"prepare", "extract", "pack"} & set(stage_slice(*stages)):
        data_dir_of(flags)
    if flags["download_model"]:
        flags["pretrained_ckpt_path"] = download_target(flags)
        download_base_model(flags)
    elif stages and needs_download(flags["pretrained_ckpt_path"], flags["model_version"]):
        offer_download(flags)

    from fs_pipeline.device import select_device
    from fs_pipeline.models import load_codec, load_llm, open_model_dir

    choice = select_device(flags["device"], flags["force_mps"], flags["precision"])
    model_dir = open_model_dir(flags["pretrained_ckpt_path"], flags["model_version"])
    if flags["check_model"] or flags["download_model"]:
        click.echo(model_summary(model_dir, load_llm(model_dir, choice), load_codec(model_dir, choice), choice))
    if flags["download_model"] and not stages:
        click.echo(f"Base model ready: {model_dir.path}\nNext, fine-tune a voice on it:\n"
                   f"  python finetune_tts.py --project P --data-dir raw_audio/ --full-pipeline{base_model_flags(flags)}")
    if stages:
        run_pipeline(project_of(flags), model_dir, choice, flags, stages)


# Flags a project remembers from its last run (Manifest "project"), by flag name -> memory key.
REMEMBERED = {"pretrained_ckpt_path": "base_model", "model_version": "model_version", "data_dir": "data_dir"}
TRAIN_FLAGS = {"compile": "compile_blocks"}  # TrainSettings field -> flag, where the names differ


def recall(project: Project, flags: dict) -> list[str]:
    """Flags not given on the command line take the values the project was last run with, so that
    `--merge-weights` or `--train --resume-latest` need no more than --project. Returns the flags recalled."""
    memory = Manifest(project.manifest_path).data.get("project", {}) if project.manifest_path.is_file() else {}
    context = click.get_current_context()
    recalled = []
    remembered = {flag: memory[key] if flag == "model_version" else Path(memory[key]) for flag, key in REMEMBERED.items() if key in memory}
    remembered |= {TRAIN_FLAGS.get(name, name): value for name, value in memory.get("train", {}).items()}
    options = {param.name: param for param in context.command.params}
    for flag, value in remembered.items():
        if context.get_parameter_source(flag) == ParameterSource.DEFAULT and flags[flag] != value:
            flags[flag] = value
            option = options[flag]
            if value is True or value is False:  # a flag: its own name, or its --no- form
                recalled.append(option.opts[0] if value else option.secondary_opts[0])
            else:
                recalled.append(f"{option.opts[0]} {quote(value)}")
    return recalled


def download_target(flags) -> Path:
    """--pretrained-ckpt-path, or where the version's release goes when it is not given."""
    given = click.get_current_context().get_parameter_source("pretrained_ckpt_path") != ParameterSource.DEFAULT
    return flags["pretrained_ckpt_path"] if given or flags["pretrained_ckpt_path"] != DEFAULT_BASE_MODEL else \
        default_folder(flags["model_version"])


def base_model_flags(flags) -> str:
    """The flags that name this base model to a later command (none where the defaults name it)."""
    text = f" --model-version {quote(flags['model_version'])}" if flags["model_version"] != DEFAULT_MODEL_VERSION else ""
    if Path(flags["pretrained_ckpt_path"]) != DEFAULT_BASE_MODEL:
        text += f" --pretrained-ckpt-path {quote(flags['pretrained_ckpt_path'])}"
    return text


def download_command(flags) -> str:
    command = "python finetune_tts.py --download-model"
    if flags["model_version"] != DEFAULT_MODEL_VERSION:
        command += f" --model-version {quote(flags['model_version'])}"
    if Path(flags["pretrained_ckpt_path"]) != default_folder(flags["model_version"]):
        command += f" --pretrained-ckpt-path {quote(flags['pretrained_ckpt_path'])}"
    return command


def download_base_model(flags) -> None:
    """--download-model: the licence (shown and accepted once per version), then the download."""
    from fs_pipeline.download import DownloadSettings, accept_license, download, license_accepted, license_lines

    version = get_version(flags["model_version"])
    if not license_accepted(version):
        click.echo("\n".join(license_lines(version)))
        if not flags["accept_license"]:
            raise PipelineError(f"the licence of the {version.name} weights is not accepted yet: read it above, then rerun "
                                "with --accept-license to accept it")
        click.echo(f"Licence accepted (remembered in {accept_license(version)})")
    result = download(DownloadSettings(version.name, flags["pretrained_ckpt_path"], flags["revision"]))
    fetched = f"{result.fetched_bytes / 1e6:,.1f} MB downloaded" if result.fetched_bytes else "nothing new to download"
    click.echo(f"{result.repo} at commit {result.commit}: {len(result.files)} files in {result.path} ({fetched})")


def offer_download(flags) -> None:
    """A stage needs the base model and there is none: on a terminal, offer to download it; elsewhere say how."""
    from fs_pipeline.download import license_accepted, license_lines

    stages = requested_stages(flags)
    if {"prepare", "extract", "pack"} & set(stage_slice(*stages)) and not Path(flags["data_dir"]).exists():
        # before gigabytes are fetched for a run that would stop at its first stage
        raise PipelineError(f"dataset not found: {flags['data_dir']}: pass --data-dir a folder of recordings or a prepared dataset")
    target, version = flags["pretrained_ckpt_path"], get_version(flags["model_version"])
    stop = f"no base model at {target}: download it with `{download_command(flags)}`, then rerun this command"
    if not sys.stdin.isatty() or os.environ.get("CI", "").lower() not in ("", "0", "false"):
        raise PipelineError(stop)
    if not license_accepted(version):
        click.echo("\n".join(license_lines(version)))
    if not click.confirm(f"No base model at {target}. Download {version.hub.repo} there now"
                         f"{'' if license_accepted(version) else ', accepting its licence'}?", default=False):
        raise PipelineError(stop)
    download_base_model(dict(flags, accept_license=True))


def requested_stages(flags) -> tuple[str, str] | None:
    """The slice of the pipeline that the action flags ask for: (first stage, last stage), or None."""
    if flags["full_pipeline"]:
        return flags["from_stage"], flags["to_stage"]
    wanted = []
    if flags["prepare_data"]:
        wanted.append("prepare")
    if flags["extract_tokens"]:
        wanted += ["extract", "pack"]
    if flags["do_train"]:
        wanted += ["extract", "pack", "train"]
    if flags["merge_weights"]:
        wanted.append("merge")
    if not wanted:
        return None
    order = sorted(wanted, key=STAGES.index)
    return order[0], order[-1]


def project_of(flags) -> Project:
    if not flags["project"]:
        raise click.UsageError("this needs --project NAME")
    return Project(flags["project"])


def existing_project(flags) -> Project:
    project = project_of(flags)
    if not project.dir.is_dir():
        known = sorted(manifest.parent.name for manifest in project.root.glob("*/manifest.json"))
        raise PipelineError(
            f"no project '{project.name}' in {project.root}/: check the name (projects there: {', '.join(known) or 'none'})"
        )
    return project


def data_dir_of(flags) -> Path:
    if not flags["data_dir"]:
        raise click.UsageError("this needs --data-dir training_data/NAME")
    return flags["data_dir"]


def quote(value) -> str:
    return shlex.quote(str(value))


def extract_settings(flags, data_dir: Path) -> extract.ExtractSettings:
    from fs_pipeline.stages import extract

    return extract.ExtractSettings(data_dir, flags["batch_size_extract"], flags["batch_seconds_extract"], flags["num_workers_extract"])


def pack_settings(flags, data_dir: Path) -> pack.PackSettings:
    from fs_pipeline.stages import pack

    return pack.PackSettings(data_dir, flags["val_fraction"], flags["split_seed"])


def train_settings(flags, choice, model_dir, trains: bool) -> train.TrainSettings:
    """The training settings of the flags; where --compile and --pack-utterances are not given, the fast path where it is
    safe (device.compiles_by_default, train.packs_by_default), with a line that says so when the command `trains`."""
    from fs_pipeline.device import compiles_by_default
    from fs_pipeline.stages import train

    if flags["compile_blocks"] is None:
        flags["compile_blocks"] = compiles_by_default(choice)
        if flags["compile_blocks"] and trains and is_main_process():
            click.echo("Compiling the transformer blocks (the first steps wait about a minute for it; --no-compile to skip)")
    settings = _train_settings(flags)
    if flags["pack_utterances"] is None and trains:
        flags["pack_utterances"] = train.packs_by_default(settings, model_dir, choice)
        settings = replace(settings, pack_utterances=flags["pack_utterances"])
        if settings.pack_utterances and is_main_process():
            click.echo(f"Packing utterances into rows of up to {train.tokens_per_row(settings, model_dir)} tokens, {settings.batch_size} "
                       "rows a step (--no-pack-utterances for one utterance a row)")
    return settings


def _train_settings(flags) -> train.TrainSettings:
    from fs_pipeline import checkpoints
    from fs_pipeline.stages import train

    return train.TrainSettings(
        max_steps=flags["max_steps"], batch_size=flags["batch_size"], learning_rate=flags["learning_rate"],
        gradient_accumulation_steps=flags["gradient_accumulation_steps"], lora_config=flags["lora_config"],
        lora_targets=flags["lora_targets"],
        warmup_steps=flags["warmup_steps"], lr_schedule=flags["lr_schedule"], gradient_checkpointing=flags["gradient_checkpointing"],
        compile=flags["compile_blocks"], max_length=flags["max_length"], pack_utterances=bool(flags["pack_utterances"]),
        checkpoint_every=flags["checkpoint_every"], val_every=flags["val_every"], keep_checkpoints=flags["keep_checkpoints"],
        seed=flags["seed"], resume_from=flags["resume_from_checkpoint"], resume_latest=flags["resume_latest"],
        warm_start_from=checkpoints.resolve(flags["checkpoint_path"]) if flags["checkpoint_path"] else None,
        test_clips=flags["test_clips"], test_clips_whisper_model=flags["test_clips_whisper_model"],
        test_clips_max_frames=flags["test_clips_max_frames"],
    )


def merge_settings(flags) -> merge.MergeSettings:
    from fs_pipeline.stages import merge

    return merge.MergeSettings(checkpoint=flags["merge_checkpoint"], checkpoint_step=flags["checkpoint_step"], best_by=flags["best_by"],
                               scale=flags["merge_scale"])


def is_main_process() -> bool:
    """False in torchrun's processes other than rank 0 (read here, not from fs_pipeline.distributed, which needs torch)."""
    return os.environ.get("RANK", "0") == "0"


def relaunch_on_gpus(gpus: int) -> None:
    """--gpus N: this command again, less --gpus, as N processes under torchrun; exits with torchrun's status."""
    from fs_pipeline.distributed import torchrun_command

    process = subprocess.Popen(torchrun_command(__file__, sys.argv[1:], gpus))
    while True:
        try:
            sys.exit(process.wait())
        except KeyboardInterrupt:  # Ctrl+C reached torchrun and its processes too: they save a checkpoint and stop
            continue


def run_pipeline(project: Project, model_dir, choice, flags, stages: tuple[str, str]) -> None:
    """Every command that writes into a project runs here: the same stages, guards, lock and manifest."""
    from fs_pipeline import pipeline

    first, last = stages
    data_dir = flags["data_dir"] or Path("training_data") / project.name  # merge alone needs no dataset
    prepare_stage, dataset = None, data_dir
    if first == "prepare" and (flags["prepare_data"] or not pipeline.is_prepared(data_dir)):
        dataset = Path("training_data") / project.name
        speaker = flags["speaker"] or project.name
        prepare_stage = prepare_settings(flags, (str(data_dir),), dataset, speaker, model_dir.version.sample_rate)
    settings = pipeline.PipelineSettings(
        prepare=prepare_stage, extract=extract_settings(flags, dataset), pack=pack_settings(flags, dataset),
        train=train_settings(flags, choice, model_dir, "train" in stage_slice(first, last)), merge=merge_settings(flags), from_stage=first, to_stage=last, force_stage=flags["force_stage"],
    )
    main_process = is_main_process()
    if main_process:
        click.echo(f"Device: {choice.describe()}")
    result = pipeline.run(settings, model_dir, choice, project)
    if not main_process:  # rank 0 reports for every process; the others only share its exit status
        if result.interrupted:
            sys.exit(EXIT_CODES[result.interrupted])
        return
    for stage in STAGES:
        if stage in result.details:
            click.echo(STAGE_LINES[stage](result.details[stage], project))
    for warning in result.qa_warnings:
        click.secho(f"QA warning: {warning}", fg="yellow")
    if result.interrupted:
        processes = result.details["train"].processes  # a resume needs as many
        click.secho(
            f"Stopped by {result.interrupted} in training at step {result.train_step}; continue with:\n"
            f"  python finetune_tts.py --project {quote(project.name)} --train --resume-latest" + (f" --gpus {processes}" if processes > 1 else ""),
            fg="yellow",
        )
        sys.exit(EXIT_CODES[result.interrupted])
    click.echo(f"Ran: {', '.join(result.ran) or 'nothing (all up to date)'}; up to date: {', '.join(result.skipped) or '-'}")
    if result.merged_dir:
        click.echo(f"Merged model: {result.merged_dir}")
        click.echo(f'Try it: python cli_tts.py "Hello from my new voice." --model-path {quote(result.merged_dir)} -o output/hello.wav')
    if result.test_clip:
        click.echo(f"Test clip: {result.test_clip}")
    if result.report:
        click.echo(f"Report: {result.report}")


def _extract_line(done: extract.ExtractResult, project) -> str:
    if not done.extracted:
        return f"Extract: all {done.skipped} clips up to date, nothing to do"
    rate = done.audio_seconds / done.seconds if done.seconds else 0.0
    return f"Extracted {done.extracted} clips ({done.audio_seconds:.0f} s of audio, {rate:.1f} audio-s/s); {done.skipped} were up to date"


def _pack_line(packed: pack.PackResult, project) -> str:
    state = "up to date" if packed.skipped else "written"
    return (f"Packed data {state}: {packed.train_utterances} train / {packed.val_utterances} validation utterances in {project.data_dir}"
            f"\nQA report: {project.data_dir / 'qa.md'}")


def _train_line(result: train.TrainResult, project) -> str:
    losses = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no steps needed"
    if result.val_loss is not None:
        losses += f", validation loss {result.val_loss:.4f}"
    batch = f"effective batch {result.effective_batch}" + (f" over {result.processes} processes" if result.processes > 1 else "")
    return f"Trained to step {result.step} ({losses}; {batch}). Checkpoints: {project.dir / 'checkpoints'}"


def _merge_line(result: merge.MergeResult, project) -> str:
    if result.skipped:
        return f"Merged model up to date: {result.merged_dir} (from {result.checkpoint.name}); adapters alone: {result.adapter_dir}"
    return (f"Merged {result.checkpoint.name} into {result.merged_dir} (merge check: max logit difference {result.max_logit_diff:.2e}); "
            f"adapters alone: {result.adapter_dir}")


def _prepare_line(prepared, project) -> str:
    counts = f"Prepared {prepared.clips} clips ({prepared.sources_done} sources processed, {prepared.transcribed} transcribed)"
    return "\n".join([counts, *prepare_notes(prepared)])


STAGE_LINES = {"prepare": _prepare_line, "extract": _extract_line, "pack": _pack_line, "train": _train_line, "merge": _merge_line}


def show_status(project: Project, write: bool) -> None:
    from fs_pipeline import pipeline
    from fs_pipeline.stages import merge

    rows = pipeline.status(project)
    click.echo(f"Project {project.name} ({project.dir}):")
    click.echo(f"  {'stage':<11} {'state':<36} {'completed':<26} seconds")
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        click.echo(f"  {row['stage']:<11} {row['state']:<36} {row['completed_at']:<26} {seconds}")
    if write:
        from fs_pipeline.report import write_report

        merged = merge.merged_path(project)
        report = write_report(project, project.manifest_path, merged if merged.exists() else None, project.dir / "test_clip.wav")
        click.echo(f"Report: {report}")


def format_checkpoints(project: Project) -> str:
    from fs_pipeline import checkpoints

    folder = project.dir / "checkpoints"
    infos = checkpoints.list_checkpoints(folder)
    damaged = checkpoints.unreadable(folder)
    lines = []
    if not infos:
        lines.append(f"No checkpoints in {folder} yet: train with --train.")
    else:
        lines.append(f"Checkpoints in {folder}:")
        if (base := checkpoints.base_scores(folder)) is not None:
            lines.append(f"  base model, before training:{_clip_scores(base.get('wer'), base.get('similarity'))}")
        for info in infos:
            val = f"{info.val_loss:.4f}" if info.val_loss is not None else "-"
            lines.append(f"  {info.path.name}  {info.size_mb:8.1f} MB  {info.created_at}  step {info.step:>7}  val_loss {val}"
                         f"{_clip_scores(info.wer, info.similarity)}")
        newest = infos[-1]
        lines.append(f"Latest: {newest.path.name} (step {newest.step})")
        top = checkpoints.best(folder)
        lines.append(f"Best:   {top.path.name} (val_loss {top.val_loss:.4f})" if top else "Best:   - (no validation loss recorded)")
        for by, label in (("wer", "WER"), ("similarity", "similarity"), ("combined", "combined (similarity - WER)")):
            if (top := checkpoints.best(folder, by)) is not None:
                lines.append(f"Best by {label}: {top.path.name} ({by} {getattr(top, by):.3f})")
    lines += [f"Unreadable (damaged or not ours): {path.name}" for path in damaged]
    return "\n".join(lines)


def _clip_scores(wer: float | None, similarity: float | None) -> str:
    scores = f"  wer {wer:.3f}" if wer is not None else ""
    return scores + (f"  similarity {similarity:.3f}" if similarity is not None else "")


def format_review(project: Project) -> str:
    """The clips the dataset QA flagged, each with its files, transcript and reasons, from qa.json."""
    import json

    from fs_pipeline.qa import clip_files, flagged_clips

    path = project.data_dir / "qa.json"
    if not path.is_file():
        raise PipelineError(f"no QA report in {project.data_dir}: run --extract-tokens first (packing writes it)")
    report = json.loads(path.read_text(encoding="utf-8"))
    flagged = flagged_clips(report)
    if not flagged:
        return f"No clip flagged in {path}: nothing to review."
    lines = [f"{len(flagged)} clip(s) flagged in {path}; listen to each, then fix its .lab or delete the clip with its .lab, and rerun:"]
    for clip in flagged:
        audio, transcript = (os.path.normpath(project.data_dir / name) for name in clip_files(report, clip["key"]))
        text = Path(transcript).read_text(encoding="utf-8").strip() if Path(transcript).is_file() else "(missing)"
        lines += ["", f"{audio}", f"  transcript ({transcript}): {text}"] + [f"  why: {flag}" for flag in clip["flags"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
