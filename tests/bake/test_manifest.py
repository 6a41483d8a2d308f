"""The burn manifest: appended atomically, folded per burn, killed burns reported as incomplete."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest

from pibake.bake import manifest


def test_start_then_finish_folds_into_one_complete_entry(tmp_path):
    burn_id = manifest.start(tmp_path, hostname="red01", ip="10.1.1.11", role="worker",
                             instance_id="iid-1", image={"name": "x.img", "sha256": "a" * 64},
                             target="out/red01.img", target_kind="file")
    (entry,) = manifest.entries(tmp_path)
    assert entry["status"] == "running"  # this very process started it and is alive
    manifest.finish(tmp_path, burn_id, "complete", written_sha256="b" * 64, bytes_written=123)
    (entry,) = manifest.entries(tmp_path)
    assert entry["burn_id"] == burn_id and entry["status"] == "complete"
    assert entry["hostname"] == "red01" and entry["written_sha256"] == "b" * 64
    assert entry["started"] <= entry["finished"]
    assert [e["status"] for e in entry["events"]] == ["started", "complete"]
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["started", "complete"]


def test_failed_burn_keeps_its_reason(tmp_path):
    burn_id = manifest.start(tmp_path, hostname="red02", ip="10.1.1.12")
    manifest.finish(tmp_path, burn_id, "failed", reason="read-back differs")
    (entry,) = manifest.entries(tmp_path)
    assert (entry["status"], entry["reason"]) == ("failed", "read-back differs")
    with pytest.raises(ValueError):
        manifest.finish(tmp_path, burn_id, "started")


def test_a_killed_burn_is_incomplete(tmp_path):
    code = ("import sys, time; from pibake.bake import manifest; "
            "manifest.start(sys.argv[1], hostname='red03', ip='10.1.1.13'); print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        (entry,) = manifest.entries(tmp_path)
        assert entry["status"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    (entry,) = manifest.entries(tmp_path)
    assert entry["status"] == "incomplete"
    assert "never finished" in entry["reason"]


def test_records_from_another_machine_are_never_running(tmp_path):
    manifest.append(tmp_path, {"burn_id": "x1", "status": "started", "hostname": "red04",
                               "pid": os.getpid(), "machine": "some-other-laptop"})
    assert manifest.entries(tmp_path)[0]["status"] == "incomplete"


def test_torn_line_is_skipped_and_latest_by_hostname(tmp_path):
    first = manifest.start(tmp_path, hostname="red01", ip="10.1.1.11")
    manifest.finish(tmp_path, first, "failed", reason="card pulled")
    with open(tmp_path / "manifest.jsonl", "ab") as fh:
        fh.write(b'{"burn_id": "torn", "stat')  # a crash in the middle of someone else's write
        fh.write(b"\n")
    second = manifest.start(tmp_path, hostname="red01", ip="10.1.1.11")
    manifest.finish(tmp_path, second, "complete")
    other = manifest.start(tmp_path, hostname="red02", ip="10.1.1.12")
    latest = manifest.latest_by_hostname(tmp_path)
    assert latest["red01"]["burn_id"] == second and latest["red01"]["status"] == "complete"
    assert latest["red02"]["burn_id"] == other
    assert [e["burn_id"] for e in manifest.entries(tmp_path)] == [first, second, other]


def test_no_manifest_yet(tmp_path):
    assert manifest.entries(tmp_path) == [] and manifest.latest_by_hostname(tmp_path) == {}


def _append_many(cluster_dir, tag, count):
    for i in range(count):
        burn_id = manifest.start(cluster_dir, hostname=f"{tag}{i:03d}", ip="10.1.1.1", pad="x" * 3000)
        manifest.finish(cluster_dir, burn_id, "complete")


def test_parallel_appends_never_interleave(tmp_path):
    threads = [threading.Thread(target=_append_many, args=(tmp_path, f"t{n}", 40)) for n in range(4)]
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(tmp_path, f"p{n}", 40))
             for n in range(2)]
    for worker in procs + threads:  # fork first: a child forked while a thread holds a lock would hang
        worker.start()
    for worker in threads + procs:
        worker.join()
    assert all(p.exitcode == 0 for p in procs)
    lines = (tmp_path / "manifest.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]  # every line is a whole record
    assert len(parsed) == 6 * 40 * 2
    folded = manifest.entries(tmp_path)
    assert len(folded) == 240 and {e["status"] for e in folded} == {"complete"}
