"""Pack: transcripts + codes -> train/val packed files, a held-out split by source recording, and the dataset QA report.

Reads   <data_dir>/<speaker>/*.lab and *.npy (from extract), *.wav (speaker embeddings), the base model's config and tokenizer
Writes  results/<project>/data/train.protos, val.protos (one TextData record per speaker), qa.json, qa.md,
        voices.json (each speaker's reference embedding, which test clips are scored against), and
        voice_embeddings.npz (each clip's embedding by audio hash: a rerun embeds only new or changed audio)
Skips   when the transcripts, codes and settings match the manifest and the outputs are unchanged
"""

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf
from loguru import logger
from tqdm import tqdm

from fs_pipeline import PipelineError, qa
from fs_pipeline.audio import speaker
from fs_pipeline.audio.io import read_wav
from fs_pipeline.dataset import Clip, list_clips
from fs_pipeline.fileio import atomic_path, write_json_atomic, write_text_atomic
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import ModelDir
from fs_pipeline.packed import speaker_message, write_protos
from fs_pipeline.project import Project
from fs_pipeline.stages import extract

STAGE = "pack"
TRAIN_FILE, VAL_FILE = "train.protos", "val.protos"
VOICES_FILE, VOICE_CACHE = "voices.json", "voice_embeddings.npz"
# prepare names the segments of one recording <source>_<nnnn>.wav, in time order
SEGMENT_NAME = re.compile(r"(?P<source>.+)_(?P<index>\d+)")
# A speaker too small for --val-fraction still gives one clip, unless that clip is more than this share of its
# audio: then training would lose more of a small voice than a loss measured on one clip is worth.
MAX_VAL_SHARE = 0.2


@dataclass(frozen=True)
class PackSettings:
    data_dir: Path
    val_fraction: float = 0.05
    split_seed: int = 0


@dataclass(frozen=True)
class PackResult:
    skipped: bool
    train_utterances: int
    val_utterances: int
    warnings: list[str]


def check(settings: PackSettings) -> None:
    if not 0 <= settings.val_fraction < 1:
        raise PipelineError(f"--val-fraction {settings.val_fraction} is out of range: use a fraction in [0, 1), e.g. 0.05")


def run(settings: PackSettings, model_dir: ModelDir, project: Project, manifest: Manifest) -> PackResult:
    check(settings)
    clips = list_clips(settings.data_dir)
    missing = [c.key for c in clips if not c.npy.is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} clip(s) have no codes yet (first: {missing[0]}): run --extract-tokens first")
    inputs = {c.key: {"lab": manifest.hash(c.lab), "codes": manifest.hash(c.npy)} for c in clips}
    # Content, not paths: the same dataset under another spelling of its path is the same data.
    record = {"val_fraction": settings.val_fraction, "split_seed": settings.split_seed, "num_codebooks": model_dir.num_codebooks,
              "max_seq_len": model_dir.config["max_seq_len"], "speaker_encoder": speaker.ENCODER}
    if manifest.is_current(STAGE, settings=record, inputs=inputs):
        entry = manifest.entry(STAGE)
        return PackResult(True, entry["train_utterances"], entry["val_utterances"], entry["warnings"])

    from fs_pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts = {c.key: c.text() for c in clips}
    codes = {c.key: _checked_codes(c, model_dir) for c in clips}
    voices = _voice_embeddings(clips, manifest, project.data_dir / VOICE_CACHE)
    clip_qa = _clip_qa(clips, texts, codes, manifest, tokenizer, voices)
    split = held_out(clips, {c.key: c.seconds for c in clip_qa}, settings.val_fraction, settings.split_seed)
    val_keys = set(split["val"])

    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip)
    outputs = {}
    for file, wanted in ((TRAIN_FILE, False), (VAL_FILE, True)):
        messages = [
            speaker_message(speaker, Path(settings.data_dir).resolve().name, [(texts[c.key], codes[c.key]) for c in members if (c.key in val_keys) == wanted])
            for speaker, members in sorted(by_speaker.items())
        ]
        outputs[file] = project.data_dir / file
        write_protos(outputs[file], [m for m in messages if m.sentences])
    outputs[VOICES_FILE] = project.data_dir / VOICES_FILE
    write_json_atomic(outputs[VOICES_FILE], _references(clip_qa, voices, val_keys))

    report = qa.check(clip_qa, texts, model_dir.config["max_seq_len"])
    report["split"] = split
    # qa.md links each clip from its own folder; qa.json says where the dataset is from there too
    report["dataset"] = Path(os.path.relpath(Path(settings.data_dir).resolve(), project.data_dir.resolve())).as_posix()
    report["warnings"] += qa.split_warnings(split)
    write_json_atomic(project.data_dir / "qa.json", report)
    write_text_atomic(project.data_dir / "qa.md", qa.markdown(report))

    result = PackResult(False, len(clips) - len(val_keys), len(val_keys), report["warnings"])
    manifest.complete(
        STAGE,
        settings=record,
        inputs=inputs,
        outputs=manifest.hash_outputs(list(outputs.values())),
        split=split,
        train_utterances=result.train_utterances,
        val_utterances=result.val_utterances,
        warnings=result.warnings,
    )
    return result


