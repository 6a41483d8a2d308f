"""The automatic recovery policy: the decision table (pure), and rounds with the Kasa simulator as the plug
of a hung node (its ssh/sinfo answers recorded, see test_recover.ScriptedNode): it recovers once, then
respects its backoff and its limit per hour, and never touches the manager or a thing's plug."""

import pytest

from pibake import switches
from pibake.model import Cluster, SwitchConfig
from pibake.switches.auto import Policy, auto_pass, candidates, decide
from tests.switches.conftest import needs_kasa_simulator, write_cluster
from tests.switches.test_recover import SINFO_DOWN, SSH_DOWN, ScriptedNode

POLICY = Policy(max_per_hour=2, backoff_s=600)


@pytest.mark.parametrize("down, attempts, now, decision, text", [
    (False, [], 10_000, "up", "answers"),
    (True, [], 10_000, "recover", "down"),
    (True, [10_000 - 300], 10_000, "backoff", "waiting 300 s more"),
    (True, [10_000 - 700], 10_000, "recover", "down"),
    (True, [10_000 - 3000, 10_000 - 700], 10_000, "limit", "recovered 2 times in the last hour (limit 2); "
                                                             "next chance in 600 s"),
    (True, [10_000 - 4000, 10_000 - 700], 10_000, "recover", "down"),  # the older one left the hour
])
def test_decide(down, attempts, now, decision, text):
    got, detail = decide("red01", down, "down" if down else "red01 answers ssh", attempts, now, POLICY)
    assert got == decision and text in detail


def test_policy_with_two_in_the_hour_pauses_twice_as_long():
    assert decide("n", True, "down", [0, 700], 700 + 1100, Policy(max_per_hour=3, backoff_s=600))[0] == "backoff"
    assert decide("n", True, "down", [0, 700], 700 + 1300, Policy(max_per_hour=3, backoff_s=600))[0] == "recover"


def test_candidates_never_the_manager_nor_a_thing():
    cluster = Cluster(name="red", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24", switches=(
        SwitchConfig("a", "kasa", "p1", node="red01", auto_cycle=True),
        SwitchConfig("m", "kasa", "p2", node="red00", auto_cycle=True),
        SwitchConfig("n", "kasa", "p3", thing="network switch", auto_cycle=True),
        SwitchConfig("b", "kasa", "p4", node="red02", auto_cycle=False)))
    assert [s.name for s in candidates(cluster)] == ["a"]


class HangsAgain(ScriptedNode):
    """Comes back after each cycle, then hangs again once the test says so."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.hung = True

    def run(self, host, argv, *, input=None, timeout=60):
        if self.hung:
            return SSH_DOWN if host == "red01" else SINFO_DOWN
        return super().run(host, argv, input=input, timeout=timeout)


@needs_kasa_simulator
def test_rounds_recover_once_then_respect_backoff_and_limit(tmp_path, kasa_plug):
    cluster = write_cluster(tmp_path / "c", [
        {"name": "pi1", "driver": "kasa", "address": kasa_plug.address, "node": "red01", "auto_cycle": True,
         "timeout": 2}])
    switches.switch_command(cluster, "pi1", "on")
    node = HangsAgain(cluster, kasa_plug, boot_polls=0)
    now = [100_000.0]

    def pause(seconds):
        now[0] += seconds
        node.hung = False  # power was cut: the Pi boots

    def round_():
        return auto_pass(cluster, policy=POLICY, connectors=node, clock=lambda: now[0], sleep=pause,
                         slurm_conf="/etc/slurm/slurm.conf")

    assert [r["decision"] for r in round_()] == ["recovered"]
    assert [r["decision"] for r in round_()] == ["up"]
    node.hung = True  # hangs again 2 minutes later: inside the 600 s pause
    now[0] += 120
    first = round_()
    assert first[0]["decision"] == "backoff"
    now[0] += 600
    assert [r["decision"] for r in round_()] == ["recovered"]
    node.hung = True
    now[0] += 1300  # past the doubled pause, but 2 recoveries within the hour
    limited = round_()
    assert limited[0]["decision"] == "limit" and "limit 2" in limited[0]["detail"]
    log = [(e["action"], e["by"], e["ok"]) for e in switches.switch_log(cluster)]
    assert log.count(("cycle", "auto", True)) == 2 and log.count(("recover", "auto", True)) == 2
    assert ("auto-skip", "auto", False) in log
    assert switches.switch_status(cluster, "pi1")["state"]["on"] is True


@needs_kasa_simulator
def test_a_node_the_registry_has_no_address_for_is_never_judged_nor_cycled(tmp_path, kasa_plug, monkeypatch):
    """A node still in its first boot (not enrolled) or a registry that does not answer: ssh could only try the
    name, and its failure (no DNS for it) says nothing about the node. Found in the lab: the manager's loop judged
    a worker that enrolled a moment after its address lookup down ("Could not resolve hostname") and then waited
    600 s for it to answer by that name."""
    import pibake.switches.auto as auto

    cluster = write_cluster(tmp_path / "c", [
        {"name": "pi1", "driver": "kasa", "address": kasa_plug.address, "node": "red01", "auto_cycle": True,
         "timeout": 2}])
    switches.switch_command(cluster, "pi1", "on")
    probed = []
    monkeypatch.setattr(auto, "probe_node", lambda *a, **k: probed.append(a) or (SSH_DOWN, SINFO_DOWN))
    for answer, why in (({}, None), ({}, "https://10.1.1.10:8443: connection refused")):
        monkeypatch.setattr(auto, "registry_addresses", lambda *a, answer=answer, why=why: (answer, why))
        (row,) = auto_pass(cluster, policy=POLICY, slurm_conf="/etc/slurm/slurm.conf")
        assert (row["node"], row["decision"]) == ("red01", "unknown")
        assert row["detail"].startswith("the registry has no address for red01 (") and row["detail"].endswith(
            "); not judged")
        assert (why or "not enrolled yet") in row["detail"]
    assert probed == []  # not even probed
    assert switches.switch_status(cluster, "pi1")["state"]["on"] is True  # never switched
    assert [e for e in switches.switch_log(cluster) if e.get("by") == "auto"] == []
    # once the registry knows it, the round judges it as before (here: down by both, so recovered)
    monkeypatch.setattr(auto, "registry_addresses", lambda *a: ({"red01": "10.1.1.11"}, None))
    monkeypatch.setattr(auto, "recover_node", lambda *a, **k: {"recovered": True})
    assert [r["decision"] for r in auto_pass(cluster, policy=POLICY, slurm_conf="/etc/slurm/slurm.conf")] == [
        "recovered"]
    assert len(probed) == 1
