import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

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


def test_split_is_deterministic_held_out_and_per_speaker(tiny_model_dir, tmp_path):
    from fs_pipeline.dataset import Clip

    clips = [Clip(tmp_path / f"{s}/{i}.wav", s, f"{s}/{i}.wav") for s in ("a", "b") for i in range(40)]
    clips.append(Clip(tmp_path / "c/0.wav", "c", "c/0.wav"))
    held = pack.held_out(clips, 0.05, seed=3)
    assert held == pack.held_out(clips, 0.05, seed=3)
    assert held != pack.held_out(clips, 0.05, seed=4)
    assert sum(k.startswith("a/") for k in held) == 2 and sum(k.startswith("b/") for k in held) == 2
    assert not any(k.startswith("c/") for k in held)  # one clip: nothing to spare
    assert pack.held_out(clips, 0.0, seed=3) == set()


def test_split_is_recorded_and_val_is_not_in_train(extracted, tiny_model_dir):
    _, project, manifest = extracted
    run_pack(extracted, tiny_model_dir, split_seed=5)
    val_keys = Manifest(project.manifest_path).entry("pack")["split"]
    qa_split = json.loads((project.data_dir / "qa.json").read_text())["split"]
    assert qa_split["val"] == val_keys and len(val_keys) == 1
    train_texts = {t for t, _ in read_packed(project.data_dir / "train.protos")["sample_speaker"]}
    val_texts = {t for t, _ in read_packed(project.data_dir / "val.protos")["sample_speaker"]}
    assert not train_texts & val_texts


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
