"""Synthesize speech with a fine-tuned (merged) Fish Speech model. Run with --help.

torch and the model code are imported inside main(), once the flags are checked, so that --help and a
wrong flag answer at once.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import click
from click.core import ParameterSource

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import AUDIO_FORMATS, check_audio_path, write_audio
from fs_pipeline.cli import device_options, setup_logging, user_errors
from fs_pipeline.fileio import write_text_atomic
from fs_pipeline.versions import DEFAULT_MODEL_VERSION, MODEL_VERSIONS

PLAYERS = [["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet"], ["afplay"], ["paplay"], ["aplay", "-q"], ["play", "-q"]]
# --stream --play: players that read raw mono float32 samples from stdin as they come ({rate}: the sample rate)
STREAM_PLAYERS = [["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet", "-f", "f32le", "-ar", "{rate}", "-"],
                  ["paplay", "--raw", "--format=float32le", "--rate={rate}", "--channels=1"],
                  ["aplay", "-q", "-t", "raw", "-f", "FLOAT_LE", "-r", "{rate}", "-c", "1"],
                  ["play", "-q", "-t", "f32", "-r", "{rate}", "-c", "1", "-"]]
FORMATS = ", ".join(AUDIO_FORMATS)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("text", required=False)
@click.option("--model-path", required=True, type=click.Path(path_type=Path),
              help="A merged model dir (checkpoints/PROJECT-merged), or a base model dir with --lora.")
@click.option("--lora", type=click.Path(path_type=Path), help="Adapters on top of --model-path: checkpoints/PROJECT-lora or a step_*.ckpt.")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True)
@click.option("-o", "--output", metavar="FILE", default="output/tts.wav", show_default=True,
              help=f"The audio file to write; its extension picks the format: {FORMATS}.")
@click.option("--text-file", type=click.Path(path_type=Path),
              help="Speak each non-empty line of this file into --output-dir: line_0001.wav, line_0002.wav, ... "
                   "and lines.tsv (file name, a tab, the text).")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("output"), show_default=True, help="Where --text-file writes.")
@click.option("--reference-audio", type=click.Path(path_type=Path), help="A clip of the voice to imitate (voice prompting).")
@click.option("--reference-text", help="The exact words spoken in --reference-audio.")
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), metavar="FLOAT", default=0.8, show_default=True, help="0 always takes the likeliest code.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), metavar="FLOAT", default=0.8, show_default=True)
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), metavar="FLOAT", default=1.1, show_default=True,
              help="Makes codes of the last 16 frames less likely, as fish-speech does; 1 turns it off.")
@click.option("--max-new-frames", type=click.IntRange(min=1), metavar="INTEGER", default=1024, show_default=True,
              help="Upper bound on generated audio frames (21.5 per second for s1-mini).")
@click.option("--compile", "compile_step", is_flag=True,
              help="Compile the per-frame step (on CUDA, replayed as one CUDA graph per frame): frames come many times faster "
                   "after a warm-up of minutes on the first run, and of seconds once the compiled kernels are cached "
                   "($XDG_CACHE_HOME/fs-pipeline/compile, else ~/.cache/fs-pipeline/compile).")
@click.option("--stream", is_flag=True,
              help="Hand out audio while it is generated: with --play, the player starts after the first chunk (0.7 s of audio); "
                   "the time to the first chunk is printed. The file is written once complete.")
@click.option("--play", is_flag=True, help="Play the result through ffplay, afplay, paplay, aplay or sox's play.")
@device_options
@user_errors
def main(text, model_path, lora, model_version, output, text_file, output_dir, reference_audio, reference_text,
         seed, temperature, top_p, repetition_penalty, max_new_frames, compile_step, stream, play, device, force_mps, precision) -> None:
    """Speak TEXT with a fine-tuned Fish Speech model.

    \b
      python cli_tts.py "Testing our trained model" --model-path checkpoints/P-merged -o output/test.wav --play
      python cli_tts.py --text-file lines.txt --model-path checkpoints/P-merged --output-dir output/lines
      python cli_tts.py "Hello" --model-path checkpoints/openaudio-s1-mini --lora checkpoints/P-lora
    """
    started = time.perf_counter()
    setup_logging()
    jobs = text_file_jobs(text, text_file, output_dir) if text_file else [single_job(text, output, output_dir)]
    check_reference(reference_audio, reference_text)

    from fs_pipeline.device import select_device
    from fs_pipeline.models import open_model_dir
    from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer, default_compile_cache

    choice = select_device(device, force_mps, precision)
    cache = default_compile_cache(os.environ) if compile_step else None
    synthesizer = Synthesizer(open_model_dir(model_path, model_version), choice, lora, compile=compile_step, compile_cache=cache)
    if reference_audio:
        synthesizer.set_reference(reference_audio, reference_text)
    click.echo(f"Start-up: {time.perf_counter() - started:.1f} s (model and codec loaded on {choice.describe()})")
    if compile_step:
        cached = synthesizer.cache_file.is_file()
        click.echo(f"Warming up the compiled step ({'from the cache' if cached else 'compiling: minutes on the first run'}; "
                   f"{synthesizer.cache_file.parent})...")
        click.echo(f"Warm-up: {synthesizer.warm_up():.1f} s ({time.perf_counter() - started:.1f} s from start)")

    settings = SynthesisSettings(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                 max_new_frames=max_new_frames, seed=seed)
    spoken, silent = [], []
    for line, path in jobs:
        if stream:
            player = ChunkPlayer(synthesizer.model_dir.version.sample_rate) if play else None
            begun = time.perf_counter()
            speech = synthesizer.stream(line, settings, player.write if player else lambda chunk: None)
            if player and not player.close():
                play = False  # no sound for one text: none for the next either
            if speech.first_audio is not None:
                click.echo(f"First audio after {speech.first_audio:.2f} s of generation, "
                           f"{begun - started + speech.first_audio:.1f} s from start")
        else:
            speech = synthesizer.render(line, settings)
        if not speech.frames:
            silent.append(path.name)
            if text_file:
                click.secho(f"warning: no audio for {path.name} ({line!r}): the model ended it before any frame", fg="yellow", err=True)
            continue
        write_audio(path, speech.audio, speech.sample_rate)
        click.echo(f"Wrote {path}: {speech.audio_seconds:.2f} s of audio ({speech.frames} frames) in {speech.seconds:.2f} s, "
                   f"{speech.realtime_factor:.2f}× realtime")
        if speech.cut_off == "max_new_frames":
            click.secho(f"note: {path} stops at --max-new-frames {max_new_frames}, before the model ended the text: "
                        "the audio may be cut short; raise --max-new-frames", fg="yellow", err=True)
        elif speech.cut_off == "max_seq_len":
            click.secho(f"note: {path} stops where the model's context is full, before the model ended the text: "
                        "the audio may be cut short; speak a shorter text or use a shorter reference", fg="yellow", err=True)
        if text_file:
            spoken.append(f"{path.name}\t{line}\n")
            write_text_atomic(output_dir / "lines.tsv", "file\ttext\n" + "".join(spoken))
        if play and not stream and not play_audio(path):
            play = False  # no sound for one file: none for the next either
    if silent and not text_file:
        raise PipelineError(f"the model ended the text before any audio frame (--seed {seed}, --temperature {temperature}): "
                            "nothing written; try another --seed")
    if silent:
        raise PipelineError(f"{len(silent)} of {len(jobs)} lines gave no audio ({', '.join(silent)}): the others and lines.tsv "
                            "are written; speak those lines again with another --seed")


def single_job(text: str | None, output: str, output_dir: Path) -> tuple[str, Path]:
    """(TEXT, the -o file), once the flags are known to make sense together."""
    if click.get_current_context().get_parameter_source("output_dir") != ParameterSource.DEFAULT:
        raise PipelineError(f"--output-dir {output_dir} is for --text-file; for one text, name the file with -o")
    if not text or not text.strip():
        raise PipelineError('no text to speak: pass it as an argument (cli_tts.py "Hello there" ...) or use --text-file')
    # Path() drops a trailing slash, which says "a folder" as clearly as an existing folder does
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise PipelineError(f"-o {output} is a folder: name the file to write (-o {Path(output) / 'tts.wav'}), "
                            "or use --text-file with --output-dir for several files")
    check_audio_path(Path(output))
    check_folder(Path(output).parent, "-o")
    return text, Path(output)


def text_file_jobs(text: str | None, text_file: Path, output_dir: Path) -> list[tuple[str, Path]]:
    """(line, file) for each non-empty line of `text_file`, numbered from line_0001.wav without gaps."""
    if text is not None:
        raise PipelineError(f"give the text as an argument or with --text-file, not both: {text!r} would not be spoken")
    if click.get_current_context().get_parameter_source("output") != ParameterSource.DEFAULT:
        raise PipelineError("-o names one file, but --text-file writes one file per line into --output-dir: drop -o")
    if not text_file.is_file():
        raise PipelineError(f"text file not found: {text_file}")
    check_folder(output_dir, "--output-dir")
    lines = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PipelineError(f"{text_file} has no non-empty lines: put one sentence per line")
    return [(line, output_dir / f"line_{number:04d}.wav") for number, line in enumerate(lines, start=1)]


def check_folder(folder: Path, flag: str) -> None:
    """Refuse a folder to write into that can't exist, because it or one above it is a file."""
    for existing in [folder, *folder.parents]:
        if existing.exists():
            if not existing.is_dir():
                raise PipelineError(f"{flag}: {existing} is a file, so nothing can be written into {folder}: choose another path")
            return


