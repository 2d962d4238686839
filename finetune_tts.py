"""Fine-tune Fish Speech on a prepared dataset. Run with --help for the stages and their flags."""

from pathlib import Path

import click

from fs_pipeline.cli import device_options, model_summary, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, load_codec, load_llm, open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.stages import extract, pack

DEFAULT_BASE_MODEL = Path("checkpoints/openaudio-s1-mini")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--project", help="Project name: outputs go to results/PROJECT/.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Prepared dataset: training_data/NAME (SPEAKER/*.wav + .lab).")
@click.option("--pretrained-ckpt-path", type=click.Path(path_type=Path), default=DEFAULT_BASE_MODEL, show_default=True,
              help="Base model directory in the release layout (config.json, model.pth, tokenizer, codec.pth).")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True,
              help="Which Fish Speech generation the base model is.")
@click.option("--check-model", is_flag=True, help="Validate and load the base model, print what was found, and exit.")
@click.option("--extract-tokens", is_flag=True,
              help="Encode every clip to semantic codes (<clip>.npy), then pack train/val data and the QA report into results/PROJECT/data/.")
@click.option("--batch-size-extract", default=16, show_default=True, help="Clips per codec batch (clips of similar length are batched together).")
@click.option("--num-workers-extract", default=4, show_default=True, help="DataLoader workers that decode and resample audio.")
@click.option("--val-fraction", default=0.05, show_default=True, help="Share of each speaker's clips held out for validation.")
@click.option("--split-seed", default=0, show_default=True, help="Seed of the held-out split.")
@device_options
@user_errors
def main(project, data_dir, pretrained_ckpt_path, model_version, check_model, extract_tokens,
         batch_size_extract, num_workers_extract, val_fraction, split_seed, device, force_mps) -> None:
    """Fine-tune a Fish Speech voice model with LoRA, in restartable stages.

    \b
    Check a downloaded base model:
      python finetune_tts.py --check-model --pretrained-ckpt-path checkpoints/openaudio-s1-mini
    Extract codes and pack the data (reruns skip clips whose audio and codec are unchanged):
      python finetune_tts.py --project P --data-dir training_data/NAME --extract-tokens
    """
    setup_logging()
    if not (check_model or extract_tokens):
        raise click.UsageError("nothing to do: pass --check-model or --extract-tokens (see --help)")
    choice = select_device(device, force_mps)
    model_dir = open_model_dir(pretrained_ckpt_path, model_version)
    if check_model:
        click.echo(model_summary(model_dir, load_llm(model_dir, choice), load_codec(model_dir, choice), choice))
    if extract_tokens:
        if not project or not data_dir:
            raise click.UsageError("--extract-tokens needs --project and --data-dir")
        run_extract_and_pack(Project(project), data_dir, model_dir, choice, batch_size_extract, num_workers_extract, val_fraction, split_seed)


def run_extract_and_pack(project, data_dir, model_dir, choice, batch_size, num_workers, val_fraction, split_seed) -> None:
    manifest = Manifest(project.manifest_path)
    click.echo(f"Device: {choice.describe()}")
    done = extract.run(extract.ExtractSettings(data_dir, batch_size, num_workers), model_dir, choice, manifest)
    if done.extracted:
        rate = done.audio_seconds / done.seconds if done.seconds else 0.0
        click.echo(f"Extracted {done.extracted} clips ({done.audio_seconds:.0f} s of audio, {rate:.1f} audio-s/s); {done.skipped} were up to date")
    else:
        click.echo(f"Extract: all {done.skipped} clips up to date, nothing to do")
    packed = pack.run(pack.PackSettings(data_dir, val_fraction, split_seed), model_dir, project, manifest)
    state = "up to date" if packed.skipped else "written"
    click.echo(f"Packed data {state}: {packed.train_utterances} train / {packed.val_utterances} validation utterances in {project.data_dir}")
    for warning in packed.warnings:
        click.secho(f"QA warning: {warning}", fg="yellow")
    click.echo(f"QA report: {project.data_dir / 'qa.md'}")


if __name__ == "__main__":
    main()
