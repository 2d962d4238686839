"""Download a Fish Speech release's base weights from the Hugging Face Hub.

Reads   the Hub through huggingface_hub, with its settings: HF_ENDPOINT (a mirror), HF_TOKEN or the token saved by
        `hf auth login`, HF_HUB_OFFLINE, and its cache (a file already there is copied, not fetched)
Writes  the release's files (versions.HubRelease) into the model folder, then download.json there: the
        repository and the commit the files come from. The folder is the layout models.open_model_dir checks.
Skips   files already complete in the folder: a rerun after an interruption fetches only what is still missing

The weights' licence is accepted once per model version and remembered in the user's config dir
($XDG_CONFIG_HOME/fs-pipeline, else ~/.config/fs-pipeline).
"""

import errno
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path

from loguru import logger

from fs_pipeline import PipelineError
from fs_pipeline.fileio import user_folder, write_json_atomic
from fs_pipeline.versions import ModelVersion, get_version

RECORD_FILE = "download.json"  # in the model folder; the loader reads only the release's own files
LICENSES_FILE = "accepted-licenses.json"
# Where huggingface_hub keeps a local_dir download's metadata and partial files, inside the model folder.
HUB_METADATA_DIR = Path(".cache") / "huggingface"
RERUN = "rerun the same command: it keeps the files already complete and fetches the rest"


@dataclass(frozen=True)
class DownloadSettings:
    version: str
    target: Path  # the model folder, e.g. checkpoints/openaudio-s1-mini
    revision: str | None = None  # branch, tag or commit; None: the repository's default branch


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    repo: str
    commit: str
    files: dict[str, int]  # name -> size in bytes
    fetched_bytes: int  # what this run had to download; 0 when the folder was complete


def default_folder(version_name: str) -> Path:
    """Where a release goes unless told otherwise: checkpoints/<repository name>, as upstream's docs put it."""
    return Path("checkpoints") / get_version(version_name).hub.folder


def license_lines(version: ModelVersion) -> tuple[str, str]:
    """The weights' licence, in the two lines shown before the first download of a version."""
    hub = version.hub
    where = (f"the repository is gated: accept the terms on {_model_page(hub.repo)} while logged in to the Hub"
             if hub.gated else f"model page: {_model_page(hub.repo)}")
    return (f"The {version.name} weights ({hub.repo}) are licensed {version.license}; a model fine-tuned from them "
            "inherits that licence.",
            f"Licence: {hub.license_url}; {where}.")


def license_accepted(version: ModelVersion, config_dir: Path | None = None) -> bool:
    """Whether the user accepted this version's weights licence on an earlier run (the same licence text)."""
    accepted = _read_json((config_dir or user_folder("config")) / LICENSES_FILE)
    return accepted.get(version.name, {}).get("license") == version.license


