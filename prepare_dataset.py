"""Turn recordings into a speaker dataset (clips + transcripts). Run with --help."""

from pathlib import Path

import click

from fs_pipeline.audio.asr import BACKENDS
from fs_pipeline.cli import device_options, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.models import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, get_version
from fs_pipeline.stages import prepare


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--input", "inputs", multiple=True, required=True,
              help="A folder (searched recursively), an audio/video file, or a URL. Repeat for several.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Dataset folder: training_data/NAME.")
@click.option("--speaker", required=True, help="Speaker name: clips go to OUTPUT/SPEAKER/ (a folder of speaker subfolders keeps its names).")
@click.option("--youtube", is_flag=True, help="Treat every --input as a URL for yt-dlp (URLs are recognised anyway).")
@click.option("--normalize", is_flag=True, help="Normalise loudness (ITU-R BS.1770) to --target-lufs, without clipping.")
@click.option("--target-lufs", default=-23.0, show_default=True)
@click.option("--split-long", is_flag=True, help="Cut recordings into clips at pauses found by voice activity detection.")
@click.option("--segment-duration", default=10.0, show_default=True, help="Target clip length in seconds when splitting.")
@click.option("--min-clip-duration", default=2.0, show_default=True, help="Shortest clip kept, in seconds.")
@click.option("--max-clip-duration", default=30.0, show_default=True, help="Longest clip, in seconds; longer files need --split-long.")
@click.option("--max-duration", type=float, default=None, help="Use only the first N minutes of each source (decimals fine).")
@click.option("--auto-transcribe", is_flag=True, help="Transcribe each clip with Whisper (an existing .lab is kept).")
@click.option("--whisper-model", default="base", show_default=True, help="Whisper size (tiny, base, small, medium, large...) or a local model path.")
@click.option("--asr-backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: faster-whisper when installed, else openai-whisper.")
@click.option("--language", default="auto", show_default=True, help="Spoken language code (en, de, ...) or auto-detect.")
@click.option("--retranscribe", is_flag=True, help="Transcribe again even where a .lab exists.")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True,
              help="Clips are written at this model's codec sample rate.")
@device_options
@user_errors
def main(inputs, output, speaker, youtube, normalize, target_lufs, split_long, segment_duration, min_clip_duration,
         max_clip_duration, max_duration, auto_transcribe, whisper_model, asr_backend, language, retranscribe,
         model_version, device, force_mps) -> None:
    """Prepare a training dataset: OUTPUT/SPEAKER/*.wav + *.lab + dataset_summary.json.

    \b
      python prepare_dataset.py --input recordings/ --output training_data/alice --speaker alice \\
          --normalize --split-long --auto-transcribe
      python prepare_dataset.py --input "https://www.youtube.com/watch?v=..." --output training_data/bob --speaker bob \\
          --split-long --segment-duration 8 --max-duration 20 --auto-transcribe
    """
    setup_logging()
    settings = prepare.PrepareSettings(
        inputs=tuple(inputs), output=output, speaker=speaker, youtube=youtube, normalize=normalize, target_lufs=target_lufs,
        split_long=split_long, segment_duration=segment_duration, min_clip_duration=min_clip_duration,
        max_clip_duration=max_clip_duration, max_duration_minutes=max_duration, auto_transcribe=auto_transcribe,
        whisper_model=whisper_model, asr_backend=asr_backend, language=language, retranscribe=retranscribe,
        sample_rate=get_version(model_version).sample_rate,
    )
    result = prepare.run(settings, select_device(device, force_mps))
    for item in result.skipped:
        click.secho(f"skipped {item['input']}: {item['reason']}", fg="yellow")
    if result.sources_done == 0 and result.transcribed == 0:
        click.echo(f"Nothing to do: {result.clips} clips in {output} are up to date")
    else:
        click.echo(
            f"Prepared {result.clips} clips in {output} ({result.sources_done} sources processed, {result.transcribed} transcribed; "
            f"{result.audio_seconds:.0f} s of audio at {result.realtime_factor:.1f}x realtime)"
        )
    click.echo(f"Summary: {output / prepare.SUMMARY_FILE}")


if __name__ == "__main__":
    main()
