"""Long work started from the page runs as a job: a subprocess of a command-line script (finetune_tts.py,
prepare_dataset.py, cli_tts.py), so that it is exactly what the CLI does and outlives the page and its tab.

Each job has a record and a log in results/<project>/webui/jobs/: <id>.json (what runs, its pid, when it
started, and once the server saw it end, its exit status) and <id>.log (its stdout and stderr). The page
reads them, so a reloaded page finds a running job and its progress. The CLI takes the project's lock, so
a second job on a busy project ends with the CLI's own error, which the page shows.
"""

import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from fs_pipeline import PipelineError
from fs_pipeline.fileio import write_json_atomic
from fs_pipeline.project import Project

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = ("finetune_tts.py", "prepare_dataset.py", "cli_tts.py")
LOG_TAIL_BYTES = 16_384
PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[")  # a tqdm bar's line
_records_lock = threading.Lock()
# The jobs this server started, by id: their exit status is known the moment they end, before the record is
# rewritten (a job of an earlier server is judged by its pid alone).
_children: dict[str, subprocess.Popen] = {}


def jobs_dir(project: Project) -> Path:
    return project.dir / "webui" / "jobs"


def start(project: Project, kind: str, script: str, args: list[str], **extra) -> dict:
    """Start `python script args...` in the current folder (where results/ and training_data/ are), in a
    session of its own so that stopping the server does not interrupt it. Returns the job's record."""
    if script not in SCRIPTS:
        raise ValueError(f"not one of the pipeline scripts: {script}")
    folder = jobs_dir(project)
    folder.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    job_id = f"{started.strftime('%Y%m%d-%H%M%S-%f')}-{kind}"
    log_path = folder / f"{job_id}.log"
    argv = [sys.executable, str(REPO / script), *args]
    # unbuffered, so the log shows progress as it happens
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    _children[job_id] = process
    record = {"id": job_id, "kind": kind, "argv": argv, "pid": process.pid, "started_at": started.isoformat(timespec="seconds"),
              "returncode": None, **extra}
    _save(folder / f"{job_id}.json", record)
    threading.Thread(target=_wait, args=(process, folder / f"{job_id}.json"), daemon=True).start()
    return describe(record, log_path)


def _wait(process: subprocess.Popen, path: Path) -> None:
    returncode = process.wait()
    with _records_lock:
        record = _load(path)
        record.update(returncode=returncode, ended_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json_atomic(path, record)


def _save(path: Path, record: dict) -> None:
    with _records_lock:
        write_json_atomic(path, record)


def _load(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _alive(pid: int) -> bool:
    """Whether `pid` still runs one of our scripts (a pid reused by another program does not count)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return any(script.encode() in cmdline for script in SCRIPTS)


def describe(record: dict, log_path: Path) -> dict:
    """The record with its state (running, done, failed, stopped, ended), the log's last lines, the CLI's
    error line if it printed one, and the last progress line (tqdm's latest update)."""
    tail = _tail(log_path)
    lines = [part.strip() for line in tail.splitlines() for part in line.split("\r") if part.strip()]
    # our CLIs print "error: ...", click's own checks "Error: ..."
    errors = [line[len("error: "):] for line in lines if line.lower().startswith("error: ")]
    returncode = record.get("returncode")
    child = _children.get(record["id"])
    if returncode is None and child is not None:
        returncode = child.returncode  # set by the waiter's wait() as the process ends
        alive = returncode is None
    else:
        alive = returncode is None and _alive(record["pid"])
    if alive:
        state = "running"
    elif returncode is None:
        state = "ended"  # the server that started it was gone when it ended: the log says how
    elif returncode == 0:
        state = "done"
    elif returncode in (130, -signal.SIGINT):
        state = "stopped"
    else:
        state = "failed"
    progress = [line for line in lines if PROGRESS.search(line)]
    return record | {"returncode": returncode, "state": state, "log": log_path.name, "log_tail": [line for line in lines if not PROGRESS.search(line)][-12:],
                     "error": errors[-1] if errors else None, "progress": progress[-1] if progress else None}


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def all_jobs(project: Project) -> list[dict]:
    """Every job of the project, oldest first."""
    folder = jobs_dir(project)
    if not folder.is_dir():
        return []
    return [describe(_load(path), path.with_suffix(".log")) for path in sorted(folder.glob("*.json"))]


def stop(project: Project, job_id: str) -> dict:
    """SIGINT, as Ctrl+C in a terminal: training saves a checkpoint at the current step and exits 130."""
    path = jobs_dir(project) / f"{job_id}.json"
    if not re.fullmatch(r"[\w-]+", job_id) or not path.is_file():
        raise PipelineError(f"no job {job_id} in project {project.name}: reload the page")
    job = describe(_load(path), path.with_suffix(".log"))
    if job["state"] != "running":
        raise PipelineError(f"job {job_id} is not running ({job['state']}): nothing to stop")
    os.kill(job["pid"], signal.SIGINT)
    return job
