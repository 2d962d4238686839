"""Turn recordings into a speaker dataset (clips + transcripts). Run with --help.

torch and the audio stack are imported inside main(), so that --help and a wrong flag answer at once.
"""

from pathlib import Path

import click

from fs_pipeline.cli import device_options, prepare_notes, prepare_options, prepare_settings, setup_logging, user_errors
from fs_pipeline.versions import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, get_version


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--input", "inputs", multiple=True, required=True,
              help="A folder (searched recursively), an audio/video file, or a URL. Repeat for several.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Dataset folder: training_data/NAME.")
@click.option("--speaker", required=True, help="Speaker name: clips go to OUTPUT/SPEAKER/ (a folder of speaker subfolders keeps its names).")
@prepare_options
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True,
              help="Clips are written at this model's codec sample rate.")
@device_options
@user_errors
def main(inputs, output, speaker, model_version, device, force_mps, precision, **flags) -> None:
    """Prepare a training dataset: OUTPUT/SPEAKER/*.wav + *.lab + dataset_summary.json.

    \b
      python prepare_dataset.py --input recordings/ --output training_data/alice --speaker alice \\
          --normalize --split-long --auto-transcribe
      python prepare_dataset.py --input "https://www.youtube.com/watch?v=..." --output training_data/bob --speaker bob \\
          --split-long --segment-duration 8 --max-duration 20 --auto-transcribe
    """
    from fs_pipeline.device import select_device
    from fs_pipeline.stages import prepare

    setup_logging()
    settings = prepare_settings(flags, tuple(inputs), output, speaker, get_version(model_version).sample_rate)
    result = prepare.run(settings, select_device(device, force_mps, precision))
    for note in prepare_notes(result):
        click.secho(note, fg="yellow" if note.startswith(("skipped", "warning")) else None)
    if result.sources_done == 0 and result.transcribed == 0 and not result.removed:
        click.echo(f"Nothing to do: {result.clips} clips in {output} are up to date")
    else:
        click.echo(
            f"Prepared {result.clips} clips in {output} ({result.sources_done} sources processed, {result.transcribed} transcribed; "
            f"{result.audio_seconds:.0f} s of audio at {result.realtime_factor:.1f}x realtime)"
        )
    click.echo(f"Summary: {output / prepare.SUMMARY_FILE}")


if __name__ == "__main__":
    main()
