"""Packed-data files (.protos): a sequence of records, each a 4-byte little-endian length followed by
one serialized TextData message (fs_pipeline/proto/text_data.proto)."""

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fs_pipeline import PipelineError
from fs_pipeline.fileio import atomic_path
from fs_pipeline.proto.text_data_pb2 import Semantics, Sentence, TextData

LENGTH = struct.Struct("<I")


def speaker_message(speaker: str, source: str, utterances: Iterable[tuple[str, np.ndarray]]) -> TextData:
    """One speaker's utterances, each a transcript and its (codebooks, frames) codes."""
    return TextData(
        source=source,
        name=speaker,
        sentences=[
            Sentence(texts=[text], semantics=[Semantics(values=row.tolist()) for row in codes]) for text, codes in utterances
        ],
    )


def write_protos(path: Path, messages: Iterable[TextData]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for message in messages:
            payload = message.SerializeToString(deterministic=True)
            f.write(LENGTH.pack(len(payload)) + payload)


def read_protos(path: Path) -> Iterator[TextData]:
    with open(path, "rb") as f:
        while header := f.read(LENGTH.size):
            if len(header) < LENGTH.size:
                raise PipelineError(f"{path} ends inside a record header: the file is truncated; rerun packing")
            (size,) = LENGTH.unpack(header)
            payload = f.read(size)
            if len(payload) < size:
                raise PipelineError(f"{path} ends inside a record: the file is truncated; rerun packing")
            yield TextData.FromString(payload)
