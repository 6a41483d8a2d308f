"""The store's one-statement enrolment, its parsed-facts cache, and the in-process apply gate of
RegistryService.apply_slurm (group commit of slurm.conf applies). Real SQLite, real slurm.conf files; the only
stand-in is a wrapper around the applier that holds its first call until the test releases it."""

import threading
import time

import pytest

from pibake.errors import ConflictError
from pibake.registry.service import RegistryService, validate_enrolment
from pibake.registry.slurmconf import expand_hostlist, nodes_section
from pibake.errors import ApplyError
from pibake.registry.store import Store, credential_matches

from .conftest import MEMORY, enrolment

WAIT_S = 60  # only a safety net for a hang: nothing below asserts on time


def record(hostname="red01", index=1, kind="pi4", mac=None):
    return validate_enrolment(enrolment(hostname, index, kind, mac=mac), None, "127.0.0.0/8")


def names_in(conf_text):
    """Every node name of the NodeName lines of a slurm.conf text."""
    names = set()
    for line in nodes_section(conf_text):
        names.update(expand_hostlist(line.split()[0].split("=", 1)[1]))
    return names


def wait_until(predicate, what):
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------- Store.enrol (UPSERT ... RETURNING)

def test_first_enrolment_inserts_and_bumps_the_counter_once(cluster_dir):
    store = Store(cluster_dir)
    seq = store.node_set_seq()
    node, credential, created = store.enrol(record())
    assert created is True
    assert node["enrol_count"] == 1 and node["status"] == "enrolled" and node["message"] == ""
    assert node["hostname"] == "red01" and node["ips"] == ["127.0.77.1"] and node["slurmd_c"]["RealMemory"] == 3789
    assert "credential_hash" not in node and "slurmd_c_raw" not in node
    assert store.check_credential("red01", credential) is not None
    assert store.node_set_seq() == seq + 1


def test_reenrolment_updates_in_place_and_keeps_enrolled_at(cluster_dir):
    store = Store(cluster_dir)
    first, old_credential, _ = store.enrol(record())
    store.set_status("red01", "error", "slurmd failed")
    changed = record(kind="pi4-8g")
    changed["ips"], changed["ip"] = ["127.0.77.9"], "127.0.77.9"
    node, credential, created = store.enrol(changed)
    assert created is False
    assert node["enrol_count"] == 2
    assert node["status"] == "enrolled" and node["message"] == ""  # an error is cleared by a new enrolment
    assert node["enrolled_at"] == first["enrolled_at"]
    assert node["ip"] == "127.0.77.9" and node["slurmd_c"]["RealMemory"] == MEMORY["pi4-8g"]
    assert store.check_credential("red01", old_credential) is None  # the old credential stops working
    assert store.check_credential("red01", credential) is not None
    assert store.count() == 1


def test_pending_stays_pending_on_reenrolment(cluster_dir):
    store = Store(cluster_dir)
    node, _, _ = store.enrol(record(), require_approval=True)
    assert node["status"] == "pending"
    node, _, created = store.enrol(record(), require_approval=False)
    assert created is False and node["status"] == "pending" and node["enrol_count"] == 2


def test_other_mac_conflicts_and_changes_nothing(cluster_dir):
    store = Store(cluster_dir)
    before, credential, _ = store.enrol(record())
    seq = store.node_set_seq()
    with pytest.raises(ConflictError):
        store.enrol(record(mac="dc:a6:32:99:99:99"))
    after = store.get("red01")
    assert after == before
    assert store.node_set_seq() == seq  # the transaction was rolled back
    assert store.check_credential("red01", credential) is not None
    with store.connect() as conn:
        stored_hash = conn.execute("SELECT credential_hash FROM nodes").fetchone()[0]
    assert credential_matches(credential, stored_hash)


# ---------------------------------------------------------------------- Store.slurm_rows (facts cache)

def test_slurm_rows_are_fresh_dicts_and_follow_changes(cluster_dir):
    store = Store(cluster_dir)
    store.enrol(record("red01", 1))
    store.enrol(record("red02", 2))
    rows = store.slurm_rows()
    assert [r["hostname"] for r in rows] == ["red01", "red02"]
    rows[0]["facts"]["RealMemory"] = 1  # a caller's change must not leak into the next call
    again = store.slurm_rows()
    assert again[0]["facts"]["RealMemory"] == 3789
    assert again[0]["facts"] is not rows[0]["facts"]

    store.enrol(record("red01", 1, kind="pi4-8g"))  # new facts for red01: parsed again
    store.delete("red02")
    rows = store.slurm_rows()
    assert [(r["hostname"], r["facts"]["RealMemory"]) for r in rows] == [("red01", MEMORY["pi4-8g"])]


