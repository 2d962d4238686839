"""The command-line contract of the three scripts (issue 18), each item tried with the real command on the tiny
model: what they refuse before any work, what they write, and what they say."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from fs_pipeline import PipelineError
from fs_pipeline.audio import io
from tests.conftest import REPO, cli

TEXT = "Hello there."
LINES = ["First line.", "Second line.", "Third line."]

# Runs `cli_tts.py ARGS`, then says on a last line of stderr whether torch was imported: a command refused
# before any work never imports it, and that is what keeps --help and flag errors fast.
WRAPPER = """import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])  # as `python cli_tts.py` has it
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def tts(args, cwd, env=None):
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(REPO / "cli_tts.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, env=env)
    lines = done.stderr.splitlines()
    markers = [line for line in lines if line.startswith("torch imported:")]
    assert len(markers) == 1, done.stderr
    stderr = "".join(f"{line}\n" for line in lines if line not in markers)
    return SimpleNamespace(returncode=done.returncode, stdout=done.stdout, stderr=stderr, torch=markers[0].endswith("True"))


def assert_refused(done, message):
    """Exit status 1, one line that starts with `message`, and no work done: torch was never imported."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(f"error: {message}"), done.stderr
    assert not done.torch


@pytest.fixture(scope="module")
def seeds(tiny_model_path, cpu):
    """Seeds that make the tiny random model behave as a test needs, found with the library itself."""
    from fs_pipeline.models import open_model_dir
    from fs_pipeline.stages.synthesize import SynthesisSettings, Synthesizer

    synthesizer = Synthesizer(open_model_dir(tiny_model_path), cpu)

    def first_seed(wanted):
        seed = next((seed for seed in range(3000) if wanted(seed)), None)
        assert seed is not None, "no seed does it: the tiny model has changed, adjust the test"
        return seed

    def frames(text, seed, **settings):
        return synthesizer.generate(text, SynthesisSettings(seed=seed, **settings)).shape[1]

    return SimpleNamespace(
        # the model ends the text at once (at top-p 0.8 the end token is rarely in the nucleus of this model)
        silent=first_seed(lambda seed: frames(TEXT, seed, temperature=1.0, top_p=1.0, max_new_frames=1) == 0),
        # every text gets past 3 frames
        talking=first_seed(lambda seed: all(frames(text, seed, max_new_frames=3) == 3 for text in [TEXT, *LINES])),
    )


@pytest.fixture(scope="module")
def spoken(tiny_model_path, seeds, tmp_path_factory):
    """One run of `cli_tts.py TEXT -o speech.mp3 --max-new-frames 3 --play` where the only audio player
    finds no sound device, as on a server: it prints the sound library's errors and exits 0, as ffplay does."""
    work = tmp_path_factory.mktemp("spoken")
    player = work / "bin" / "ffplay"
    player.parent.mkdir()
    player.write_text("#!/bin/sh\n" + "echo 'ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM default' >&2\n" * 3)
    player.chmod(0o755)
    env = {**os.environ, "PATH": f"{player.parent}{os.pathsep}{os.environ['PATH']}"}
    done = tts([TEXT, "--model-path", tiny_model_path, "-o", "speech.mp3", "--max-new-frames", "3", "--seed", seeds.talking,
                "--device", "cpu", "--play"], work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    return work, done


def test_help_does_not_import_torch(tmp_path):
    done = tts(["--help"], tmp_path)
    assert done.returncode == 0 and "--repetition-penalty" in done.stdout
    assert not done.torch


@pytest.mark.parametrize("output", ["out", "out/", "new/", "new/more/"])
def test_output_that_names_a_folder_is_refused_before_work(output, tiny_model_path, tmp_path):
    (tmp_path / "out").mkdir()
    done = tts([TEXT, "--model-path", tiny_model_path, "-o", output], tmp_path)
    assert_refused(done, f"-o {output} is a folder: name the file to write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


def test_text_and_text_file_together_are_refused(tiny_model_path, tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(LINES))
    done = tts(["Hello", "--text-file", "lines.txt", "--model-path", tiny_model_path], tmp_path)
    assert_refused(done, "give the text as an argument or with --text-file, not both: 'Hello' would not be spoken")


@pytest.mark.parametrize("args, message", [
    (["--text-file", "lines.txt", "-o", "x.wav"], "-o names one file, but --text-file writes one file per line into --output-dir"),
    ([TEXT, "--output-dir", "wavs"], "--output-dir wavs is for --text-file; for one text, name the file with -o"),
    ([TEXT, "-o", "lines.txt/x.wav"], "-o: lines.txt is a file, so nothing can be written into lines.txt"),
])
def test_flags_that_would_be_ignored_are_refused(args, message, tiny_model_path, tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(LINES))
    assert_refused(tts([*args, "--model-path", tiny_model_path], tmp_path), message)


def test_reference_text_without_reference_audio_is_refused(tiny_model_path, tmp_path):
    done = tts([TEXT, "--reference-text", "the words", "--model-path", tiny_model_path], tmp_path)
    assert_refused(done, "--reference-text needs --reference-audio")


@pytest.mark.parametrize("output, reason", [("t.xyz", ".xyz is not a format it writes"), ("t", "the name has no extension")])
def test_unknown_audio_format_is_refused_with_the_formats(output, reason, tiny_model_path, tmp_path):
    done = tts([TEXT, "--model-path", tiny_model_path, "-o", output], tmp_path)
    assert_refused(done, f"can't write audio to {output}: {reason}; end the name in .wav, .flac, .ogg, .mp3")
    assert not any(tmp_path.iterdir())


def test_mp3_output_is_mp3(spoken):
    work, _ = spoken
    info = sf.info(work / "speech.mp3")
    assert info.format == "MP3" and info.samplerate == 44100 and info.frames > 0


@pytest.mark.parametrize("suffix, format", [(".wav", "WAV"), (".flac", "FLAC"), (".ogg", "OGG"), (".mp3", "MP3"), (".MP3", "MP3")])
def test_audio_is_written_in_the_format_its_extension_names(suffix, format, tmp_path):
    audio = np.sin(np.arange(22050) / 10).astype(np.float32) * 0.5
    io.write_audio(tmp_path / f"a{suffix}", audio, 44100)
    info = sf.info(tmp_path / f"a{suffix}")
    assert info.format == format and info.samplerate == 44100 and info.channels == 1


def test_mp3_goes_through_ffmpeg_where_libsndfile_has_no_encoder(tmp_path, monkeypatch):
    # libsndfile before 1.1 has no mp3; this one has, so only its answer is changed
    monkeypatch.setattr(io.sf, "available_formats", lambda: {"WAV": "", "FLAC": "", "OGG": ""})
    io.write_audio(tmp_path / "a.mp3", np.zeros(4410, dtype=np.float32), 44100)
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,sample_rate", "-of", "csv=p=0",
                            str(tmp_path / "a.mp3")], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "mp3,44100"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match=r"can't write .*b\.mp3: this libsndfile has no mp3 encoder and ffmpeg is not installed"):
        io.write_audio(tmp_path / "b.mp3", np.zeros(4410, dtype=np.float32), 44100)


def test_text_that_gives_no_audio_is_an_error_and_writes_nothing(tiny_model_path, seeds, tmp_path):
    done = tts([TEXT, "--model-path", tiny_model_path, "-o", "out.wav", "--seed", seeds.silent, "--temperature", "1",
                "--top-p", "1", "--device", "cpu"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: the model ended the text before any audio frame (--seed {seeds.silent}, --temperature 1.0): "
                                   "nothing written; try another --seed")
    assert not any(tmp_path.iterdir())


def test_hitting_max_new_frames_says_so(spoken):
    _, done = spoken
    assert ("note: speech.mp3 stops at --max-new-frames 3, before the model ended the text: the audio may be cut short; "
            "raise --max-new-frames") in done.stderr


def test_speed_is_times_realtime_of_generation_and_start_up_is_apart(spoken):
    _, done = spoken
    start_up = re.search(r"^Start-up: ([\d.]+) s \(model and codec loaded on cpu", done.stdout, re.M)
    wrote = re.search(r"^Wrote speech\.mp3: ([\d.]+) s of audio \(3 frames\) in ([\d.]+) s, ([\d.]+)× realtime$", done.stdout, re.M)
    assert start_up and wrote, done.stdout
    audio, generation, speed = map(float, wrote.groups())
    assert audio == pytest.approx(3 * 2048 / 44100, abs=0.005)
    # speed = audio / generation, each printed to 0.01
    assert (audio - 0.005) / (generation + 0.005) - 0.005 <= speed <= (audio + 0.005) / max(generation - 0.005, 1e-9) + 0.005
    assert generation < float(start_up[1])  # loading is not in the generation time
    assert "realtime factor" not in done.stdout


def test_text_file_names_are_consecutive_and_lines_tsv_maps_them(tiny_model_path, seeds, tmp_path):
    (tmp_path / "lines.txt").write_text(f"{LINES[0]}\n\n   \n{LINES[1]}\n{LINES[2]}\n")
    done = tts(["--text-file", "lines.txt", "--model-path", tiny_model_path, "--output-dir", "wavs", "--max-new-frames", "3",
                "--seed", seeds.talking, "--device", "cpu"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    names = ["line_0001.wav", "line_0002.wav", "line_0003.wav"]
    assert sorted(p.name for p in (tmp_path / "wavs").iterdir()) == [*names, "lines.tsv"]
    assert (tmp_path / "wavs" / "lines.tsv").read_text() == "file\ttext\n" + "".join(f"{n}\t{t}\n" for n, t in zip(names, LINES))
    assert all(sf.info(tmp_path / "wavs" / name).frames == 3 * 2048 for name in names)


def test_play_without_a_sound_device_is_one_note_and_the_file_stays(spoken):
    work, done = spoken
    assert "ALSA" not in done.stdout
    assert done.stderr.count("--play") == 1 and "ALSA lib" not in done.stderr.replace(
        "(ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM default)", "")
    assert "note: --play: ffplay could not play speech.mp3 (ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM default); " \
           "the file is written" in done.stderr
    assert (work / "speech.mp3").is_file()


# finetune_tts.py and all three scripts (issue 18)


def test_resume_latest_on_a_fresh_project_is_refused_before_work(workspace):
    root, flags = workspace
    result = cli(*flags, "--full-pipeline", "--resume-latest")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "error: --resume-latest: no checkpoint in results/p/checkpoints yet: run without it to start training"
    assert not (root / "results").exists()


def test_force_stage_outside_the_slice_is_refused(workspace):
    root, flags = workspace
    result = cli(*flags, "--full-pipeline", "--force-stage", "merge", "--to-stage", "pack")
    assert result.exit_code == 1 and "error: --force-stage merge is outside the stages this command runs (prepare to pack)" in result.output
    assert not (root / "results").exists()


def test_status_of_a_mistyped_project_is_an_error(workspace):
    result = cli("--project", "voice1", "--status")
    assert result.exit_code == 1 and result.output.strip() == "error: no project 'voice1' in results/: check the name (projects there: none)"


def test_a_missing_data_dir_writes_nothing(workspace):
    root, flags = workspace
    result = cli(*[f if f != "training_data/voice" else "training_data/vioce" for f in flags], "--full-pipeline")
    assert result.exit_code == 1 and "error: input not found: training_data/vioce: pass an existing file or folder" in result.output
    assert not (root / "results").exists()


def test_a_stage_that_does_not_apply_is_not_called_up_to_date(workspace):
    _, flags = workspace
    result = cli(*flags, "--full-pipeline", "--to-stage", "pack")
    assert result.exit_code == 0 and "Ran: extract, pack; up to date: -" in result.output


def test_a_model_path_that_is_adapters_or_a_file_says_what_it_is(workspace, tiny_model_path):
    root, _ = workspace
    adapters = root / "checkpoints" / "p-lora"
    adapters.mkdir(parents=True)
    (adapters / "adapter_config.json").write_text("{}")
    result = cli("--check-model", "--pretrained-ckpt-path", str(adapters))
    assert result.exit_code == 1 and f"error: {adapters} holds LoRA adapters, not a model: pass them with --lora" in result.output
    result = cli("--check-model", "--pretrained-ckpt-path", str(tiny_model_path / "model.pth"))
    assert result.exit_code == 1 and "is a file, not a model directory" in result.output


def test_printed_commands_are_shell_quoted(workspace):
    root, flags = workspace
    shutil.move(root / "training_data" / "voice", root / "training_data" / "my voice")
    spaced = ["my voice" if f == "p" else "training_data/my voice" if f == "training_data/voice" else f for f in flags]
    result = cli(*spaced, "--full-pipeline", "--to-stage", "merge")
    assert result.exit_code == 0, result.output
    printed = next(line for line in result.output.splitlines() if line.startswith("Try it: "))
    assert shlex.split(printed.removeprefix("Try it: "))[-3] == "checkpoints/my voice-merged"


def test_validation_taking_most_of_a_tiny_speaker_is_a_warning(workspace):
    root, flags = workspace
    for wav in sorted((root / "training_data" / "voice" / "sample_speaker").glob("*.wav"))[2:]:
        wav.unlink()
        wav.with_suffix(".lab").unlink()
    result = cli(*flags, "--extract-tokens")
    assert result.exit_code == 0, result.output
    assert "QA warning: " in result.output and "validation" in result.output.split("QA warning: ", 1)[1]


def test_worker_defaults_respect_the_machine(workspace):
    _, flags = workspace
    from fs_pipeline.dataset import DECODE_WORKERS

    assert 1 <= DECODE_WORKERS <= (os.cpu_count() or 1)
    defaults = [f for i, f in enumerate(flags) if f != "--num-workers-extract" and flags[i - 1] != "--num-workers-extract"]
    done = subprocess.run([sys.executable, str(REPO / "finetune_tts.py"), *defaults, "--extract-tokens"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "suggested max number of worker" not in done.stderr


def test_the_tiny_model_is_not_labelled_with_a_release_licence(tiny_model_path):
    result = cli("--check-model", "--pretrained-ckpt-path", str(tiny_model_path), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "weights licence: none (random weights generated by fs-pipeline's tiny_model" in result.output
    assert "CC-BY-NC-SA" not in result.output


def test_the_tiny_model_script_takes_h():
    done = subprocess.run([sys.executable, "-m", "fs_pipeline.tiny_model", "-h"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "--output" in done.stdout


def test_prepare_reports_each_skipped_input_once(tmp_path):
    (tmp_path / "in").mkdir()
    said = "Hello there, this is a test of a clip that is long enough to keep."
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "in" / "good.wav"), said], check=True)
    (tmp_path / "in" / "good.lab").write_text(said)
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    done = subprocess.run([sys.executable, str(REPO / "prepare_dataset.py"), "--input", "in", "--output", "out", "--speaker", "me",
                           "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sum("broken.wav" in line for line in (done.stdout + done.stderr).splitlines()) == 1


@pytest.mark.parametrize("script", ["finetune_tts.py", "prepare_dataset.py"])
def test_help_and_argument_errors_import_no_heavy_module(script):
    probe = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted(m for m in ('torch', 'scipy', 'fish_speech') if m in sys.modules))")
    for args in (["--help"], ["--no-such-flag"]):
        done = subprocess.run([sys.executable, "-c", probe, str(REPO / script), *args], cwd=REPO, capture_output=True, text=True)
        assert "HEAVY []" in done.stdout, (args, done.stdout[-500:], done.stderr[-500:])
