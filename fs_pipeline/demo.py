"""The demo: the full pipeline on the built-in sample with a generated tiny base model.

    python -m fs_pipeline.demo [--workdir .] [--steps 30]

Writes checkpoints/tiny-<version>/ (the tiny base model) and training_data/sample/ (the sample
dataset), then runs the same pipeline as `finetune_tts.py --full-pipeline` (extract -> pack -> train ->
merge -> test clip) into results/demo/ and checkpoints/demo-merged/. A rerun skips what is done.
"""

from pathlib import Path

import click

from fs_pipeline import checkpoints, pipeline
from fs_pipeline.cli import device_options, model_summary, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.models import DEFAULT_MODEL_VERSION, load_codec, load_llm, open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.sample import write_sample_dataset
from fs_pipeline.stages import extract, merge, pack, train
from fs_pipeline.stages.synthesize import SynthesisSettings
from fs_pipeline.tiny_model import write_tiny_model


@click.command()
@click.option("--workdir", default=".", type=click.Path(file_okay=False, path_type=Path), show_default=True,
              help="Where checkpoints/, training_data/, results/ and output/ are written.")
@click.option("--model-version", default=DEFAULT_MODEL_VERSION, show_default=True)
@click.option("--steps", default=30, show_default=True, help="Training steps.")
@device_options
@user_errors
def main(workdir: Path, model_version: str, steps: int, device: str | None, force_mps: bool, precision: str) -> None:
    """Run fs-pipeline end to end on the built-in sample with a generated tiny model."""
    setup_logging()
    choice = select_device(device, force_mps, precision)

    model_path = workdir / "checkpoints" / f"tiny-{model_version}"
    if not (model_path / "config.json").is_file():
        write_tiny_model(model_path, seed=0, version_name=model_version)
    model_dir = open_model_dir(model_path, model_version)
    dataset = workdir / "training_data" / "sample"
    if not (dataset / "dataset_summary.json").is_file():
        write_sample_dataset(dataset, model_dir.version.sample_rate)

    project = Project("demo", root=workdir / "results")
    settings = pipeline.PipelineSettings(
        prepare=None,
        extract=extract.ExtractSettings(dataset, num_workers=0),
        pack=pack.PackSettings(dataset),
        train=train.TrainSettings(max_steps=steps, batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=10),
        merge=merge.MergeSettings(output_root=workdir / "checkpoints"),
        synthesis=SynthesisSettings(max_new_frames=200),
    )
    result = pipeline.run(settings, model_dir, choice, project)

    click.echo("\nfs-pipeline demo summary")
    click.echo(model_summary(model_dir, load_llm(model_dir, choice), load_codec(model_dir, choice), choice))
    click.echo(f"  sample data    {dataset} ({len(list(dataset.glob('*/*.wav')))} clips spoken by espeak-ng)")
    click.echo(f"  stages run     {', '.join(result.ran) or 'none (all up to date)'}")
    click.echo(f"  up to date     {', '.join(result.skipped) or '-'}")
    best = checkpoints.best(project.dir / "checkpoints")
    click.echo(f"  training       step {steps}; best validation loss {best.val_loss:.3f} ({best.path.name})")
    click.echo(f"  merged model   {result.merged_dir}")
    click.echo(f"  test clip      {result.test_clip} (random tiny weights: expect noise, not speech)")
    click.echo(f"  report         {result.report}")


if __name__ == "__main__":
    main()