def test_slurm_rows_cache_is_per_store_and_matches_a_fresh_store(cluster_dir):
    writer, reader = Store(cluster_dir), Store(cluster_dir)
    writer.enrol(record("red01", 1))
    assert reader.slurm_rows() == writer.slurm_rows()
    writer.enrol(record("red01", 1, kind="pi3"))  # another process changed the row
    assert reader.slurm_rows() == Store(cluster_dir).slurm_rows()
    assert reader.slurm_rows()[0]["facts"]["RealMemory"] == MEMORY["pi3"]


# ---------------------------------------------------------------------- RegistryService.apply_slurm gate

class HeldApplier:
    """Wraps a registry's applier: the first call waits for ``release``, then runs (or raises)."""

    def __init__(self, reg, fail_first=False):
        self.real = reg.applier.apply
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_first = fail_first
        self.lock = threading.Lock()
        reg.applier.apply = self

    def __call__(self, text, on_applied=None):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            self.entered.set()
            if not self.release.wait(WAIT_S):
                raise AssertionError("the test never released the first apply")
            if self.fail_first:
                raise ApplyError("slurmctld did not come up (test)")
        return self.real(text, on_applied=on_applied)


def enrol_in_threads(reg, names, results):
    threads = []
    for i, name in enumerate(names):
        def run(name=name, i=i):
            try:
                body, _ = reg.enrol(enrolment(name, i + 10))
                results[name] = ("ok", reg.applier.current_text())
            except Exception as exc:  # pylint: disable=broad-except
                results[name] = ("error", exc)
        threads.append(threading.Thread(target=run, daemon=True))
    for t in threads:
        t.start()
    return threads


