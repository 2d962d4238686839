"""What the three top-level scripts share: logging set-up and turning PipelineError into one red line."""

import errno
import functools
import sys

import click
from loguru import logger

from fs_pipeline import PipelineError


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """`quiet`: warnings and errors only (the processes of a torchrun other than rank 0, which logs for them)."""
    logger.remove()
    level = "DEBUG" if verbose else "WARNING" if quiet else "INFO"
    logger.add(sys.stderr, level=level, format="<level>{level: <7}</level> {message}")


def user_errors(fn):
    """Run a click command body; a PipelineError becomes `error: ...` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.secho("interrupted: nothing half-written is kept; rerun the same command to continue", fg="yellow", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            click.secho(f"error: no space left on the device while writing {e.filename or 'a file'}: free some space and rerun "
                        "(finished work is kept)", fg="red", err=True)
            sys.exit(1)

    return wrapper


def device_options(fn):
    # Plain strings, checked by select_device, so a wrong name gets our one-line error (and --help needs no torch).
    fn = click.option("--precision", default="auto", show_default=True,
                      help="auto, bf16, fp16 or fp32. auto: bf16 on GPUs that have it natively (compute capability 8.0+: A100, "
                           "RTX 30xx, H100), fp16 on V100, T4 and RTX 20xx, fp32 on older GPUs, MPS and CPU.")(fn)
    fn = click.option("--force-mps", is_flag=True, help="Use Apple MPS even though it falls back to CPU by default.")(fn)
    fn = click.option("--device", default=None, help="cuda, mps or cpu; overrides the automatic choice (cuda > mps > cpu).")(fn)
    return fn


def model_summary(model_dir, llm, codec, choice) -> str:
    from fs_pipeline.models import count_parameters

    return "\n".join(
        [
            f"  device         {choice.device} ({choice.reason})",
            f"  precision      {choice.precision}",
            f"  model version  {model_dir.version.name} (weights licence: {model_dir.license})",
            f"  base model     {model_dir.path}",
            f"  LLM            {count_parameters(llm):,} parameters, {model_dir.num_codebooks} codebooks",
            f"  codec          {count_parameters(codec):,} parameters, {model_dir.version.sample_rate} Hz",
        ]
    )


PREPARE_OPTIONS = [
    click.option("--youtube", is_flag=True, help="Treat every input as a URL for yt-dlp (URLs are recognised anyway)."),
    click.option("--normalize", is_flag=True, help="Normalise loudness (ITU-R BS.1770) to --target-lufs, without clipping."),
    click.option("--target-lufs", default=-23.0, show_default=True),
    click.option("--split-long", is_flag=True, help="Cut recordings into clips at pauses found by voice activity detection."),
    click.option("--segment-duration", default=10.0, show_default=True, help="Target clip length in seconds when splitting."),
    click.option("--min-clip-duration", default=2.0, show_default=True, help="Shortest clip kept, in seconds."),
    click.option("--max-clip-duration", default=30.0, show_default=True, help="Longest clip, in seconds; longer files need --split-long."),
    click.option("--max-duration", type=float, default=None, help="Use only the first N minutes of each source (decimals fine)."),
    click.option("--auto-transcribe", is_flag=True, help="Transcribe each clip with Whisper (an existing .lab is kept)."),
    click.option("--whisper-model", default="base", show_default=True, help="Whisper size (tiny, base, small, medium, large...) or a local model path."),
    click.option("--asr-backend", type=click.Choice(["auto", "faster-whisper", "openai-whisper"]), default="auto", show_default=True,
                 help="auto: faster-whisper when installed, else openai-whisper."),
    click.option("--asr-beam-size", default=5, show_default=True,
                 help="Whisper beam width: 5 (Whisper's default, with its temperature fallback) is the most accurate; 1 (greedy) "
                      "transcribes about 1.3x faster."),
    click.option("--language", default="auto", show_default=True, help="Spoken language code (en, de, ...) or auto-detect."),
    click.option("--retranscribe", is_flag=True, help="Transcribe again even where a .lab exists."),
    click.option("--keep-removed-sources", is_flag=True,
                 help="Keep the clips of sources no longer among the inputs (by default they are deleted and listed in the summary)."),
]


def prepare_options(fn):
    """The prepare stage's flags, shared by prepare_dataset.py and finetune_tts.py (one source of truth)."""
    for option in reversed(PREPARE_OPTIONS):
        fn = option(fn)
    return fn


def prepare_notes(result) -> list[str]:
    """What a prepare run tells the user beyond its counts: skipped inputs, removed sources, forced cuts and
    clips left without transcripts (prepare_dataset.py and finetune_tts.py print the same lines)."""
    notes = [f"skipped {item['input']}: {item['reason']}" for item in result.skipped]
    notes += [f"removed {len(item['clips'])} clips of {item['input']}: no longer an input (--keep-removed-sources keeps them)"
              for item in result.removed]
    if result.cuts_inside_speech or result.targets_missed:
        notes.append(f"{result.cuts_inside_speech} cuts inside speech without a pause (at the quietest point), {result.targets_missed} "
                     "clips off the --segment-duration target: both listed in the summary")
    if result.untranscribed:
        notes.append(f"warning: {len(result.untranscribed)} clips have no transcript: training needs a .lab beside each clip; "
                     "write them, or rerun with --auto-transcribe (only those clips are transcribed)")
    return notes


def prepare_settings(flags: dict, inputs: tuple[str, ...], output, speaker: str, sample_rate: int):
    from fs_pipeline.stages.prepare import PrepareSettings

    return PrepareSettings(
        inputs=inputs, output=output, speaker=speaker, youtube=flags["youtube"], normalize=flags["normalize"],
        target_lufs=flags["target_lufs"], split_long=flags["split_long"], segment_duration=flags["segment_duration"],
        min_clip_duration=flags["min_clip_duration"], max_clip_duration=flags["max_clip_duration"],
        max_duration_minutes=flags["max_duration"], auto_transcribe=flags["auto_transcribe"], whisper_model=flags["whisper_model"],
        asr_backend=flags["asr_backend"], asr_beam_size=flags["asr_beam_size"], language=flags["language"],
        retranscribe=flags["retranscribe"], keep_removed_sources=flags["keep_removed_sources"], sample_rate=sample_rate,
    )
