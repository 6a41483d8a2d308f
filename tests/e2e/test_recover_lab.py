"""Issue 14, recovery end to end: a worker of a burned lab cluster hangs, its smart plug is cycled, and it boots
again through its seed until Slurm lists it idle; then the automatic policy does the same once and refuses a
second time within its hourly limit.

The plug is the npm ``tplink-smarthome-simulator`` (an HS110), run in its own lab namespace on the lab bridge
(``plug``, .50:9999) and BOUND to lab host red01: it prints every relay change (kasa_simulator.js
--relay-events) and a watcher here cuts or restores red01's power with ``pibake.lab.cluster.lab_power`` (off:
every process of the host dies, its link goes down; on: cloud-init boots it again from its card, the agent logs
in with its node credential and starts munge and slurmd). pibake itself talks to the plug through python-kasa.
``pibake recover`` and ``pibake switch auto`` run as the CLI in a third lab namespace (``desk``, .60, a person's
machine on the cluster's network): they reach the plug, the registry and the nodes (ssh as the cluster user
with the key of `pibake init`) over the lab bridge only.

A hang is ``pibake lab freeze``: every process of red01 stopped, its link up (connections accepted, never
answered), as a Pi on a stuck SD card. slurm.conf gets SlurmdTimeout=10 and MessageTimeout=5 (cluster.yaml
``registry.slurm_settings``) so Slurm flags it within seconds, not the minute of the default.

The ``pibake lab freeze`` / ``lab power`` lines of docs/lab.md (block lab-power) and docs/commands.md (block
cmd-lab-power) are commands this module runs (``test_the_docs_power_commands_are_the_ones_run_here``).

Subnet 10.77.85.0/24, names ``pr<pid>-*``: traffic stays inside namespaces this test creates.
"""

import json
import subprocess
import threading
import time

import pytest
import yaml

from pibake.run import which
from tests.fixtures_plugin import burned_cluster, lab_prefix, needs_lab, pibake
from tests.switches.conftest import HERE as SWITCH_TESTS, install_kasa_simulator, needs_kasa_simulator

NET = "10.77.85"
PLUG_IP, DESK_IP = f"{NET}.50", f"{NET}.60"
NODE = "red01"

pytestmark = [pytest.mark.e2e, needs_lab("debootstrap"),
              needs_kasa_simulator]


def configure(cdir):
    """The plug of red01 (auto_cycle) and a Slurm that notices a hung node within seconds."""
    path = cdir / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["registry"] = {**(data.get("registry") or {}),
                        "slurm_settings": {"SlurmdTimeout": 10, "MessageTimeout": 5}}
    data["switches"] = [{"name": "plug-red01", "driver": "kasa", "address": PLUG_IP, "node": NODE,
                         "auto_cycle": True, "timeout": 5}]
    path.write_text(yaml.safe_dump(data, sort_keys=False))


LAB_COMMANDS = []  # (argv after `pibake --cluster DIR`, exit code) of every `pibake lab ...` run here


def lab_cli(cdir, *args):
    proc = pibake(cdir, "lab", *args, check=False)
    LAB_COMMANDS.append((("lab", *map(str, args)), proc.returncode))
    return proc


