"""The demo: the pipeline on the built-in sample with a generated tiny base model.

    python -m fs_pipeline.demo [--workdir .]

Writes checkpoints/tiny-<version>/ (the tiny base model) and training_data/sample/ (the sample
dataset), loads the model through the same loader a real release uses, and prints a summary.
"""

from pathlib import Path

import click
import torch

from fs_pipeline.cli import device_options, model_summary, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.models import DEFAULT_MODEL_VERSION, load_codec, load_llm, open_model_dir
from fs_pipeline.audio.io import read_wav
from fs_pipeline.sample import write_sample_dataset
from fs_pipeline.tiny_model import write_tiny_model


@click.command()
@click.option("--workdir", default=".", type=click.Path(file_okay=False, path_type=Path), show_default=True,
              help="Where checkpoints/ and training_data/ are written.")
@click.option("--model-version", default=DEFAULT_MODEL_VERSION, show_default=True)
@device_options
@user_errors
def main(workdir: Path, model_version: str, device: str | None, force_mps: bool) -> None:
    """Run fs-pipeline end to end on the built-in sample with a generated tiny model."""
    setup_logging()
    choice = select_device(device, force_mps)

    model_path = write_tiny_model(workdir / "checkpoints" / f"tiny-{model_version}", seed=0, version_name=model_version)
    model_dir = open_model_dir(model_path, model_version)
    dataset = write_sample_dataset(workdir / "training_data" / "sample", model_dir.version.sample_rate)

    llm = load_llm(model_dir, choice)
    codec = load_codec(model_dir, choice)
    first_clip = sorted(dataset.glob("*/*.wav"))[0]
    audio = torch.from_numpy(read_wav(first_clip, model_dir.version.sample_rate)).to(choice.device)
    with torch.inference_mode():
        codes, _ = codec.encode(audio[None, None])

    click.echo("\nfs-pipeline demo summary")
    click.echo(model_summary(model_dir, llm, codec, choice))
    click.echo(f"  sample data    {dataset} ({len(list(dataset.glob('*/*.wav')))} clips)")
    click.echo(f"  codec check    {first_clip.name} -> codes {tuple(codes.shape[1:])}")


if __name__ == "__main__":
    main()
