import os
import stat

import numpy as np
import pytest

from fs_pipeline.fileio import atomic_path, write_text_atomic


@pytest.fixture
def disk_calls(monkeypatch):
    """Every os.fsync and os.replace, in order: ("fsync", "file", inode, content), ("fsync", "dir", inode)
    or ("replace", inode)."""
    calls = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            calls.append(("fsync", "dir", st.st_ino))
        else:
            calls.append(("fsync", "file", st.st_ino, os.pread(fd, st.st_size, 0)))
        fsync(fd)

    def recording_replace(src, dst):
        calls.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


def _expected(path, content: bytes):
    """File synced with its whole content, then renamed, then its directory synced."""
    inode = path.stat().st_ino
    return [("fsync", "file", inode, content), ("replace", inode), ("fsync", "dir", path.parent.stat().st_ino)]


def test_write_text_atomic_syncs_the_file_then_renames_then_syncs_the_dir(tmp_path, disk_calls):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "hello\n")
    assert disk_calls == _expected(path, b"hello\n")


def test_a_file_written_by_another_library_is_synced_before_the_rename(tmp_path, disk_calls):
    path = tmp_path / "codes.npy"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.arange(1000))
    assert disk_calls == _expected(path, path.read_bytes())
    assert np.array_equal(np.load(path), np.arange(1000))


def test_a_failed_body_leaves_the_old_content_and_no_temp_file(tmp_path, disk_calls):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")
    disk_calls.clear()
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    assert disk_calls == []
