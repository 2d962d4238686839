"""The demo: the pipeline on the built-in sample with a generated tiny base model.

    python -m fs_pipeline.demo [--workdir .] [--steps 30]

Writes checkpoints/tiny-<version>/ (the tiny base model) and training_data/sample/ (the sample
dataset), then runs extract -> pack -> train -> merge -> synthesize through the same stage code as
finetune_tts.py and cli_tts.py, into results/demo/, checkpoints/demo-merged/ and output/demo.wav.
A rerun skips what is done.
"""

from pathlib import Path

import click
import torch

from fs_pipeline import checkpoints
from fs_pipeline.audio.io import read_wav
from fs_pipeline.cli import device_options, model_summary, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import DEFAULT_MODEL_VERSION, load_codec, load_llm, open_model_dir
from fs_pipeline.project import Project
from fs_pipeline.sample import write_sample_dataset
from fs_pipeline.stages import extract, merge, pack, train
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer
from fs_pipeline.tiny_model import write_tiny_model

DEMO_TEXT = "Hello from a voice model trained on six sentences."


@click.command()
@click.option("--workdir", default=".", type=click.Path(file_okay=False, path_type=Path), show_default=True,
              help="Where checkpoints/, training_data/, results/ and output/ are written.")
@click.option("--model-version", default=DEFAULT_MODEL_VERSION, show_default=True)
@click.option("--steps", default=30, show_default=True, help="Training steps.")
@device_options
@user_errors
def main(workdir: Path, model_version: str, steps: int, device: str | None, force_mps: bool) -> None:
    """Run fs-pipeline end to end on the built-in sample with a generated tiny model."""
    setup_logging()
    choice = select_device(device, force_mps)

    model_path = workdir / "checkpoints" / f"tiny-{model_version}"
    if not (model_path / "model.pth").is_file():
        write_tiny_model(model_path, seed=0, version_name=model_version)
    model_dir = open_model_dir(model_path, model_version)
    dataset = workdir / "training_data" / "sample"
    if not (dataset / "dataset_summary.json").is_file():
        write_sample_dataset(dataset, model_dir.version.sample_rate)

    project = Project("demo", root=workdir / "results")
    manifest = Manifest(project.manifest_path)
    extracted = extract.run(extract.ExtractSettings(dataset, num_workers=0), model_dir, choice, manifest)
    packed = pack.run(pack.PackSettings(dataset), model_dir, project, manifest)
    latest = checkpoints.latest(project.dir / "checkpoints")
    trained = train.run(
        train.TrainSettings(max_steps=steps, batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=10,
                            resume_from=latest.path if latest else None),
        model_dir, choice, project,
    )
    merged = merge.run(merge.MergeSettings(output_root=workdir / "checkpoints"), model_dir, choice, project)
    speech = Synthesizer(open_model_dir(merged.merged_dir, model_version), choice).speak(
        DEMO_TEXT, workdir / "output" / "demo.wav", SynthesisSettings(max_new_frames=200)
    )

    first_clip = sorted(dataset.glob("*/*.wav"))[0]
    audio = torch.from_numpy(read_wav(first_clip, model_dir.version.sample_rate)).to(choice.device)
    with torch.inference_mode():
        codes, _ = load_codec(model_dir, choice).encode(audio[None, None])

    click.echo("\nfs-pipeline demo summary")
    click.echo(model_summary(model_dir, load_llm(model_dir, choice), load_codec(model_dir, choice), choice))
    click.echo(f"  sample data    {dataset} ({extracted.extracted + extracted.skipped} clips; {first_clip.name} -> codes {tuple(codes.shape[1:])})")
    click.echo(f"  extract        {extracted.extracted} clips encoded, {extracted.skipped} up to date")
    click.echo(f"  pack           {packed.train_utterances} train / {packed.val_utterances} validation utterances in {project.data_dir}"
               f"{' (up to date)' if packed.skipped else ''}")
    losses = f"train loss {trained.train_loss:.3f}, validation loss {trained.val_loss:.3f}" if trained.train_loss else "already trained"
    click.echo(f"  train          step {trained.step} ({losses}); checkpoints in {project.dir / 'checkpoints'}")
    click.echo(f"  merge          {merged.merged_dir} from {merged.checkpoint.name}{' (up to date)' if merged.skipped else ''}")
    click.echo(f"  synthesis      {speech.path} ({speech.audio_seconds:.1f} s of audio, realtime factor {speech.realtime_factor:.1f}x)")
    click.echo("  (random tiny weights: the clip is noise; point --pretrained-ckpt-path at a real release for speech)")


if __name__ == "__main__":
    main()
