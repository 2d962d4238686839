import fcntl
import os
import signal
import subprocess
import sys

import pytest

from fs_pipeline import PipelineError
from fs_pipeline.lock import project_lock

# Takes the lock on argv[1] as soon as the test says go (stdin), so that two of them race for it.
CONTENDER = """
import sys, time
from pathlib import Path
from fs_pipeline import PipelineError
from fs_pipeline.lock import project_lock
folder = Path(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    with project_lock(folder, "pipeline"):
        (folder / f"worked-{sys.argv[2]}").touch()
        time.sleep(0.3)
except PipelineError as e:
    print(e, flush=True)
    sys.exit(3)
"""

# Holds the lock on argv[1] until killed.
HOLDER = """
import sys, time
from fs_pipeline.lock import project_lock
with project_lock(sys.argv[1], "prepare"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_of_two_runs_started_at_once_exactly_one_works(tmp_path):
    for attempt in range(20):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        procs = [_start(CONTENDER, folder, i) for i in range(2)]
        for p in procs:
            assert p.stdout.readline() == "ready\n"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = {p: p.communicate()[0] for p in procs}
        winner, loser = sorted(procs, key=lambda p: p.returncode)
        assert (winner.returncode, loser.returncode) == (0, 3), f"attempt {attempt}: both exited {winner.returncode}"
        assert len(list(folder.glob("worked-*"))) == 1
        message = f"another pipeline run (pid {winner.pid}) is using {folder}: wait for it to finish or stop it, then rerun\n"
        assert outputs[loser] == message, f"attempt {attempt}"


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    holder = _start(HOLDER, tmp_path)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(PipelineError) as held:
            with project_lock(tmp_path, "pipeline"):
                pass
        assert str(held.value) == (
            f"another prepare run (pid {holder.pid}) is using {tmp_path}: wait for it to finish or stop it, then rerun"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    with project_lock(tmp_path, "pipeline"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} pipeline\n"


@pytest.fixture
def locked_elsewhere(tmp_path):
    """The lock on tmp_path held through an open file of its own, as another process would hold it."""
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield fd
    os.close(fd)


def test_a_holder_that_has_not_written_its_pid_yet_is_not_named(tmp_path, locked_elsewhere, monkeypatch):
    monkeypatch.setattr("fs_pipeline.lock.HOLDER_WAIT_S", 0.05)
    with pytest.raises(PipelineError, match=f"^another run is using {tmp_path}: wait for it"):
        with project_lock(tmp_path, "pipeline"):
            pass


def test_a_pid_left_by_a_killed_run_is_not_named(tmp_path, locked_elsewhere, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.pwrite(locked_elsewhere, f"{dead.stdout.strip()} prepare\n".encode(), 0)
    monkeypatch.setattr("fs_pipeline.lock.HOLDER_WAIT_S", 0.05)
    with pytest.raises(PipelineError, match="^another run is using"):
        with project_lock(tmp_path, "pipeline"):
            pass


def test_nested_in_one_process_holds_until_the_outermost_ends(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path)
    with project_lock(tmp_path, "pipeline"):
        with project_lock(tmp_path / "link", "prepare"):
            pass
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} pipeline\n"
        other = os.open(tmp_path / ".lock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert (tmp_path / ".lock").read_text() == ""
    with project_lock(tmp_path, "pipeline"):
        pass


def test_an_error_in_the_body_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with project_lock(tmp_path, "pipeline"):
            raise RuntimeError
    with project_lock(tmp_path, "pipeline"):
        pass


def test_a_missing_folder_is_an_error_not_created(tmp_path):
    with pytest.raises(PipelineError, match=f"^cannot create the lock {tmp_path}/nothing/.lock .*: check that {tmp_path}/nothing exists"):
        with project_lock(tmp_path / "nothing", "extract"):
            pass
    assert not (tmp_path / "nothing").exists()