class BoundPlug:
    """The simulator in lab namespace ``plug``; every relay change powers lab host ``node`` off or on
    (``pibake lab power NODE off|on --json``, the command a person would type)."""

    def __init__(self, plug_host, cdir, prefix, node):
        self.cdir, self.prefix, self.node = cdir, prefix, node
        self.events = []  # ("relay", 0|1) and ("power", report) / ("error", text), in order
        self.proc = plug_host.popen([which("node"), SWITCH_TESTS / "kasa_simulator.js", "hs110", "--address",
                                     PLUG_IP, "--port", "9999", "--on", "--relay-events"],
                                    env={"NODE_PATH": str(install_kasa_simulator())},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, f"the plug simulator did not start: {self.proc.stderr.read()[-500:]}"
        assert json.loads(line) == {"port": 9999, "relay": 1}, line
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        for line in self.proc.stdout:
            relay = json.loads(line)["relay"]
            self.events.append(("relay", relay))
            proc = lab_cli(self.cdir, "power", self.node, "on" if relay else "off", "--prefix", self.prefix,
                           "--json")
            if proc.returncode == 0:
                self.events.append(("power", json.loads(proc.stdout)))
            else:
                self.events.append(("error", proc.stderr.strip()))

    def relays(self):
        return [value for kind, value in self.events if kind == "relay"]

    def errors(self):
        return [value for kind, value in self.events if kind == "error"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def recover_lab(tmp_path_factory):
    from pibake.lab.cluster import load_state
    from pibake.lab.hosts import LabHost, LabNetwork

    tmp, cdir, images = burned_cluster(tmp_path_factory.mktemp("recover"), NET, workers=1, comment="recover@e2e",
                                       configure=configure)
    prefix = lab_prefix("pr")
    plug = None
    try:
        proc = pibake(cdir, "lab", "up", "--from-images", images, "--prefix", prefix, "--json", "--timeout", 300,
                      check=False)
        assert proc.returncode == 0, proc.stderr
        state = load_state(prefix)
        bridge = LabNetwork(prefix, state["network"], None)  # the lab's own bridge, made by lab up
        plug_host = LabHost.create("plug", PLUG_IP, network=bridge)
        desk = LabHost.create("desk", DESK_IP, network=bridge)
        plug = BoundPlug(plug_host, cdir, prefix, NODE)
        # The manager booted from its seed runs both switch loops by themselves; with python-kasa from its card
        # its auto loop would recover red01 too: it is seen alive, then stopped (SIGTERM: its round ends first),
        # so that the desk's `pibake recover` / `switch auto` below are the only ones cycling the plug.
        loops = {loop: manager_loop_pid(prefix, loop) for loop in ("auto", "rules")}
        stop_manager_loop(prefix, "auto")
        yield {"tmp": tmp, "cdir": cdir, "prefix": prefix, "desk": desk, "plug": plug, "loops": loops}
    finally:
        if plug is not None:
            plug.stop()
        pibake(cdir, "lab", "down", "--prefix", prefix, check=False)  # plug and desk go with it (same prefix)


MANAGER_CLUSTER = "/var/lib/pibake/cluster"


def manager_loop_pid(prefix, loop):
    """The pid holding the manager's switch loop lock when that process is alive, else None."""
    from pibake.lab.cluster import lab_run

    lock = f"{MANAGER_CLUSTER}/switches/{loop}.loop.lock"
    proc = lab_run("red00", ["sh", "-c", f'pid=$(cat {lock}) && kill -0 "$pid" && echo "$pid"'], prefix=prefix)
    return int(proc.stdout) if proc.stdout.strip().isdigit() else None


def stop_manager_loop(prefix, loop):
    from pibake.lab.cluster import lab_run

    pid = manager_loop_pid(prefix, loop)
    if pid is not None:
        lab_run("red00", ["kill", "-TERM", str(pid)], prefix=prefix)
    deadline = time.monotonic() + 60
    while manager_loop_pid(prefix, loop) is not None:
        if time.monotonic() >= deadline:  # a round in progress (a recovery waits for its node): say which
            seen = lab_run("red00", ["sh", "-c", f"tail -n 30 /var/log/pibake/*switch-{loop}*.log; "
                                     f"cat {MANAGER_CLUSTER}/switches/{loop}.json"], prefix=prefix)
            raise AssertionError(f"the manager's {loop} loop did not stop on SIGTERM within 60 s; its log and "
                                 f"history:\n{seen.stdout}{seen.stderr}")
        time.sleep(0.5)


def desk_pibake(lab, *args, timeout=400):
    """``pibake --cluster DIR ARGS`` on the desk (the lab network), ssh as the cluster user with the init key."""
    import sys

    key = lab["tmp"] / "key"
    proc = lab["desk"].run([sys.executable, "-m", "pibake", "--cluster", lab["cdir"], *args, "--user", "pi", "-i", key,
                            "--known-hosts", lab["tmp"] / "known_hosts"], check=False, timeout=timeout)
    return proc


def slurm_state(lab, node=NODE):
    from pibake.lab.cluster import lab_run

    out = lab_run("red00", ["sinfo", "-N", "-h", "-o", "%N %T", "-n", node], prefix=lab["prefix"]).stdout.split()
    return out[1] if len(out) == 2 else None


def hang(lab):
    """Freeze red01 and wait until Slurm flags it (not responding or down); returns the state and seconds."""
    from pibake.switches.recover import slurm_is_down

    proc = lab_cli(lab["cdir"], "freeze", NODE, "--prefix", lab["prefix"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stopped"] > 0 and f"{NODE}: frozen (" in proc.stderr
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        state = slurm_state(lab)
        if slurm_is_down(state):
            return state, time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"Slurm did not flag the frozen {NODE} within 120 s (last: {state})")


def host_pid(lab):
    from pibake.lab.cluster import _host, load_state

    return _host(load_state(lab["prefix"]), NODE)["pid"]


def test_recover_refuses_a_healthy_node_and_switches_nothing(recover_lab):
    proc = desk_pibake(recover_lab, "recover", NODE, "--yes", "--off-seconds", "1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"pibake: error: not cycling {NODE}: {NODE} answers ssh "
                                                    "(nothing was switched; --force cycles it anyway)")
    assert recover_lab["plug"].relays() == [] and slurm_state(recover_lab) == "idle"


def test_recover_cycles_the_plug_of_a_hung_node_and_it_boots_again_to_idle(recover_lab):
    from pibake.lab.cluster import lab_run

    from pibake.switches.recover import slurm_is_down

    lab, plug = recover_lab, recover_lab["plug"]
    flagged, seconds = hang(lab)
    print(f"{NODE} frozen: Slurm says {flagged} after {seconds:.1f} s")
    pid_before = host_pid(lab)
    t0 = time.monotonic()
    proc = desk_pibake(lab, "recover", NODE, "--yes", "--off-seconds", "2", "--wait", "240", "--json")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr + f"\nplug events: {plug.events}"
    print(f"pibake recover {NODE}: {took:.1f} s\n{proc.stderr}")
    result = json.loads(proc.stdout)
    assert result["recovered"] and result["switch"] == "plug-red01"
    steps = {s["step"]: s for s in result["steps"]}
    assert list(steps) == ["check-down", "power-cycle", "back"] and all(s["ok"] for s in steps.values())
    # Slurm's word may have moved on since the hang was seen (idle* -> down* once SlurmdTimeout passes)
    assert steps["check-down"]["detail"].startswith(f"{NODE} does not answer ssh (") and \
        slurm_is_down(steps["check-down"]["detail"].rsplit(" and Slurm says ", 1)[1])
    assert steps["back"]["detail"] == f"{NODE} answers ssh and Slurm says idle"
    assert [s["step"] for s in result["cycle"]] == ["read", "off", "wait", "on"]
    for line in (f"{NODE}: check-down: ", "plug-red01: off; waiting 2 s", "plug-red01: on again", f"{NODE}: back: "):
        assert line in proc.stderr, proc.stderr

    # the plug really cut red01's power and it booted again through its card
    assert plug.relays() == [0, 1] and plug.errors() == [], plug.events
    powers = [value for kind, value in plug.events if kind == "power"]
    assert [p["power"] for p in powers] == ["off", "on"]
    assert powers[1]["cloud_init"]["status"] == "done" and powers[1]["cloud_init"]["errors"] == []
    assert powers[1]["units"] == ["pibake-agent.service", "pibake-sensor.service"] and powers[1]["sshd"] == "running"
    print(f"{NODE} power on: booted in {powers[1]['seconds']:.1f} s (cloud-init {powers[1]['cloud_init_s']:.1f} s)")
    assert host_pid(lab) != pid_before
    assert slurm_state(lab) == "idle"
    log = lab_run(NODE, ["cat", "/var/log/pibake/pibake-agent.log"], prefix=lab["prefix"]).stdout
    assert log.count(f"enrolled as {NODE}") == 1, log  # enrolled at first boot only: the second logged in
    boots = lab_run(NODE, ["grep", "-c", "running 'init-local'", "/var/log/cloud-init.log"], prefix=lab["prefix"])
    assert boots.stdout.strip() == "2", boots  # cloud-init ran at both boots
    entries = json.loads(pibake(lab["cdir"], "switch", "log", "--json").stdout)
    assert [(e["action"], e["ok"]) for e in entries] == [("recover", False), ("cycle", True), ("recover", True)]


def test_the_automatic_policy_recovers_once_then_respects_its_hourly_limit(recover_lab):
    lab, plug = recover_lab, recover_lab["plug"]
    before = len(plug.relays())
    auto = ("switch", "auto", "--once", "--json", "--max-per-hour", "1", "--backoff", "0", "--off-seconds", "2",
            "--wait", "240")

    hang(lab)
    t0 = time.monotonic()
    proc = desk_pibake(lab, *auto)
    print(f"pibake switch auto --once (a recovery): {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr + f"\nplug events: {plug.events}"
    assert json.loads(proc.stdout) == [{"node": NODE, "switch": "plug-red01", "decision": "recovered",
                                        "detail": "recovered through plug-red01"}]
    assert plug.relays()[before:] == [0, 1] and plug.errors() == [], plug.events
    assert slurm_state(lab) == "idle"

    state, _ = hang(lab)  # hangs again within the hour: the limit (1) is reached, nothing is switched
    proc = desk_pibake(lab, *auto)
    assert proc.returncode == 0, proc.stderr
    [decision] = json.loads(proc.stdout)
    assert decision["decision"] == "limit" and decision["node"] == NODE
    assert "was recovered 1 times in the last hour (limit 1)" in decision["detail"]
    assert plug.relays()[before:] == [0, 1]
    assert slurm_is_down_now(lab), state
    last = json.loads(pibake(lab["cdir"], "switch", "log", "--json").stdout)[-1]
    assert last["action"] == "auto-skip" and last["by"] == "auto" and last["node"] == NODE
    assert last["error"] == decision["detail"]


def slurm_is_down_now(lab):
    from pibake.switches.recover import slurm_is_down

    return slurm_is_down(slurm_state(lab))


def _without_prefix_and_json(argv):
    argv = list(argv)
    if "--prefix" in argv:
        i = argv.index("--prefix")
        del argv[i:i + 2]
    return tuple(a for a in argv if a != "--json")


def test_the_docs_power_commands_are_the_ones_run_here(recover_lab):
    """docs/lab.md's block lab-power and docs/commands.md's cmd-lab-power: every line is a command this module
    ran on its lab (with --prefix, and --json where it read the result) and it exited 0."""
    import re
    import shlex
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    lines = []
    for page, name in (("lab.md", "lab-power"), ("commands.md", "cmd-lab-power")):
        block = re.search(rf"```sh\n# doc-test: {name}\n(.*?)```", (docs / page).read_text(), re.S).group(1)
        lines += [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("pibake ")]
    assert len(lines) == 6
    ran = {_without_prefix_and_json(argv) for argv, code in LAB_COMMANDS if code == 0}
    for argv in lines:
        assert _without_prefix_and_json(argv) in ran, (argv, LAB_COMMANDS)


def test_the_manager_runs_the_switch_loops_and_drives_the_plug_with_python_kasa_from_its_card(recover_lab):
    """The manager booted from its seed ran both switch loops by themselves (pibake-start without systemd: in
    the background, as the lab has no systemd; the unit files are the seed's), each holding its loop lock.
    pibake there is the wheel installed with --no-deps over Debian's packages, and python-kasa came from the
    deps/ folder `pibake burn` put beside it on the card (bake/manager_wheels.py: no index in the lab), over
    Debian's python3-aiohttp: the manager's own CLI reads the plug on the lab bridge."""
    from pibake.lab.cluster import lab_run

    lab = recover_lab
    cdir = MANAGER_CLUSTER
    assert all(lab["loops"].values()), lab["loops"]
    for loop in ("auto", "rules"):
        unit = lab_run("red00", ["cat", f"/etc/systemd/system/pibake-switch-{loop}.service"], prefix=lab["prefix"])
        assert "CapabilityBoundingSet=\n" in unit.stdout
    where = lab_run("red00", ["/opt/pibake/bin/python", "-c", "import aiohttp, kasa; print(kasa.__file__); "
                              "print(aiohttp.__file__)"], prefix=lab["prefix"]).stdout.split()
    assert where[0].startswith("/opt/pibake/lib/") and where[1].startswith("/usr/lib/python3/dist-packages/"), where
    proc = lab_run("red00", ["/opt/pibake/bin/pibake", "--cluster", cdir, "switch", "status", "--json"],
                   prefix=lab["prefix"])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    [status] = json.loads(proc.stdout)
    assert status["name"] == "plug-red01" and status["driver"] == "kasa" and status["address"] == PLUG_IP
    assert status["state"]["on"] is True and status["state"]["power_w"] >= 0  # red01 is powered (the bound plug)
    busy = lab_run("red00", ["/opt/pibake/bin/pibake", "--cluster", cdir, "switch", "rules", "--once"],
                   prefix=lab["prefix"])
    assert busy.returncode == 1 and "the rules loop already runs on /var/lib/pibake/cluster (pid " in busy.stderr
