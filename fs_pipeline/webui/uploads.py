"""What the page accepts from a browser: recordings, transcripts and zip archives of them.

Every name is reduced to safe relative parts before it touches the disk, so nothing lands outside the
folder it is meant for; an archive is checked whole (names, links, sizes) before any member is extracted;
an audio file that ffmpeg can't decode gets the error prepare would give it, and is not kept.
"""

import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fs_pipeline import PipelineError
from fs_pipeline.audio.io import decode
from fs_pipeline.fileio import atomic_path
from fs_pipeline.stages.prepare import MEDIA_SUFFIXES, TRANSCRIPT_SUFFIXES

ARCHIVE_SUFFIX = ".zip"
ACCEPTED = ", ".join(sorted(MEDIA_SUFFIXES | set(TRANSCRIPT_SUFFIXES) | {ARCHIVE_SUFFIX}))
# Decoding a second is enough to tell audio from anything else; decoding all of a long recording is prepare's job.
PROBE_SECONDS = 1.0
PROBE_RATE = 16000


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 4 << 30  # one uploaded file, an archive included
    max_unpacked_bytes: int = 8 << 30  # an archive's members together, as their headers declare them
    max_members: int = 10_000


def safe_relative(name: str, what: str = "upload") -> PurePosixPath:
    """`name` as a relative path that stays inside the folder it is joined to, or a PipelineError.
    Refuses absolute paths, drive letters, '..' and hidden parts (the project's own records are hidden)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    bad = (not parts or name.startswith(("/", "\\")) or (len(parts[0]) >= 2 and parts[0][1] == ":")
           or any(part in ("", ".", "..") or part.startswith(".") or "\0" in part for part in parts))
    if bad:
        raise PipelineError(f"{what} name '{name}' is not a plain relative file name (no absolute path, no '..', "
                            "no hidden parts): rename it and upload it again")
    return PurePosixPath(*parts)


def check_suffix(name: PurePosixPath) -> str:
    suffix = name.suffix.lower()
    if suffix not in MEDIA_SUFFIXES and suffix not in TRANSCRIPT_SUFFIXES and suffix != ARCHIVE_SUFFIX:
        raise PipelineError(f"{name}: not a recording, transcript or zip archive (accepted: {ACCEPTED}): upload audio or video, "
                            "its .lab transcript, or a zip of them")
    return suffix


def check_media(path: Path, shown: str) -> None:
    """The error prepare would skip this file with, raised now: ffmpeg must find audio in it."""
    try:
        decode(path, PROBE_RATE, max_seconds=PROBE_SECONDS)
    except PipelineError as e:
        # the scratch file's path means nothing to the user: name the file as they did
        reason = str(e).removeprefix(f"{path}: ").replace(str(path), shown)
        raise PipelineError(f"{shown}: not usable audio, {reason}: upload a recording ffmpeg can read") from None


def check_transcript(path: Path, shown: str) -> None:
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PipelineError(f"{shown} is not UTF-8 text: save the transcript as UTF-8 and upload it again") from None


def check_name(name: str) -> PurePosixPath:
    """An upload's name, checked before its body is read."""
    relative = safe_relative(name)
    check_suffix(relative)
    return relative


def save_upload(received: Path, name: str, folder: Path, limits: UploadLimits = UploadLimits()) -> list[Path]:
    """Install one uploaded file (its body already in `received`, a scratch file) into `folder`, or the
    members of a zip archive. Returns the files written; nothing is written on any error."""
    relative = check_name(name)
    suffix = relative.suffix.lower()
    folder.mkdir(parents=True, exist_ok=True)
    if suffix == ARCHIVE_SUFFIX:
        with tempfile.TemporaryDirectory(dir=received.parent, prefix=".unpack-") as scratch:
            return _extract_zip(received, relative.as_posix(), folder, Path(scratch), limits)
    _check_file(received, relative.as_posix(), suffix)
    target = folder / relative.name  # folders in a single file's name mean nothing here
    _install(received, target)
    return [target]


def _check_file(path: Path, shown: str, suffix: str) -> None:
    if suffix in TRANSCRIPT_SUFFIXES:
        check_transcript(path, shown)
    else:
        check_media(path, shown)


def _install(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _extract_zip(archive: Path, shown: str, folder: Path, scratch: Path, limits: UploadLimits) -> list[Path]:
    """Every member checked first (name, type, declared size), then extracted and checked as a file, then all
    installed: an archive with one bad member writes nothing."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise PipelineError(f"{shown} is not a readable zip archive: upload a .zip made by a zip tool") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_members:
            raise PipelineError(f"{shown} holds {len(members)} files, more than {limits.max_members}: upload it in parts")
        declared = sum(m.file_size for m in members)
        if declared > limits.max_unpacked_bytes:
            raise PipelineError(f"{shown} unpacks to {declared / 1e9:.1f} GB, more than the {limits.max_unpacked_bytes / 1e9:.1f} GB "
                                "allowed: upload it in parts")
        planned = []
        for member in members:
            relative = safe_relative(member.filename, f"{shown}: member")
            if stat.S_ISLNK(member.external_attr >> 16):
                raise PipelineError(f"{shown}: member '{member.filename}' is a symbolic link: archive the files themselves")
            if relative.suffix.lower() not in MEDIA_SUFFIXES and relative.suffix.lower() not in TRANSCRIPT_SUFFIXES:
                continue  # a README or a cover image beside the recordings is not ours to keep
            planned.append((member, relative))
        if not planned:
            raise PipelineError(f"{shown} holds no recordings or transcripts (accepted: {ACCEPTED})")
        unpacked = scratch / "unpacked"
        written = 0
        for member, relative in planned:
            target = unpacked / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                # the header's sizes may lie: count what really comes out
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > limits.max_unpacked_bytes:
                        raise PipelineError(f"{shown} unpacks to more than its headers declare and more than "
                                            f"{limits.max_unpacked_bytes / 1e9:.1f} GB: upload it in parts")
                    dst.write(block)
            _check_file(target, f"{shown}: {relative}", relative.suffix.lower())
    installed = []
    for _, relative in planned:
        target = folder / relative
        _install(unpacked / relative, target)
        installed.append(target)
    return installed


async def receive(chunks, path: Path, max_bytes: int, shown: str) -> None:
    """Write an async stream of byte chunks (a request body) to `path`, refusing one over `max_bytes`."""
    size = 0
    with open(path, "wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise PipelineError(f"{shown} is larger than the {max_bytes / 1e9:.1f} GB an upload may be: upload it in parts")
            out.write(chunk)
