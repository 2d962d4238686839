"""Shared fixtures: the tiny model kit and the built-in sample, built once per test session."""

import functools
import http.server
import importlib.util
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from fs_pipeline.device import select_device
from fs_pipeline.models import open_model_dir
from fs_pipeline.sample import write_sample_dataset
from fs_pipeline.tiny_model import write_tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture
def tiny_model_copy(tiny_model_path, tmp_path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(tiny_model_path, tmp_path / "model"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_path):
    return open_model_dir(tiny_model_path)


@pytest.fixture(scope="session")
def cpu():
    return select_device("cpu")


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, tiny_model_dir) -> Path:
    return write_sample_dataset(tmp_path_factory.mktemp("data") / "sample", tiny_model_dir.version.sample_rate)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve_folder(root: Path):
    """A local HTTP server for `root` (standing in for a remote host); yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def load_script(name: str):
    """Import one of the top-level scripts (finetune_tts.py, ...) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = ["--max-steps", "12", "--checkpoint-every", "4", "--learning-rate", "3e-3", "--warmup-steps", "2"]


@pytest.fixture
def workspace(sample_dataset, tiny_model_path, tmp_path, monkeypatch):
    """A working directory holding the sample dataset; returns the common flags of a tiny-model run."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(sample_dataset, tmp_path / "training_data" / "voice")
    return tmp_path, ["--project", "p", "--data-dir", "training_data/voice", "--pretrained-ckpt-path", str(tiny_model_path),
                      "--num-workers-extract", "0", "--device", "cpu", *TRAIN]


def cli(*args):
    """finetune_tts.py in this process."""
    return CliRunner().invoke(load_script("finetune_tts").main, list(args))


def status_states(project="p"):
    result = cli("--project", project, "--status")
    rows = [line.split(maxsplit=1) for line in result.output.splitlines()[2:]]
    return {stage: rest.split("  ")[0].strip() for stage, rest in rows}