def accept_license(version: ModelVersion, config_dir: Path | None = None) -> Path:
    """Remember that the user accepted this version's weights licence. Returns the file that records it."""
    path = (config_dir or user_folder("config")) / LICENSES_FILE
    accepted = _read_json(path)
    accepted[version.name] = {"license": version.license, "license_url": version.hub.license_url,
                              "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(path, accepted)
    return path


def needs_download(target: Path, version_name: str) -> bool:
    """No base model at `target`: no folder, an empty one, or one that a download from the Hub left without a file
    the release needs. (A folder filled by other means is models.open_model_dir's to judge.)"""
    target = Path(target)
    if not target.is_dir():
        return not target.exists()
    present = [path.name for path in target.iterdir()]
    unfinished = (target / HUB_METADATA_DIR).is_dir() and any(
        not any(fnmatchcase(name, pattern) for name in present) for pattern in get_version(version_name).hub.files)
    return not present or unfinished


def download(settings: DownloadSettings) -> DownloadResult:
    """Fetch the version's release into settings.target, after checking that the disk can hold what is still
    missing. Raises PipelineError with one line naming the fix (access, repository, revision, network, disk)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    version = get_version(settings.version)
    hub, target = version.hub, Path(settings.target)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} is a file: pass a folder for the model to --pretrained-ckpt-path")
    if constants.is_offline_mode():
        return _existing_download(hub.repo, settings)

    api = HfApi(library_name="fs-pipeline")
    with _hub_errors(hub.repo, settings, downloading=False):
        commit = api.model_info(hub.repo, revision=settings.revision).sha
        listing = {f.path: f.size for f in api.list_repo_tree(hub.repo, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)}
    files = _release_files(listing, version, settings.revision or "its default branch")
    missing = {name: size for name, size in files.items() if not _complete(target / name, size)}
    _check_space(target, sum(missing.values()), version)

    if missing:
        logger.info(f"Downloading {len(missing)} of {len(files)} files ({_gb(sum(missing.values()))}) of {hub.repo} "
                    f"at commit {commit[:10]} into {target}")
    with _hub_errors(hub.repo, settings, downloading=True):
        # Pinned to the commit just listed, so that the files and the record agree even if the branch moves.
        snapshot_download(hub.repo, revision=commit, local_dir=target, allow_patterns=sorted(files),
                          library_name="fs-pipeline")
    # snapshot_download returns the folder as it is when the Hub stops answering between the listing and the files
    short = [name for name, size in files.items() if not _complete(target / name, size)]
    if short:
        raise PipelineError(f"the download of {hub.repo} into {target} is incomplete ({', '.join(short)} missing or cut "
                            f"short): {RERUN}")
    write_json_atomic(target / RECORD_FILE, {
        "repository": hub.repo, "revision": settings.revision, "commit": commit, "endpoint": constants.ENDPOINT,
        "files": files, "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return DownloadResult(path=target, repo=hub.repo, commit=commit, files=files, fetched_bytes=sum(missing.values()))


def _existing_download(repo: str, settings: DownloadSettings) -> DownloadResult:
    """Offline (HF_HUB_OFFLINE): a complete earlier download of the same repository and revision is kept as it is."""
    record = _read_json(Path(settings.target) / RECORD_FILE)
    if record.get("repository") == repo and settings.revision in (None, record.get("revision"), record.get("commit")):
        logger.info(f"HF_HUB_OFFLINE is set: keeping {settings.target} as downloaded (commit {record['commit'][:10]})")
        return DownloadResult(path=Path(settings.target), repo=repo, commit=record["commit"], files=record["files"],
                              fetched_bytes=0)
    raise PipelineError(f"HF_HUB_OFFLINE is set, so {repo} can't be downloaded into {settings.target}: unset "
                        "HF_HUB_OFFLINE, or copy a downloaded release into that folder")


def _release_files(listing: dict[str, int], version: ModelVersion, revision: str) -> dict[str, int]:
    """The files of the repository listing that the release needs (every one of hub.files must match one) or may
    have (hub.optional_files)."""
    unmatched = [p for p in version.hub.files if not any(fnmatchcase(name, p) for name in listing)]
    if unmatched:
        raise PipelineError(
            f"{version.hub.repo} at {revision} has no {', '.join(unmatched)}, which a {version.name} release needs: "
            "pass the --model-version of that repository, or a --revision that holds a complete release"
        )
    patterns = version.hub.files + version.hub.optional_files
    return {name: size for name, size in sorted(listing.items()) if any(fnmatchcase(name, p) for p in patterns)}


def _complete(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _free_bytes(folder: Path) -> int:
    """Free space on the disk that will hold `folder`, which may not exist yet."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    return shutil.disk_usage(existing).free


def _check_space(target: Path, needed: int, version: ModelVersion) -> None:
    # huggingface_hub writes each file's partial copy inside the folder and renames it into place,
    # so the folder's disk must hold exactly the missing files.
    free = _free_bytes(target)
    if needed > free:
        raise PipelineError(
            f"not enough disk space for the {version.name} weights: {_gb(needed)} still to download into {target}, "
            f"{_gb(free)} free there: free {_gb(needed - free)}, or pass a --pretrained-ckpt-path on a larger disk"
        )


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e7 else f"{size / 1e6:.2f} MB"


def _model_page(repo: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo}"


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e}): delete it and rerun") from e
    return data if isinstance(data, dict) else {}


@contextmanager
def _hub_errors(repo: str, settings: DownloadSettings, downloading: bool):
    """Turns what huggingface_hub raises into one PipelineError line that names the fix. `downloading`: the files
    were being fetched, so a lost connection interrupted a download that a rerun resumes."""
    try:
        yield
    except Exception as error:
        message = _explain(error, repo, settings, downloading)
        if message is None:
            raise
        raise PipelineError(message) from error


def _explain(error: Exception, repo: str, settings: DownloadSettings, downloading: bool) -> str | None:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub wraps the error it met (a refusal, a lost connection) in LocalEntryNotFoundError when it
    # finds no cached copy either: the cause is what the user can act on.
    cause = _root_cause(error)
    status = cause.response.status_code if isinstance(cause, HfHubHTTPError) and cause.response is not None else None
    if isinstance(cause, GatedRepoError) or (status in (401, 403) and not isinstance(cause, RepositoryNotFoundError)):
        return (f"the Hub refused the files of {repo} ({status or 'gated'}): it is gated; accept its licence on "
                f"{_model_page(repo)} while logged in, then run `hf auth login` or set HF_TOKEN to a token that can "
                "read it, and rerun")
    if isinstance(cause, RevisionNotFoundError):
        return (f"revision '{settings.revision}' not found in {repo}: pass a branch, tag or commit of "
                f"{_model_page(repo)} to --revision, or leave it out for the latest release")
    if isinstance(cause, RepositoryNotFoundError):
        return (f"repository {repo} not found on {constants.ENDPOINT} ({status}): check HF_ENDPOINT if you use a "
                "mirror; if the repository is private or gated, run `hf auth login` or set HF_TOKEN")
    if isinstance(cause, OfflineModeIsEnabled):
        return f"HF_HUB_OFFLINE is set, so {repo} can't be downloaded: unset it and rerun"
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"no space left on the device while downloading {repo} into {settings.target}: free some space and {RERUN}"
    # huggingface_hub raises "Consistency check failed" when a file arrived shorter than announced
    if isinstance(cause, (httpx2.TransportError, ConnectionError)) or "Consistency check failed" in str(cause):
        if downloading:
            return f"the download of {repo} into {settings.target} was interrupted ({_short(cause)}): {RERUN}"
        return (f"cannot reach the Hub at {constants.ENDPOINT} ({_short(cause)}): check the network connection "
                "(and HF_ENDPOINT or HTTPS_PROXY if you use them), then rerun")
    if status is not None:
        return f"the Hub at {constants.ENDPOINT} answered {status} for {repo} ({_short(cause)}): try again later; {RERUN}"
    return None


def _root_cause(error: BaseException) -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    while isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    return error


def _short(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__