def test_enrolments_waiting_behind_an_apply_share_the_next_one(cluster_dir, tmp_path):
    reg = RegistryService(cluster_dir, slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    held = HeldApplier(reg)
    results = {}
    first = enrol_in_threads(reg, ["red01"], results)
    assert held.entered.wait(WAIT_S)
    names = [f"red{i:02d}" for i in range(2, 12)]
    others = enrol_in_threads(reg, names, results)
    # every other enrolment is committed while the first apply is held
    wait_until(lambda: reg.store.count() == 11, "11 nodes committed")
    held.release.set()
    for t in first + others:
        t.join(WAIT_S)
    assert {k: v[0] for k, v in results.items()} == {n: "ok" for n in ["red01"] + names}
    # one apply (generated after all were committed) covered all eleven; each enrolment returned with its
    # node in the slurm.conf on disk
    assert held.calls == 1
    for name, (_, text) in results.items():
        assert name in names_in(text)
    assert reg.applier.counters.get("coalesced", 0) == 10
    assert reg.applier.counters.get("written") == 1


def test_a_failed_apply_lets_the_waiting_enrolments_apply_themselves(cluster_dir, tmp_path):
    reg = RegistryService(cluster_dir, slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    held = HeldApplier(reg, fail_first=True)
    results = {}
    first = enrol_in_threads(reg, ["red01"], results)
    assert held.entered.wait(WAIT_S)
    others = enrol_in_threads(reg, ["red02", "red03"], results)
    wait_until(lambda: reg.store.count() == 3, "3 nodes committed")
    held.release.set()
    for t in first + others:
        t.join(WAIT_S)
    assert results["red01"][0] == "error" and isinstance(results["red01"][1], ApplyError)
    assert results["red02"][0] == "ok" and results["red03"][0] == "ok"
    assert held.calls >= 2  # a waiter led the next apply after the failure
    text = reg.applier.current_text()
    assert names_in(text) == {"red01", "red02", "red03"}  # the retry generated from the store, which holds all three


def test_an_apply_by_another_process_covers_this_one(cluster_dir, tmp_path):
    conf = str(tmp_path / "slurm.conf")
    one = RegistryService(cluster_dir, slurm_conf=conf, slurm_apply="none", slurm_state=False)
    two = RegistryService(cluster_dir, slurm_conf=conf, slurm_apply="none", slurm_state=False)  # its own gate
    one.store.enrol(record("red01", 1))
    seq = one.store.node_set_seq()
    assert one.apply_slurm(after_seq=seq)["action"] == "written"
    assert two.apply_slurm(after_seq=seq)["action"] == "coalesced"  # known from the DB, nothing rewritten
    assert two.apply_slurm(after_seq=seq)["action"] == "coalesced"  # now known in-process as well
    two.store.enrol(record("red02", 2))
    assert two.apply_slurm(after_seq=two.store.node_set_seq())["action"] == "written"
    assert names_in(two.applier.current_text()) == {"red01", "red02"}


def test_apply_without_a_counter_always_applies(cluster_dir, tmp_path):
    reg = RegistryService(cluster_dir, slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False)
    reg.enrol(enrolment("red01", 1))
    assert reg.apply_slurm()["action"] == "unchanged"  # generated and compared, not skipped


# ---------------------------------------------------------------------- Store group commit

class HeldBatches:
    """Wraps a store's _write_batch: the first batch waits for ``release``; records every batch's size."""

    def __init__(self, store, fail_batch=None):
        self.store = store
        self.real = store._write_batch
        self.sizes = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_batch = fail_batch
        store._write_batch = self

    def __call__(self, batch):
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.entered.set()
            if not self.release.wait(WAIT_S):
                raise AssertionError("the test never released the first batch")
        if len(self.sizes) == self.fail_batch:  # the rows are written, then the transaction fails
            def fail(_conn):
                raise RuntimeError("disk full (test)")
            self.store._bump = fail
            try:
                return self.real(batch)
            finally:
                del self.store._bump
        return self.real(batch)


def store_enrol_in_threads(store, records, results):
    threads = []
    for rec in records:
        def run(rec=rec):
            try:
                results[rec["hostname"]] = ("ok",) + store.enrol(rec)
            except Exception as exc:  # pylint: disable=broad-except
                results[rec["hostname"]] = ("error", exc)
        threads.append(threading.Thread(target=run, daemon=True))
    for t in threads:
        t.start()
    return threads


def queued(store, n):
    with store._commit_cond:
        return len(store._commit_queue) == n


def test_enrolments_queued_behind_a_commit_share_the_next_transaction(cluster_dir):
    store = Store(cluster_dir)
    store.enrol(record("red09", 9))  # red09 exists: another MAC for it below is a conflict
    seq = store.node_set_seq()
    held = HeldBatches(store)
    results = {}
    first = store_enrol_in_threads(store, [record("red01", 1)], results)
    assert held.entered.wait(WAIT_S)
    rest = [record(f"red{i:02d}", i) for i in range(2, 9)] + [record("red09", 9, mac="dc:a6:32:99:99:99")]
    others = store_enrol_in_threads(store, rest, results)
    wait_until(lambda: queued(store, 8), "8 enrolments queued behind the first commit")
    held.release.set()
    for t in first + others:
        t.join(WAIT_S)
    assert held.sizes == [1, 8]  # the eight waiting enrolments were written in one transaction
    assert isinstance(results.pop("red09")[1], ConflictError)  # only the conflicting one failed
    assert all(r[0] == "ok" and r[3] is True for r in results.values())
    assert {r[1]["hostname"] for r in results.values()} == {f"red{i:02d}" for i in range(1, 9)}
    for name, (_, _, credential, _) in results.items():
        assert store.check_credential(name, credential) is not None
    assert store.count() == 9
    assert store.node_set_seq() == seq + 2  # one bump per transaction that changed something


def test_a_failed_group_commit_fails_every_enrolment_in_it_and_stores_none(cluster_dir):
    store = Store(cluster_dir)
    held = HeldBatches(store, fail_batch=2)
    results = {}
    first = store_enrol_in_threads(store, [record("red01", 1)], results)
    assert held.entered.wait(WAIT_S)
    others = store_enrol_in_threads(store, [record("red02", 2), record("red03", 3)], results)
    wait_until(lambda: queued(store, 2), "2 enrolments queued")
    held.release.set()
    for t in first + others:
        t.join(WAIT_S)
    assert held.sizes == [1, 2]
    assert results["red01"][0] == "ok"
    assert results["red02"][0] == "error" and results["red03"][0] == "error"
    assert str(results["red02"][1]) == "disk full (test)"
    assert [n["hostname"] for n in store.list()] == ["red01"]  # the failed batch left nothing behind
    store.enrol(record("red02", 2))  # and the store works on
    assert store.count() == 2
