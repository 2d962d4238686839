"""Turn recordings into a speaker dataset (clips + transcripts). Run with --help."""

import click

from fs_pipeline.cli import setup_logging, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def main() -> None:
    """Prepare a training dataset: training_data/NAME/SPEAKER/*.wav + *.lab + dataset_summary.json.

    Decoding, loudness normalisation, VAD segmentation and transcription land with the prepare
    stage. Until then, lay out a dataset by hand: one folder per speaker holding 44.1 kHz mono
    clips, each with a .lab file of its exact transcript.
    """
    setup_logging()
    raise click.UsageError("the prepare stage is not built yet: lay out the dataset by hand (see --help)")


if __name__ == "__main__":
    main()
