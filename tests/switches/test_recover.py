"""Recovering a hung node: the decision (pure, over recorded ssh and sinfo outputs) and the sequence, with the
Kasa simulator as the node's plug. The hung Pi itself is the one thing that cannot exist here: its ssh and
sinfo answers come from ``ScriptedNode``, recorded from a real hung node (ssh's own message, sinfo's
``down*`` with the reason slurmctld writes)."""

import pytest

from pibake import switches
from pibake.connect import Output
from pibake.switches.recover import judge_back, judge_down, recover_node, slurm_is_down
from pibake.errors import RecoverError
from tests.switches.conftest import needs_kasa_simulator, write_cluster

SSH_DOWN = Output("red01", 255, "", "ssh: connect to host 10.1.1.11 port 22: No route to host\n")
SSH_OK = Output("red01", 0, "", "")
SINFO_DOWN = Output("red00", 0, "red01|down*|Not responding\nred02|idle|none\n", "")
SINFO_IDLE_NR = Output("red00", 0, "red01|idle*|none\n", "")
SINFO_IDLE = Output("red00", 0, "red01|idle|none\n", "")
SINFO_FAILS = Output("red00", 1, "", "slurm_load_node error: Unable to contact slurm controller (connect failure)\n")


@pytest.mark.parametrize("state, down", [("down*", True), ("idle*", True), ("down", True), ("unknown", True),
                                         ("idle", False), ("allocated", False), ("drained", False),
                                         ("mixed", False), ("", False)])
def test_slurm_states(state, down):
    assert slurm_is_down(state) is down


@pytest.mark.parametrize("ssh, sinfo, down, why", [
    (SSH_DOWN, SINFO_DOWN, True, "red01 does not answer ssh (ssh: connect to host 10.1.1.11 port 22: No route "
                                 "to host) and Slurm says down*"),
    (SSH_DOWN, SINFO_IDLE_NR, True, "Slurm says idle*"),
    (SSH_OK, SINFO_DOWN, False, "red01 answers ssh"),
    (SSH_DOWN, SINFO_IDLE, False, "but Slurm says idle"),
    (SSH_DOWN, SINFO_FAILS, False, "sinfo failed on the manager (slurm_load_node error: Unable to contact"),
    (SSH_DOWN, Output("red00", 0, "red02|idle|none\n", ""), False, "Slurm does not list it"),
])
def test_judge_down(ssh, sinfo, down, why):
    verdict, text = judge_down("red01", ssh, sinfo)
    assert verdict is down and why in text


def test_judge_back():
    assert judge_back("red01", SSH_OK, SINFO_IDLE)[0] is True
    assert judge_back("red01", SSH_OK, SINFO_IDLE_NR) == (False, "ssh: ok; Slurm: idle*")


class ScriptedNode:
    """Connectors for one hung node: ssh and sinfo answer as recorded, until the plug has been cycled and
    ``boot_polls`` polls have passed (a Pi takes a while to boot)."""

    def __init__(self, cluster_dir, plug, boot_polls=2, comes_back=True):
        self.cluster_dir, self.plug = cluster_dir, plug
        self.boot_polls, self.comes_back = boot_polls, comes_back
        self.calls = []

    def _powered_again(self):
        log = switches.switch_log(self.cluster_dir)
        return any(e["action"] == "cycle" and e["ok"] for e in log)

    def run(self, host, argv, *, input=None, timeout=60):
        self.calls.append((host, argv[0] if argv[0] != "env" else argv[2]))
        back = self.comes_back and self._powered_again() and sum(h == "red01" for h, _ in self.calls) > \
            self.boot_polls + 1
        if host == "red01":
            return SSH_OK if back else SSH_DOWN
        return SINFO_IDLE if back else SINFO_DOWN


@pytest.fixture
def cluster(tmp_path, kasa_plug):
    return write_cluster(tmp_path / "c", [{"name": "pi1", "driver": "kasa", "address": kasa_plug.address,
                                           "node": "red01", "timeout": 2}])


@needs_kasa_simulator
def test_recover_a_hung_node(cluster, kasa_plug):
    switches.switch_command(cluster, "pi1", "on")
    node = ScriptedNode(cluster, kasa_plug)
    said = []
    result = recover_node(cluster, "red01", off_s=0.1, wait_s=60, connectors=node, progress=said.append,
                          sleep=lambda s: None, slurm_conf="/etc/slurm/slurm.conf")
    assert [(s["step"], s["ok"]) for s in result["steps"]] == [("check-down", True), ("power-cycle", True),
                                                               ("back", True)]
    assert [s["step"] for s in result["cycle"]] == ["read", "off", "wait", "on"]
    assert switches.switch_status(cluster, "pi1")["state"]["on"] is True
    assert any("red01: waiting (ssh: ssh: connect to host" in m for m in said)
    assert switches.switch_log(cluster)[-1] == {**switches.switch_log(cluster)[-1], "action": "recover", "ok": True}


@needs_kasa_simulator
def test_a_node_that_is_up_is_not_cycled(cluster, kasa_plug):
    switches.switch_command(cluster, "pi1", "on")

    class Up(ScriptedNode):
        def run(self, host, argv, *, input=None, timeout=60):
            return SSH_OK if host == "red01" else SINFO_IDLE
    with pytest.raises(RecoverError, match="not cycling red01: red01 answers ssh .nothing was switched"):
        recover_node(cluster, "red01", connectors=Up(cluster, kasa_plug), sleep=lambda s: None,
                     slurm_conf="/etc/slurm/slurm.conf")
    assert [e["action"] for e in switches.switch_log(cluster)] == ["on", "recover"]


@needs_kasa_simulator
def test_a_node_that_does_not_come_back_is_reported(cluster, kasa_plug):
    clock = iter(range(0, 10000, 30))
    node = ScriptedNode(cluster, kasa_plug, comes_back=False)
    with pytest.raises(RecoverError, match="red01 has power again but is not idle after 120 s .ssh: ssh: connect"):
        recover_node(cluster, "red01", off_s=0, wait_s=120, connectors=node, sleep=lambda s: None,
                     clock=lambda: next(clock), slurm_conf="/etc/slurm/slurm.conf")
    assert switches.switch_status(cluster, "pi1")["state"]["on"] is True


@needs_kasa_simulator
def test_refusals(tmp_path, kasa_plug):
    cluster = write_cluster(tmp_path / "c", [{"name": "m", "driver": "kasa", "address": kasa_plug.address,
                                              "node": "red00"}])
    with pytest.raises(RecoverError, match="red00 is the manager"):
        recover_node(cluster, "red00", connectors=None)
    with pytest.raises(RecoverError, match="no switch in cluster.yaml powers red05"):
        recover_node(cluster, "red05", connectors=None)