def held_out(clips: list[Clip], seconds: dict[str, float], fraction: float, seed: int) -> dict:
    """The validation split by source recording, as qa.json and the manifest record it. Per speaker: whole
    recordings, in an order drawn from `seed`, each taken while it brings the held-out audio closer to
    `fraction` of the speaker's; where no whole recording does (one recording, or all of them long), the last
    clips of the one recording that comes closest. A speaker keeps at least one clip for training, and gives
    none when even one clip would be more than MAX_VAL_SHARE of its audio. Same clips and seed, same split."""
    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip.key)
    speakers, val = {}, []
    for speaker_name, keys in sorted(by_speaker.items()):
        keys.sort()  # the order clips come in changes nothing, not even a float sum's last bit
        recordings = _source_recordings(keys)
        total = sum(seconds[k] for k in keys)
        held = _speaker_held_out(recordings, seconds, fraction, total, random.Random(f"{seed}:{speaker_name}")) if fraction else {}
        speaker_val = [k for part in held.values() for k in part]
        val_seconds = sum(seconds[k] for k in speaker_val)
        speakers[speaker_name] = {
            "clips": len(keys),
            "seconds": round(total, 3),
            "recordings": len(recordings),
            "val_clips": len(speaker_val),
            "val_seconds": round(val_seconds, 3),
            "val_share": round(val_seconds / total, 4) if total else 0.0,
            "val_recordings": {
                name: "whole" if len(part) == len(recordings[name]) else f"last {len(part)} of {len(recordings[name])} clips"
                for name, part in sorted(held.items())
            },
        }
        val += speaker_val
    return {"seed": seed, "val_fraction": fraction, "val": sorted(val), "speakers": speakers}


def _source_recordings(keys: list[str]) -> dict[str, list[str]]:
    """Clip keys by the recording they were cut from, each in time order. A clip named <source>_<n>.wav is
    segment n of <source> in its folder, as prepare names them; any other clip is a recording of its own.
    Hand-numbered clips of separate takes thus count as one recording: the safe side, since no possible
    neighbours are split apart."""
    groups = defaultdict(list)
    for key in keys:
        path = PurePosixPath(key)
        match = SEGMENT_NAME.fullmatch(path.stem)
        source, index = (match["source"], int(match["index"])) if match else (path.stem, 0)
        groups[(path.parent / source).as_posix()].append((index, key))
    return {name: [key for _, key in sorted(members)] for name, members in sorted(groups.items())}


def _speaker_held_out(recordings: dict[str, list[str]], seconds: dict[str, float], fraction: float, total: float,
                      rng: random.Random) -> dict[str, list[str]]:
    """Recording name -> its held-out clips (all of them, or its last ones) for one speaker."""
    target = fraction * total
    order = sorted(recordings)
    rng.shuffle(order)
    held, got = {}, 0.0
    for name in order:
        length = sum(seconds[k] for k in recordings[name])
        if len(held) < len(recordings) - 1 and length < 2 * (target - got):  # closer to the target with it than without
            held[name] = recordings[name]
            got += length
    if held:
        return held
    # No whole recording fits: the last k clips of one recording. Every recording's tails are candidates; a
    # recording may go whole only while another stays in training.
    candidates = []
    for rank, name in enumerate(order):
        keys, length = recordings[name], 0.0
        most = len(keys) if len(recordings) > 1 else len(keys) - 1
        for k in range(1, most + 1):
            length += seconds[keys[-k]]
            candidates.append((abs(length - target), length, rank, k, name))
    if not candidates:
        return {}
    error, length, _, k, name = min(candidates)
    # The closest tail is kept when it beats holding out nothing; else it is the smallest one, kept while small.
    if error < target or length <= MAX_VAL_SHARE * total:
        return {name: recordings[name][-k:]}
    return {}


