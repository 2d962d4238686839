import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from fs_pipeline import PipelineError
from fs_pipeline.dataset import list_clips
from fs_pipeline.manifest import Manifest
from fs_pipeline.project import Project
from fs_pipeline.stages import extract, pack

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def extracted(sample_dataset, tiny_model_dir, cpu, tmp_path):
    """A copy of the sample with codes extracted, a project and its manifest."""
    data = shutil.copytree(sample_dataset, tmp_path / "data")
    project = Project("p", root=tmp_path / "results")
    manifest = Manifest(project.manifest_path)
    extract.run(extract.ExtractSettings(data, num_workers=0), tiny_model_dir, cpu, manifest)
    return data, project, manifest


def run_pack(extracted, tiny_model_dir, **settings):
    data, project, manifest = extracted
    return pack.run(pack.PackSettings(data, **settings), tiny_model_dir, project, manifest)


# --- an independent reader of the packed format: protobuf wire format by hand, no generated code ---


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def fields(buf: bytes):
    """(field number, value) pairs; length-delimited values are bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = varint(buf, pos)
        elif wire_type == 2:
            size, pos = varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        yield number, value


def read_packed(path: Path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """speaker -> [(text, codes)] from a .protos file."""
    data, speakers, pos = path.read_bytes(), {}, 0
    while pos < len(data):
        (size,) = struct.unpack("<I", data[pos : pos + 4])
        record, pos = data[pos + 4 : pos + 4 + size], pos + 4 + size
        name, utterances = None, []
        for number, value in fields(record):
            if number == 2:
                name = value.decode()
            elif number == 4:
                texts, rows = [], []
                for inner, inner_value in fields(value):
                    if inner == 1:
                        texts.append(inner_value.decode())
                    elif inner == 3:
                        packed_values = dict(fields(inner_value))[1]
                        row, p = [], 0
                        while p < len(packed_values):
                            v, p = varint(packed_values, p)
                            row.append(v)
                        rows.append(row)
                utterances.append((texts[0], np.array(rows)))
        speakers[name] = utterances
    return speakers


def test_packed_files_read_back_to_the_same_texts_and_codes(extracted, tiny_model_dir):
    result = run_pack(extracted, tiny_model_dir)
    data, project, _ = extracted
    assert (result.train_utterances, result.val_utterances) == (5, 1)
    train = read_packed(project.data_dir / "train.protos")["sample_speaker"]
    val = read_packed(project.data_dir / "val.protos")["sample_speaker"]
    expected = {c.text(): np.load(c.npy) for c in list_clips(data)}
    assert len(train) + len(val) == len(expected) == 6
    for text, codes in train + val:
        np.testing.assert_array_equal(codes, expected[text])


def test_output_is_deterministic_and_rerun_skips(extracted, tiny_model_dir):
    _, project, _ = extracted
    run_pack(extracted, tiny_model_dir)
    first = (project.data_dir / "train.protos").read_bytes()
    assert run_pack(extracted, tiny_model_dir).skipped
    (project.data_dir / "train.protos").unlink()
    again = run_pack(extracted, tiny_model_dir)
    assert not again.skipped
    assert (project.data_dir / "train.protos").read_bytes() == first


def clips_and_seconds(tmp_path, names_and_seconds: dict[str, float]):
    """Clips of the given keys (speaker/name.wav) with the given durations, for held_out."""
    from fs_pipeline.dataset import Clip

    clips = [Clip(tmp_path / key, key.split("/")[0], key) for key in sorted(names_and_seconds)]
    return clips, names_and_seconds


def test_segments_of_one_recording_stay_on_one_side(tmp_path):
    # 20 recordings cut into 5 segments each by prepare (<source>_<nnnn>.wav), 2 s a segment
    clips, seconds = clips_and_seconds(tmp_path, {f"a/rec{r:02d}_{i:04d}.wav": 2.0 for r in range(20) for i in range(5)})
    chosen = set()
    for seed in range(8):
        split = pack.held_out(clips, seconds, 0.05, seed)
        assert split == pack.held_out(list(reversed(clips)), seconds, 0.05, seed)  # same clips and seed, same split
        (recording,) = split["speakers"]["a"]["val_recordings"].items()
        assert recording[1] == "whole"
        assert split["val"] == [f"a/{recording[0].split('/')[1]}_{i:04d}.wav" for i in range(5)]
        assert split["speakers"]["a"]["val_share"] == 0.05
        chosen.add(recording[0])
    assert len(chosen) > 1  # the seed picks the recording


def test_a_speaker_with_one_recording_gives_its_last_segments(tmp_path):
    # hand-numbered without zero padding: the order is the number's, not the name's
    clips, seconds = clips_and_seconds(tmp_path, {f"a/talk_{i}.wav": 5.0 + i % 3 for i in range(40)})
    for seed in (0, 1):
        split = pack.held_out(clips, seconds, 0.1, seed)
        assert split["val"] == sorted(f"a/talk_{i}.wav" for i in range(36, 40))
        assert split["speakers"]["a"]["val_recordings"] == {"a/talk": "last 4 of 40 clips"}
        assert abs(split["speakers"]["a"]["val_share"] - 0.1) < 0.02


def test_whole_recordings_too_long_to_hold_out_give_a_tail_block(tmp_path):
    # two half-hour recordings: neither can go whole, so the end of one of them is held out
    clips, seconds = clips_and_seconds(tmp_path, {f"a/{r}_{i:04d}.wav": 10.0 for r in ("morning", "evening") for i in range(180)})
    split = pack.held_out(clips, seconds, 0.05, 0)
    ((recording, part),) = split["speakers"]["a"]["val_recordings"].items()
    assert part == "last 18 of 180 clips"
    assert split["val"] == [f"{recording}_{i:04d}.wav" for i in range(162, 180)]


def test_a_speaker_with_too_little_data_keeps_it_all(tmp_path):
    clips, seconds = clips_and_seconds(tmp_path, {"two/x.wav": 4.0, "two/y.wav": 8.0, "three/x.wav": 5.0, "three/y.wav": 5.0,
                                                  "three/z.wav": 5.0, "one/x.wav": 9.0,
                                                  **{f"six/s_{i:04d}.wav": 3.0 for i in range(6)}})
    split = pack.held_out(clips, seconds, 0.05, 0)
    assert split["val"] == ["six/s_0005.wav"]  # one clip in six is 17% of the audio: within the 20% a speaker may give
    assert [split["speakers"][s]["val_clips"] for s in ("one", "two", "three")] == [0, 0, 0]
    assert pack.held_out(clips, seconds, 0.0, 0)["val"] == []


def test_split_is_recorded_by_recording_and_val_is_not_in_train(extracted, tiny_model_dir):
    _, project, manifest = extracted
    run_pack(extracted, tiny_model_dir, split_seed=5)
    split = Manifest(project.manifest_path).entry("pack")["split"]
    assert json.loads((project.data_dir / "qa.json").read_text())["split"] == split
    # the sample's clips are numbered like prepare's segments of one recording: its last one is held out
    assert split["val"] == ["sample_speaker/sample_0005.wav"]
    assert split["speakers"]["sample_speaker"]["val_recordings"] == {"sample_speaker/sample": "last 1 of 6 clips"}
    train_texts = {t for t, _ in read_packed(project.data_dir / "train.protos")["sample_speaker"]}
    val_texts = {t for t, _ in read_packed(project.data_dir / "val.protos")["sample_speaker"]}
    assert not train_texts & val_texts


def test_qa_warns_when_validation_is_small_or_takes_too_much(extracted, tiny_model_dir):
    warnings = run_pack(extracted, tiny_model_dir).warnings
    assert any(w.startswith("sample_speaker: validation takes 1 of its 6 clips, 1") and "far more than --val-fraction 0.05" in w
               for w in warnings)
    assert any(w.startswith("the validation set holds 1 utterance") and "under 5 utterances or 30 s" in w for w in warnings)


def test_two_clips_give_nothing_to_validation_and_say_so(extracted, tiny_model_dir):
    data, project, _ = extracted
    for i in range(2, 6):
        for suffix in (".wav", ".lab", ".npy"):
            (data / "sample_speaker" / f"sample_{i:04d}{suffix}").unlink()
    result = run_pack(extracted, tiny_model_dir)
    assert (result.train_utterances, result.val_utterances) == (2, 0)
    assert not (project.data_dir / "val.protos").read_bytes()
    assert any(w.startswith("sample_speaker: nothing held out for validation: its 2 clips") for w in result.warnings)
    assert "nothing is held out for validation: training runs without a validation loss" in result.warnings


def test_qa_warns_on_a_loudness_spread_beyond_the_threshold():
    from fs_pipeline import qa

    levels = {"far": [-20.0, -22.0, -25.0, -28.0, -30.4], "near": [-22.0, -23.0, -24.0, -25.0, -24.5]}
    clips = [qa.ClipQA(f"{s}/{i}.wav", s, 10.0, 150, 300, 0.0, level) for s, row in levels.items() for i, level in enumerate(row)]
    report = qa.check(clips, {c.key: f"text {c.key}" for c in clips}, 1000)
    spread = [w for w in report["warnings"] if "loudness spread" in w]
    assert len(spread) == 1 and spread[0].startswith("far: loudness spread 9.") and "above 8 dB" in spread[0]
    assert not any(c.flags for c in clips)  # no single clip is an outlier: only the spread shows it


def test_qa_flags_a_transcript_with_ten_times_the_text(extracted, tiny_model_dir):
    data, project, _ = extracted
    lab = data / "sample_speaker" / "sample_0002.lab"
    lab.write_text(" ".join([lab.read_text().strip()] * 10))
    result = run_pack(extracted, tiny_model_dir)
    flagged = [w for w in result.warnings if w.startswith("sample_speaker/sample_0002.wav:")]
    assert len(flagged) == 1 and "the transcript may not match the audio" in flagged[0]
    assert not any(w.startswith("sample_speaker/sample_0001.wav") for w in result.warnings)
    assert "sample_0002.wav" in (project.data_dir / "qa.md").read_text()


def test_qa_flags_duplicates_and_small_dataset(extracted, tiny_model_dir):
    data, _, _ = extracted
    text = (data / "sample_speaker" / "sample_0000.lab").read_text()
    (data / "sample_speaker" / "sample_0004.lab").write_text(text.upper().replace(".", "!"))
    warnings = run_pack(extracted, tiny_model_dir).warnings
    assert "sample_speaker/sample_0004.wav: near-duplicate transcript of sample_speaker/sample_0000.wav" in warnings
    assert any("minutes of speech; under 10 minutes" in w for w in warnings)


def test_qa_flags_a_clip_of_another_voice_links_it_and_review_lists_it(extracted, tiny_model_dir, cpu, tmp_path, monkeypatch):
    from fs_pipeline.audio.io import read_wav, write_wav
    from tests.conftest import cli

    data, project, manifest = extracted
    rate = tiny_model_dir.version.sample_rate
    odd = data / "sample_speaker" / "sample_0006.wav"  # another person: espeak-ng's female variant among en-us clips
    subprocess.run(["espeak-ng", "-v", "en+f3", "-s", "150", "-w", str(tmp_path / "other.wav"), "Somebody else is talking in this recording."],
                   check=True, capture_output=True)
    write_wav(odd, read_wav(tmp_path / "other.wav", rate), rate)
    odd.with_suffix(".lab").write_text("Somebody else is talking in this recording.\n")
    extract.run(extract.ExtractSettings(data, num_workers=0), tiny_model_dir, cpu, manifest)

    warnings = [w for w in run_pack(extracted, tiny_model_dir).warnings if "voice similarity" in w]
    assert len(warnings) == 1 and warnings[0].startswith("sample_speaker/sample_0006.wav: voice similarity 0.")
    assert "another person may be speaking" in warnings[0]
    report = json.loads((project.data_dir / "qa.json").read_text())
    similarity = {c["key"]: c["voice_similarity"] for c in report["clips"]}
    assert similarity["sample_speaker/sample_0006.wav"] < 0.75 <= min(v for k, v in similarity.items() if not k.endswith("0006.wav"))
    voices = json.loads((project.data_dir / pack.VOICES_FILE).read_text())["speakers"]["sample_speaker"]
    same_voice_in_training = [k for k in similarity if k not in report["split"]["val"] and not k.endswith("0006.wav")]
    assert voices["clips"] == len(same_voice_in_training) and len(voices["reference"]) == 256

    # qa.md links the clip's audio and transcript, relative to its own folder
    row = next(line for line in (project.data_dir / "qa.md").read_text().splitlines() if line.startswith("| [sample_speaker/sample_0006.wav]"))
    links = [unquote(link) for link in re.findall(r"\]\(([^)]+)\)", row)]
    assert not any(Path(link).is_absolute() for link in links)
    assert [(project.data_dir / link).resolve() for link in links] == [odd.resolve(), odd.with_suffix(".lab").resolve()]

    monkeypatch.chdir(tmp_path)
    review = cli("--project", "p", "--review")
    assert review.exit_code == 0, review.output
    assert review.output.startswith("1 clip(s) flagged in results/p/data/qa.json")
    assert "data/sample_speaker/sample_0006.wav\n  transcript (data/sample_speaker/sample_0006.lab): Somebody else is talking" in review.output
    assert "  why: voice similarity 0." in review.output


def test_the_voice_reference_leaves_out_held_out_clips_and_other_voices():
    from fs_pipeline import qa

    voices = {"s/a.wav": np.array([1.0, 0, 0]), "s/b.wav": np.array([0.8, 0.6, 0]), "s/other.wav": np.array([0, 0, 1.0]),
              "s/held.wav": np.array([0, 1.0, 0])}
    similarity = {"s/a.wav": 0.9, "s/b.wav": 0.9, "s/other.wav": 0.1, "s/held.wav": 0.8}
    clips = [qa.ClipQA(key, "s", 3.0, 40, 100, 0.0, -20.0, voice_similarity=v) for key, v in similarity.items()]
    stored = pack._references(clips, voices, {"s/held.wav"})["speakers"]["s"]
    assert stored["clips"] == 2 and np.allclose(stored["reference"], np.array([0.9, 0.3, 0]) / np.linalg.norm([0.9, 0.3, 0]), atol=1e-6)


def test_a_rerun_embeds_only_new_or_changed_audio(extracted, tiny_model_dir, monkeypatch):
    from fs_pipeline.audio import speaker

    data, project, _ = extracted
    first = run_pack(extracted, tiny_model_dir)
    (data / "sample_speaker" / "sample_0001.lab").write_text("A corrected transcript of the second clip.\n")

    def no_embedding(*args):
        raise AssertionError("a clip was embedded again")

    monkeypatch.setattr(speaker, "embed", no_embedding)
    again = run_pack(extracted, tiny_model_dir)
    assert not first.skipped and not again.skipped


def test_review_without_a_qa_report_says_what_to_run(tmp_path, monkeypatch):
    from tests.conftest import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "p").mkdir(parents=True)
    result = cli("--project", "p", "--review")
    assert result.exit_code != 0 and "no QA report in results/p/data: run --extract-tokens first" in result.output


def test_codes_of_another_era_are_refused(extracted, tiny_model_dir):
    data, _, _ = extracted
    npy = data / "sample_speaker" / "sample_0000.npy"
    np.save(npy, np.zeros((10, 30), dtype=np.int64))
    with pytest.raises(PipelineError, match=r"sample_0000.npy has 10 codebooks but the model expects 4: it was extracted with another"):
        run_pack(extracted, tiny_model_dir)


def test_missing_codes_say_run_extract(extracted, tiny_model_dir):
    data, _, _ = extracted
    (data / "sample_speaker" / "sample_0005.npy").unlink()
    with pytest.raises(PipelineError, match=r"have no codes yet \(first: sample_speaker/sample_0005.wav\): run --extract-tokens"):
        run_pack(extracted, tiny_model_dir)


def test_generated_protobuf_code_is_current(tmp_path):
    proto_dir = REPO / "fs_pipeline" / "proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", "text_data.proto"], check=True
    )
    assert (tmp_path / "text_data_pb2.py").read_text() == (proto_dir / "text_data_pb2.py").read_text()
