"""Synthesize speech with a fine-tuned (merged) Fish Speech model. Run with --help."""

import click

from fs_pipeline.cli import setup_logging, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def main() -> None:
    """Text to speech with a merged model directory (checkpoints/PROJECT-merged).

    Synthesis lands with the merge stage; this entry point holds its place.
    """
    setup_logging()
    raise click.UsageError("synthesis is not built yet (see --help)")


if __name__ == "__main__":
    main()