def _checked_codes(clip: Clip, model_dir: ModelDir):
    codes = extract.load_codes(clip.npy)
    if codes.shape[0] != model_dir.num_codebooks:
        raise PipelineError(
            f"{clip.npy} has {codes.shape[0]} codebooks but the model expects {model_dir.num_codebooks}: it was extracted "
            "with another model version's codec; rerun --extract-tokens with this model"
        )
    if codes.shape[1] == 0 or codes.min() < 0 or codes.max() >= model_dir.config["codebook_size"]:
        raise PipelineError(f"{clip.npy} holds codes outside [0, {model_dir.config['codebook_size']}) or no frames: rerun --extract-tokens")
    return codes


def _clip_qa(clips, texts, codes, manifest: Manifest, tokenizer, voices: dict[str, np.ndarray]) -> list[qa.ClipQA]:
    from fs_pipeline.prompt import sequence_length

    stats = manifest.entry(extract.STAGE).get("clips", {})
    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip.key)
    similarity = {}
    for keys in by_speaker.values():
        similarity |= dict(zip(keys, qa.voice_similarities([voices[k] for k in keys])))
    result = []
    for clip in clips:
        clip_stats = stats.get(clip.key, {})
        result.append(
            qa.ClipQA(
                key=clip.key,
                speaker=clip.speaker,
                seconds=clip_stats.get("seconds") or sf.info(clip.wav).duration,
                chars=len(texts[clip.key]),
                tokens=sequence_length(tokenizer, texts[clip.key], codes[clip.key].shape[1]),
                clipped=clip_stats.get("clipped"),
                rms_db=clip_stats.get("rms_db"),
                voice_similarity=similarity[clip.key],
            )
        )
    return result


def _voice_embeddings(clips: list[Clip], manifest: Manifest, cache_path: Path) -> dict[str, np.ndarray]:
    """Each clip's speaker embedding by clip key. Embeddings are kept in `cache_path` by audio content hash, so
    a rerun (after a transcript was corrected, say) embeds only new or changed audio."""
    hashes = {c.key: manifest.hash(c.wav) for c in clips}
    cache = _read_voice_cache(cache_path)
    todo = [c for c in clips if hashes[c.key] not in cache]
    for clip in tqdm(todo, desc="speaker embeddings", unit="clip", dynamic_ncols=True, disable=not todo):
        cache[hashes[clip.key]] = speaker.embed(read_wav(clip.wav, speaker.SAMPLE_RATE), speaker.SAMPLE_RATE)
    if todo or set(cache) != set(hashes.values()):
        current = {h: cache[h] for h in sorted(set(hashes.values()))}
        with atomic_path(cache_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, encoder=np.array(speaker.ENCODER), **current)
    return {key: cache[digest] for key, digest in hashes.items()}


def _read_voice_cache(path: Path) -> dict[str, np.ndarray]:
    """The cached embeddings of `path`, or none when it is missing, damaged or from another encoder."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["encoder"]) != speaker.ENCODER:
                return {}
            return {name: stored[name] for name in stored.files if name != "encoder"}
    except (OSError, ValueError, KeyError, EOFError) as e:
        if Path(path).exists():
            logger.warning(f"{path} is unreadable ({type(e).__name__}); embedding every clip again")
        return {}


def _references(clip_qa: list[qa.ClipQA], voices: dict[str, np.ndarray], val_keys: set[str]) -> dict:
    """voices.json: per speaker, the reference embedding of its training clips, leaving out the clips QA hears as
    another voice (all of them, when that leaves none)."""
    members = defaultdict(list)
    for clip in clip_qa:
        if clip.key not in val_keys:
            members[clip.speaker].append(clip)
    speakers = {}
    for name, group in sorted(members.items()):
        same_voice = [c for c in group if c.voice_similarity is None or c.voice_similarity >= qa.VOICE_OUTLIER] or group
        vector = speaker.reference([voices[c.key] for c in same_voice])
        speakers[name] = {"clips": len(same_voice), "reference": [round(float(x), 6) for x in vector]}
    return {"encoder": speaker.ENCODER, "speakers": speakers}


def voice_references(data_dir: Path) -> dict[str, np.ndarray]:
    """Each speaker's reference embedding from pack's voices.json in `data_dir` (results/<project>/data)."""
    path = Path(data_dir) / VOICES_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"no speaker references in {path} ({type(e).__name__}): rerun --extract-tokens, which writes them") from e
    return {name: np.array(s["reference"], dtype=np.float32) for name, s in stored["speakers"].items()}
