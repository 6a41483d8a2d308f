"""pibake.files.atomic_write: the one temp-file-and-rename writer (secrets, cluster.yaml, plan.yaml, slurm.conf,
the lab's state, reports)."""

import os
import threading

import pytest

from pibake.files import atomic_write


def test_writes_text_and_bytes_with_the_mode_and_leaves_no_temp_file(tmp_path):
    atomic_write(tmp_path / "a.conf", "ünïcode\n")
    atomic_write(tmp_path / "key", b"\x00\x01", 0o400)
    assert (tmp_path / "a.conf").read_text(encoding="utf-8") == "ünïcode\n"
    assert (tmp_path / "key").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.conf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.conf", "key"]


def test_replaces_the_file_whole_with_the_new_mode(tmp_path):
    path = tmp_path / "join-token.json"
    path.write_text("old, world-readable")
    path.chmod(0o666)
    inode = path.stat().st_ino
    atomic_write(path, "new", 0o400)
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o400
    assert path.stat().st_ino != inode  # a new file renamed over the old: a reader saw one or the other


def test_a_stale_temp_file_is_not_reused(tmp_path):
    stale = tmp_path / f".x.tmp-{os.getpid()}-{threading.get_ident()}"
    stale.write_text("left by a crash")
    stale.chmod(0o666)
    atomic_write(tmp_path / "x", "fresh", 0o600)
    assert (tmp_path / "x").read_text() == "fresh" and not stale.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("nodes: []\n")
    with pytest.raises(TypeError):
        atomic_write(path, 42)
    assert path.read_text() == "nodes: []\n" and [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_parents_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "etc" / "slurm" / "slurm.conf", "x")
    atomic_write(tmp_path / "etc" / "slurm" / "slurm.conf", "x", make_parents=True)
    assert (tmp_path / "etc" / "slurm" / "slurm.conf").read_text() == "x"
