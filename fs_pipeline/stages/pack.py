"""Pack: transcripts + codes -> train/val packed files, a held-out split, and the dataset QA report.

Reads   <data_dir>/<speaker>/*.lab and *.npy (from extract), the base model's config and tokenizer
Writes  results/<project>/data/train.protos, val.protos (one TextData record per speaker), qa.json, qa.md
Skips   when the transcripts, codes and settings match the manifest and the outputs are unchanged
"""

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from fs_pipeline import PipelineError, qa
from fs_pipeline.dataset import Clip, list_clips
from fs_pipeline.fileio import write_json_atomic, write_text_atomic
from fs_pipeline.manifest import Manifest
from fs_pipeline.models import ModelDir
from fs_pipeline.packed import speaker_message, write_protos
from fs_pipeline.project import Project
from fs_pipeline.stages import extract

STAGE = "pack"
TRAIN_FILE, VAL_FILE = "train.protos", "val.protos"


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
              "max_seq_len": model_dir.config["max_seq_len"]}
    if manifest.is_current(STAGE, settings=record, inputs=inputs):
        entry = manifest.entry(STAGE)
        return PackResult(True, entry["train_utterances"], entry["val_utterances"], entry["warnings"])

    from fish_speech.tokenizer import FishTokenizer

    tokenizer = FishTokenizer.from_pretrained(str(model_dir.path))
    texts = {c.key: c.text() for c in clips}
    codes = {c.key: _checked_codes(c, model_dir) for c in clips}
    val_keys = held_out(clips, settings.val_fraction, settings.split_seed)

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

    report = qa.check(_clip_qa(clips, texts, codes, manifest, tokenizer), texts, model_dir.config["max_seq_len"])
    report["split"] = {"seed": settings.split_seed, "val_fraction": settings.val_fraction, "val": sorted(val_keys)}
    write_json_atomic(project.data_dir / "qa.json", report)
    write_text_atomic(project.data_dir / "qa.md", qa.markdown(report))

    result = PackResult(False, len(clips) - len(val_keys), len(val_keys), report["warnings"])
    manifest.complete(
        STAGE,
        settings=record,
        inputs=inputs,
        outputs=manifest.hash_outputs(list(outputs.values())),
        split=sorted(val_keys),
        train_utterances=result.train_utterances,
        val_utterances=result.val_utterances,
        warnings=result.warnings,
    )
    return result


def held_out(clips: list[Clip], fraction: float, seed: int) -> set[str]:
    """Clip keys held out for validation: per speaker, the same for the same seed and clips. A speaker with
    at least two clips gives at least one when fraction > 0, so every speaker is validated."""
    by_speaker = defaultdict(list)
    for clip in clips:
        by_speaker[clip.speaker].append(clip.key)
    held = set()
    for speaker, keys in sorted(by_speaker.items()):
        if fraction == 0 or len(keys) < 2:
            continue
        shuffled = sorted(keys)
        random.Random(f"{seed}:{speaker}").shuffle(shuffled)
        held.update(shuffled[: max(1, round(fraction * len(keys)))])
    return held


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


def _clip_qa(clips, texts, codes, manifest: Manifest, tokenizer) -> list[qa.ClipQA]:
    from fs_pipeline.prompt import sequence_length

    stats = manifest.entry(extract.STAGE).get("clips", {})
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
            )
        )
    return result
