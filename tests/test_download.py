"""Downloading base weights: huggingface_hub against a local stand-in for the Hub's HTTP API (127.0.0.1 only)."""

import hashlib
import http.server
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from fs_pipeline import PipelineError, download
from fs_pipeline.download import DownloadSettings
from fs_pipeline.versions import get_version
from tests.conftest import REPO, cli

VERSION = get_version("s1-mini")
HUB_REPO = VERSION.hub.repo
GOOD_TOKEN = "hf_test_token_with_access"


@dataclass
class StandInRepo:
    files: dict[str, bytes]
    commit: str
    gate: int | None = None  # 401 or 403: the status a gated repository answers without a token that may read it


@dataclass
class StandInHub:
    """The calls huggingface_hub makes to download a model: revision info, the tree listing, and HEAD/GET on
    resolve/ with X-Repo-Commit, ETag and Range. Records every request as (method, path, Range header)."""

    repos: dict[str, StandInRepo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> drop the connection after this many bytes, once
    fail_get: set[str] = field(default_factory=set)  # files whose next GET answers 500, once
    url: str = ""

    def gets(self) -> list[str]:
        return [path.rsplit("/", 1)[-1] for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]


def _handler(hub: StandInHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def answer(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path):
                return self.revision_info(m[1], m[2] or "main")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                return self.tree(m[1], m[2])
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self.resolve(m[1], m[2], m[3], body)
            self.error(404, "NotFound")

        def repo_at(self, repo_id: str, revision: str) -> StandInRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(404, "RepoNotFound")
            elif revision not in ("main", repo.commit):
                self.error(404, "RevisionNotFound")
            else:
                return repo
            return None

        def revision_info(self, repo_id: str, revision: str):
            if repo := self.repo_at(repo_id, revision):
                self.json({"id": repo_id, "sha": repo.commit, "private": False, "gated": "manual" if repo.gate else False,
                           "siblings": [{"rfilename": name} for name in repo.files]})

        def tree(self, repo_id: str, revision: str):
            if repo := self.repo_at(repo_id, revision):
                self.json([{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                           for name, data in repo.files.items()])

        def resolve(self, repo_id: str, revision: str, name: str, body: bool):
            if not (repo := self.repo_at(repo_id, revision)):
                return
            if repo.gate and self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
                return self.error(repo.gate, "GatedRepo")
            if name not in repo.files:
                return self.error(404, "EntryNotFound")
            data = repo.files[name]
            if body and name in hub.fail_get:
                hub.fail_get.discard(name)
                return self.error(500, "InternalError")
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) if body and self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if start == 0 and name in hub.cut_after:
                self.wfile.write(data[:hub.cut_after.pop(name)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                return
            self.wfile.write(data[start:])

        def json(self, data):
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def error(self, status: int, code: str):
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture(scope="module")
def release_files(tiny_model_path) -> dict[str, bytes]:
    """The tiny model as a repository on the Hub would hold it, with a file no release needs."""
    files = {path.name: path.read_bytes() for path in sorted(tiny_model_path.iterdir())}
    return files | {".gitattributes": b"*.pth filter=lfs diff=lfs merge=lfs -text\n"}


def _point_huggingface_hub_at(url: str, home: Path, monkeypatch) -> None:
    """huggingface_hub reads its settings from the environment when it is imported: set both, for this process
    and for the scripts a test starts."""
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "XDG_CONFIG_HOME": str(home / "config")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH", "CI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    old_home = constants.HF_HOME
    for name, value in vars(constants).items():  # the token, the cache and everything else under HF_HOME
        if name.isupper() and isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, str(home) + value[len(old_home):])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))


@pytest.fixture
def hub(release_files, tmp_path, monkeypatch):
    hub = StandInHub(repos={HUB_REPO: StandInRepo(dict(release_files), commit=hashlib.sha1(b"release 1").hexdigest())})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    _point_huggingface_hub_at(hub.url, tmp_path / "hf", monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield hub
    server.shutdown()
    server.server_close()


def fetch(target: Path, revision: str | None = None) -> download.DownloadResult:
    return download.download(DownloadSettings(version=VERSION.name, target=target, revision=revision))


def accepted(tmp_path: Path) -> None:
    download.accept_license(VERSION, tmp_path / "hf" / "config" / "fs-pipeline")


def test_download_then_check_model(hub, tmp_path, tiny_model_path):
    accepted(tmp_path)
    result = cli("--download-model", "--pretrained-ckpt-path", "models/s1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    target = tmp_path / "models" / "s1"
    for path in tiny_model_path.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes()
    assert not (target / ".gitattributes").exists()  # only what the release needs
    record = json.loads((target / download.RECORD_FILE).read_text())
    assert record["commit"] == hub.repos[HUB_REPO].commit and record["repository"] == HUB_REPO
    # the same checks as --check-model, then where it is and what to run next
    assert "model version  s1-mini" in result.output and "4 codebooks" in result.output
    assert "--pretrained-ckpt-path models/s1" in result.output.strip().splitlines()[-1]
    assert "--full-pipeline" in result.output.strip().splitlines()[-1]

    # a rerun finds the folder complete and fetches nothing
    hub.requests.clear()
    again = fetch(target)
    assert again.fetched_bytes == 0 and hub.gets() == []


def test_a_dropped_connection_resumes_where_it_stopped(hub, tmp_path, monkeypatch, release_files):
    from huggingface_hub import constants

    # huggingface_hub keeps what it received in whole chunks of 10 MB, hundreds in a real release's weights; the
    # tiny model's weights must span several chunks too for a resume to start past the beginning.
    chunk = 64 * 1024
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    cut = len(release_files["model.pth"]) // 2
    hub.cut_after["model.pth"] = cut
    fetch(tmp_path / "m")
    assert (tmp_path / "m" / "model.pth").read_bytes() == release_files["model.pth"]
    ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith("/model.pth")]
    assert ranges == [None, f"bytes={cut // chunk * chunk}-"] and cut // chunk > 0  # the rest only, not the whole file


def test_an_interrupted_download_is_finished_by_a_rerun(hub, tmp_path, release_files):
    hub.fail_get.add("codec.pth")
    with pytest.raises(PipelineError, match=r"answered 500 .* rerun the same command: it keeps the files already complete"):
        fetch(tmp_path / "m")
    assert download.needs_download(tmp_path / "m", VERSION.name)  # unfinished: a pipeline run offers the download again
    hub.requests.clear()
    fetch(tmp_path / "m")
    assert hub.gets() == ["codec.pth"]
    assert (tmp_path / "m" / "codec.pth").read_bytes() == release_files["codec.pth"]
    assert not download.needs_download(tmp_path / "m", VERSION.name)
    # as complete without our record, as `hf download --local-dir` leaves a folder
    (tmp_path / "m" / download.RECORD_FILE).unlink()
    assert not download.needs_download(tmp_path / "m", VERSION.name)


@pytest.mark.parametrize("gate", [401, 403])
def test_gated_repository_names_the_fix(hub, tmp_path, monkeypatch, gate):
    hub.repos[HUB_REPO].gate = gate
    with pytest.raises(PipelineError) as refused:
        fetch(tmp_path / "m")
    message = str(refused.value)
    assert f"({gate})" in message and f"accept its licence on {hub.url}/{HUB_REPO}" in message
    assert "hf auth login" in message and "HF_TOKEN" in message and "\n" not in message
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)  # huggingface_hub's token, as a user sets it
    assert fetch(tmp_path / "m").commit == hub.repos[HUB_REPO].commit


def test_unreachable_endpoint(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_huggingface_hub_at(closed, tmp_path / "hf", monkeypatch)
    with pytest.raises(PipelineError, match=rf"cannot reach the Hub at {closed} \(ConnectError.*check the network"):
        fetch(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_revision_and_repository(hub, tmp_path):
    with pytest.raises(PipelineError, match=rf"revision 'v9' not found in {HUB_REPO}: pass a branch, tag or commit"):
        fetch(tmp_path / "m", revision="v9")
    del hub.repos[HUB_REPO]
    with pytest.raises(PipelineError, match=rf"repository {HUB_REPO} not found on {hub.url} \(404\): check HF_ENDPOINT"):
        fetch(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_pinned_revision_is_recorded(hub, tmp_path):
    commit = hub.repos[HUB_REPO].commit
    fetch(tmp_path / "m", revision=commit)
    assert json.loads((tmp_path / "m" / download.RECORD_FILE).read_text())["commit"] == commit


def test_not_enough_disk_space_stops_before_downloading(hub, tmp_path, monkeypatch, release_files):
    # The one stand-in: a full disk can't be made here. Only the check's input is replaced.
    monkeypatch.setattr(download, "_free_bytes", lambda folder: 1000)
    needed = sum(len(data) for name, data in release_files.items() if name != ".gitattributes")
    with pytest.raises(PipelineError, match=rf"{needed / 1e6:.2f} MB still to download into .*, 0.00 MB free there"):
        fetch(tmp_path / "m")
    assert hub.gets() == [] and not (tmp_path / "m").exists()


def test_a_repository_without_a_release_file_is_refused(hub, tmp_path):
    del hub.repos[HUB_REPO].files["codec.pth"]
    with pytest.raises(PipelineError, match=rf"{HUB_REPO} at its default branch has no codec.pth, which a s1-mini release needs"):
        fetch(tmp_path / "m")
    assert hub.gets() == []


def test_offline_keeps_a_complete_download_and_refuses_a_new_one(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    fetch(tmp_path / "m")
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fetch(tmp_path / "m").commit == hub.repos[HUB_REPO].commit
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE is set, so .* can't be downloaded"):
        fetch(tmp_path / "other")
    assert hub.requests == []


def test_licence_not_accepted_is_refused_with_its_text(hub, tmp_path):
    result = cli("--download-model", "--pretrained-ckpt-path", "m")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[:2] == list(download.license_lines(VERSION))
    assert "CC-BY-NC-SA-4.0" in lines[0] and VERSION.hub.license_url in lines[1]
    assert lines[2].startswith("error: ") and "--accept-license" in lines[2] and len(lines) == 3
    assert hub.requests == [] and not (tmp_path / "m").exists()

    # accepted once, remembered: the next download asks no more
    assert cli("--download-model", "--pretrained-ckpt-path", "m", "--accept-license", "--device", "cpu").exit_code == 0
    assert download.license_accepted(VERSION, tmp_path / "hf" / "config" / "fs-pipeline")
    assert download.license_lines(VERSION)[0] not in cli("--download-model", "--pretrained-ckpt-path", "m", "--device", "cpu").output


def test_full_pipeline_without_base_model_and_without_terminal_gives_the_command(hub, tmp_path):
    args = ["--project", "p", "--data-dir", "raw", "--full-pipeline", "--pretrained-ckpt-path", "nowhere"]
    result = cli(*args)  # the data is checked before a download is offered
    assert result.exit_code == 1 and result.output.startswith("error: dataset not found: raw")
    (tmp_path / "raw").mkdir()
    result = cli(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no base model at nowhere")
    assert "`python finetune_tts.py --download-model --pretrained-ckpt-path nowhere`" in lines[0]
    assert hub.requests == [] and not (tmp_path / "nowhere").exists()


def _on_terminal(args: list[str], answer: str, env: dict) -> tuple[int, str]:
    """Run finetune_tts.py with a terminal as its stdin and stdout (a pseudo-terminal), typing `answer`."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(REPO / "finetune_tts.py"), *args], stdin=follower, stdout=follower,
                               stderr=follower, env=env, close_fds=True)
    os.close(follower)
    os.write(leader, answer.encode())
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return process.wait(timeout=60), output.decode(errors="replace").replace("\r\n", "\n")


def test_full_pipeline_on_a_terminal_asks_before_downloading(hub, tmp_path):
    (tmp_path / "raw").mkdir()
    args = ["--project", "p", "--data-dir", "raw", "--full-pipeline", "--pretrained-ckpt-path", "nowhere"]
    code, output = _on_terminal(args, "n\n", dict(os.environ))
    assert code == 1, output
    assert download.license_lines(VERSION)[0] in output and "[y/N]" in output
    assert "--download-model --pretrained-ckpt-path nowhere" in output.strip().splitlines()[-1]
    # CI set: no question even on a terminal
    code, output = _on_terminal(args, "", dict(os.environ, CI="true"))
    assert code == 1 and "[y/N]" not in output and "--download-model" in output
    assert hub.requests == []
    # yes: the licence is accepted and the download starts (here refused by the gate, which keeps the test fast:
    # test_download_then_check_model covers a download that succeeds)
    hub.repos[HUB_REPO].gate = 401
    code, output = _on_terminal(args, "y\n", dict(os.environ))
    assert code == 1 and "Licence accepted" in output, output
    assert output.strip().splitlines()[-1].startswith("\x1b[31merror: the Hub refused the files of")
    assert download.license_accepted(VERSION, tmp_path / "hf" / "config" / "fs-pipeline")
    assert any("/resolve/" in path for _, path, _ in hub.requests)
