"""The lock a run holds on a folder while it writes there, so that two runs never write one project at once.

The lock is an flock on `folder/.lock`, which the operating system drops when the holding process exits
or is killed, so no lock is ever stale. The file holds one line, "<pid> <what>\\n", written by the holder
after it takes the lock, so that a run turned away can say which run is in its way.
"""

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from fs_pipeline import PipelineError

# Between taking the lock and writing its line the holder is a few system calls behind; a run turned away
# waits up to this long for the line before it gives up on naming the holder.
HOLDER_WAIT_S = 2.0

# How deeply this process holds each lock, by resolved folder. The count lets a stage take the lock that
# the pipeline calling it already holds (flock would refuse a second open file of the same process).
_depth: dict[Path, int] = {}


@contextmanager
def project_lock(folder: Path, what: str):
    """Hold `folder`/.lock while a run (`what`: "pipeline", "prepare", ...) works there; `folder` must exist.
    Taking it again in the same process nests; another process gets a PipelineError naming the holder."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _depth:
        _depth[key] += 1
        try:
            yield
        finally:
            _depth[key] -= 1
        return

    lock = folder / ".lock"
    # The folder is not created here: a lock on a mistyped input folder must not conjure an empty one.
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise PipelineError(f"cannot create the lock {lock} ({e.strerror}): check that {folder} exists and is writable") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _wait_for_holder(fd)
        os.close(fd)
        who = f"another {holder[1]} run (pid {holder[0]})" if holder else "another run"
        raise PipelineError(f"{who} is using {folder}: wait for it to finish or stop it, then rerun") from None

    _depth[key] = 1
    try:
        # Truncate, then one write: a reader sees at most a beginning of this line, and _read_holder trusts
        # only a whole one. No leftover of a longer earlier line can follow it.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        yield
    finally:
        del _depth[key]
        # Cleared while still locked, so the line never outlives its run after a normal exit. The file
        # itself stays: unlinking it would let a third run lock a new file while a second holds the old one.
        os.ftruncate(fd, 0)
        os.close(fd)


def _wait_for_holder(fd: int) -> tuple[int, str] | None:
    """(pid, what) of the process holding the lock open as `fd`, or None if it cannot be told in time."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        holder = _read_holder(fd)
        if holder or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)


def _read_holder(fd: int) -> tuple[int, str] | None:
    line = os.pread(fd, 4096, 0).decode(errors="replace")
    pid, _, what = line.removesuffix("\n").partition(" ")
    # No newline: the holder has not written yet. A dead pid: the line is left over from a killed run
    # and the new holder has yet to overwrite it.
    if not line.endswith("\n") or not pid.isdigit() or not _alive(int(pid)):
        return None
    return int(pid), what


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    return True
