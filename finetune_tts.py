"""Fine-tune Fish Speech on a prepared dataset. Run with --help for the stages and their flags."""

from pathlib import Path

import click

from fs_pipeline.cli import device_options, model_summary, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.models import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, load_codec, load_llm, open_model_dir

DEFAULT_BASE_MODEL = Path("checkpoints/openaudio-s1-mini")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pretrained-ckpt-path", type=click.Path(path_type=Path), default=DEFAULT_BASE_MODEL, show_default=True,
              help="Base model directory in the release layout (config.json, model.pth, tokenizer, codec.pth).")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True,
              help="Which Fish Speech generation the base model is.")
@click.option("--check-model", is_flag=True, help="Validate and load the base model, print what was found, and exit.")
@device_options
@user_errors
def main(pretrained_ckpt_path: Path, model_version: str, check_model: bool, device: str | None, force_mps: bool) -> None:
    """Fine-tune a Fish Speech voice model with LoRA.

    Stages (extract, pack, train, merge) are added here as they land; today this checks a base model:

      python finetune_tts.py --check-model --pretrained-ckpt-path checkpoints/openaudio-s1-mini
    """
    setup_logging()
    if not check_model:
        raise click.UsageError("nothing to do: pass --check-model (see --help)")
    choice = select_device(device, force_mps)
    model_dir = open_model_dir(pretrained_ckpt_path, model_version)
    llm, codec = load_llm(model_dir, choice), load_codec(model_dir, choice)
    click.echo(model_summary(model_dir, llm, codec, choice))


if __name__ == "__main__":
    main()