def check_reference(audio: Path | None, text: str | None) -> None:
    if audio is None and text is not None:
        raise PipelineError("--reference-text needs --reference-audio, the clip in which those words are spoken")
    if audio is not None and not audio.is_file():
        raise PipelineError(f"reference audio not found: {audio}")
    if audio is not None and not (text or "").strip():
        raise PipelineError("--reference-audio needs --reference-text, the exact words spoken in it")


class ChunkPlayer:
    """--stream --play: the first installed player of STREAM_PLAYERS, fed each chunk of samples as it comes."""

    def __init__(self, sample_rate: int):
        self.process, self.name = None, None
        for player in STREAM_PLAYERS:
            if shutil.which(player[0]):
                self.name = player[0]
                self.process = subprocess.Popen([arg.format(rate=sample_rate) for arg in player], stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                return
        click.secho("note: --play: no player that reads a stream found (install ffmpeg, sox, pulseaudio-utils or alsa-utils); "
                    "the file is written", fg="yellow", err=True)

    def write(self, chunk) -> None:
        if self.process is None:
            return
        try:
            self.process.stdin.write(chunk.astype("<f4").tobytes())
            self.process.stdin.flush()
        except BrokenPipeError:  # the player quit (no sound device, say): close() says why
            pass

    def close(self) -> bool:
        """Wait for the player to finish; False, after one line saying why, where it could not play."""
        if self.process is None:
            return False
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        problem = self.process.stderr.read().decode(errors="replace").strip().splitlines()
        if self.process.wait() == 0 and not problem:
            return True
        reason = problem[-1] if problem else f"exit status {self.process.returncode}"
        click.secho(f"note: --play: {self.name} could not play the stream ({reason}); the file is written", fg="yellow", err=True)
        return False


def play_audio(path: Path) -> bool:
    """Play `path` with the first player installed; False, after one line saying why, where it could not."""
    for player in PLAYERS:
        if shutil.which(player[0]):
            done = subprocess.run([*player, str(path)], capture_output=True, text=True)
            # Without a sound device, ffplay still exits 0: the sound library's errors on stderr are the sign.
            problem = done.stderr.strip().splitlines()
            if done.returncode == 0 and not problem:
                return True
            reason = problem[-1] if problem else f"exit status {done.returncode}"
            click.secho(f"note: --play: {player[0]} could not play {path} ({reason}); the file is written", fg="yellow", err=True)
            return False
    click.secho("note: --play: no audio player found (install ffmpeg, sox or alsa-utils); the file is written", fg="yellow", err=True)
    return False


if __name__ == "__main__":
    main()
