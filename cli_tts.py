"""Synthesize speech with a fine-tuned (merged) Fish Speech model. Run with --help."""

import shutil
import subprocess
from pathlib import Path

import click

from fs_pipeline import PipelineError
from fs_pipeline.cli import device_options, setup_logging, user_errors
from fs_pipeline.device import select_device
from fs_pipeline.models import DEFAULT_MODEL_VERSION, MODEL_VERSIONS, open_model_dir
from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer

PLAYERS = [["ffplay", "-nodisp", "-autoexit", "-loglevel", "quiet"], ["afplay"], ["paplay"], ["aplay", "-q"], ["play", "-q"]]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("text", required=False)
@click.option("--model-path", required=True, type=click.Path(path_type=Path),
              help="A merged model dir (checkpoints/PROJECT-merged), or a base model dir with --lora.")
@click.option("--lora", type=click.Path(path_type=Path), help="Adapters on top of --model-path: checkpoints/PROJECT-lora or a step_*.ckpt.")
@click.option("--model-version", type=click.Choice(sorted(MODEL_VERSIONS)), default=DEFAULT_MODEL_VERSION, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("output/tts.wav"), show_default=True, help="Where to write the wav.")
@click.option("--text-file", type=click.Path(path_type=Path), help="Speak each non-empty line of this file, one wav per line, into --output-dir.")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("output"), show_default=True)
@click.option("--reference-audio", type=click.Path(path_type=Path), help="A clip of the voice to imitate (voice prompting).")
@click.option("--reference-text", default="", help="The exact words spoken in --reference-audio.")
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-p", default=0.8, show_default=True)
@click.option("--max-new-frames", default=1024, show_default=True, help="Upper bound on generated audio frames (21.5 per second for s1-mini).")
@click.option("--compile", "compile_step", is_flag=True,
              help="Compile the per-frame step into CUDA graphs: the first text waits about a minute, later frames come several times faster.")
@click.option("--play", is_flag=True, help="Play the result through ffplay, afplay, paplay, aplay or sox's play.")
@device_options
@user_errors
def main(text, model_path, lora, model_version, output, text_file, output_dir, reference_audio, reference_text,
         seed, temperature, top_p, max_new_frames, compile_step, play, device, force_mps) -> None:
    """Speak TEXT with a fine-tuned Fish Speech model.

    \b
      python cli_tts.py "Testing our trained model" --model-path checkpoints/P-merged -o output/test.wav --play
      python cli_tts.py --text-file lines.txt --model-path checkpoints/P-merged --output-dir output/lines
      python cli_tts.py "Hello" --model-path checkpoints/openaudio-s1-mini --lora checkpoints/P-lora
    """
    setup_logging()
    if text_file:
        if not text_file.is_file():
            raise PipelineError(f"text file not found: {text_file}")
        jobs = [(line.strip(), output_dir / f"line_{i:04d}.wav") for i, line in enumerate(text_file.read_text().splitlines()) if line.strip()]
        if not jobs:
            raise PipelineError(f"{text_file} has no non-empty lines: put one sentence per line")
    else:
        if not text or not text.strip():
            raise PipelineError('no text to speak: pass it as an argument (cli_tts.py "Hello there" ...) or use --text-file')
        jobs = [(text, output)]

    choice = select_device(device, force_mps)
    synthesizer = Synthesizer(open_model_dir(model_path, model_version), choice, lora, compile=compile_step)
    if reference_audio:
        synthesizer.set_reference(reference_audio, reference_text)
    settings = SynthesisSettings(temperature=temperature, top_p=top_p, max_new_frames=max_new_frames, seed=seed)
    for line, path in jobs:
        result = synthesizer.speak(line, path, settings)
        click.echo(f"Wrote {result.path} ({result.audio_seconds:.2f} s of audio, {result.frames} frames, realtime factor {result.realtime_factor:.2f}x)")
        if play:
            play_wav(result.path)


def play_wav(path: Path) -> None:
    for player in PLAYERS:
        if shutil.which(player[0]):
            subprocess.run([*player, str(path)], check=False)
            return
    click.secho("--play: no audio player found (install ffmpeg, sox or alsa-utils); the file is written", fg="yellow")


if __name__ == "__main__":
    main()
