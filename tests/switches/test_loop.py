"""The manager's switch loops as the manager runs them: the ExecStart line of the seed's
pibake-switch-rules.service (rendered by pibake.bake.seed), with only the install path and the cluster
directory replaced for this machine, run as a process against a fan that is the npm Kasa simulator on
loopback; readings go in through the manager's ingest path (readings.db). It switches the plug by itself from
the readings, refuses a second copy, survives a round that fails, and stops cleanly on SIGTERM."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from pibake.bake.seed import MANAGER_CLUSTER_DIR, SWITCH_LOOPS
from pibake.errors import ConfigError
from pibake.switches.kasa import KasaSwitch
from pibake.switches.loop import LoopBusy, hold_loop_lock, run_loop
from tests.switches.conftest import BASE, needs_kasa_simulator

RULE = {"name": "cupboard-fan", "sensor": "temp01", "metric": "temperature_c", "switch": "fan",
        "on_above": 30, "off_below": 27, "min_on_s": 0, "min_off_s": 0}


def unit_argv(loop, cluster):
    """The unit's command for this machine: this interpreter's pibake and ``cluster`` instead of the
    manager's /opt/pibake and /var/lib/pibake/cluster; every other word as the seed writes it."""
    command = SWITCH_LOOPS[loop]["command"]
    assert command[0] == "/opt/pibake/bin/pibake"
    return [sys.executable, "-m", "pibake"] + [str(cluster) if w == MANAGER_CLUSTER_DIR else w for w in command[1:]]


def plug_on(plug):
    from pibake.model import SwitchConfig

    return KasaSwitch(SwitchConfig(name="fan", driver="kasa", address=plug.address)).state().on


def wait_for(predicate, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s")


@needs_kasa_simulator
def test_the_rules_unit_switches_the_fan_from_readings_by_itself(tmp_path, kasa_plug):
    from pibake.sensors import Sensors

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "cluster.yaml").write_text(yaml.safe_dump({**BASE, "switches": [
        {"name": "fan", "driver": "kasa", "address": kasa_plug.address, "thing": "fan", "timeout": 2}],
        "rules": [RULE]}, sort_keys=False))
    sensors, seq = Sensors(cluster), [0]

    def send(celsius):
        seq[0] += 1
        now = time.time()
        reading = {"seq": seq[0], "time": now, "metrics": {"temperature_c": celsius}}
        assert sensors.ingest("temp01", {"readings": [reading]}, now=now)["accepted"] == 1

    assert plug_on(kasa_plug) is False
    # the unit's line plus --interval 5 (the unit keeps the default minute; a test does not wait minutes)
    argv = unit_argv("rules", cluster) + ["--interval", "5"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (cluster / "switches" / "rules.json").exists(), 60)  # the first round ran: no reading
        assert plug_on(kasa_plug) is False
        send(31.5)
        t_on = wait_for(lambda: plug_on(kasa_plug), 30)
        send(25.0)
        t_off = wait_for(lambda: not plug_on(kasa_plug), 30)
        print(f"rules loop (--interval 5): reading -> plug on {t_on:.1f} s, reading -> plug off {t_off:.1f} s")

        second = subprocess.run(unit_argv("rules", cluster), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"pibake: error: the rules loop already runs on {cluster} (pid {proc.pid}; "
                                         "on the manager it is pibake-switch-rules.service); its last decisions: "
                                         "`pibake switch rules --list`")
        listed = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(cluster), "switch", "rules",
                                 "--list", "--json"], capture_output=True, text=True, timeout=60)
        [item] = json.loads(listed.stdout)
        assert item["last"]["action"] == "off" and item["last"]["on"] is False and item["last"]["state"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # the journal gets a line per switching, not one per quiet round
    assert err.splitlines() == ["rule cupboard-fan: temperature_c 31.5°C is above 30°C -> fan on",
                                "rule cupboard-fan: temperature_c 25°C is below 27°C -> fan off"], err
    entries = [json.loads(line) for line in (cluster / "switches" / "log.jsonl").read_text().splitlines()]
    assert [(e["action"], e["by"], e["ok"]) for e in entries] == [("on", "rule cupboard-fan", True),
                                                                  ("off", "rule cupboard-fan", True)]


def test_the_auto_unit_idles_without_auto_cycle_switches(tmp_path):
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "cluster.yaml").write_text(yaml.safe_dump(BASE))
    proc = subprocess.Popen(unit_argv("auto", cluster) + ["--interval", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (cluster / "switches" / "auto.loop.lock").exists(), 60)
        time.sleep(1)
        assert proc.poll() is None  # nothing to do is not a failure: systemd must not restart it in a loop
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "" and out == ""


def test_a_failing_round_is_reported_and_the_loop_goes_on(tmp_path):
    errors, rounds = [], []

    def one_round():
        rounds.append(1)
        if len(rounds) == 1:
            raise ConfigError("cluster.yaml: rules[0].switch: no switch named 'fan'")
        return ["done"]

    reports = []
    assert run_loop(tmp_path, "rules", one_round, interval=0, on_report=reports.append, on_error=errors.append,
                    rounds=2) is None
    assert [str(e) for e in errors] == ["cluster.yaml: rules[0].switch: no switch named 'fan'"]
    assert reports == [["done"]]
    with pytest.raises(ConfigError):  # --once: the error is the command's
        run_loop(tmp_path, "rules", lambda: (_ for _ in ()).throw(ConfigError("bad")), interval=0, once=True)


def test_the_loop_lock_is_per_loop_and_freed_when_the_holder_ends(tmp_path):
    fd = hold_loop_lock(tmp_path, "rules")
    try:
        with pytest.raises(LoopBusy, match=r"the rules loop already runs on .* \(pid \d+;"):
            run_loop(tmp_path, "rules", list, interval=0, once=True)
        assert run_loop(tmp_path, "auto", lambda: ["auto"], interval=0, once=True) == ["auto"]
    finally:
        import os

        os.close(fd)
    assert run_loop(tmp_path, "rules", lambda: ["free"], interval=0, once=True) == ["free"]


def test_a_stop_ends_the_loop_between_rounds(tmp_path):
    stop = threading.Event()
    seen = []

    def one_round():
        seen.append(1)
        stop.set()  # as SIGTERM does while a round runs: the round finishes, no next one starts
        return []

    assert run_loop(tmp_path, "auto", one_round, interval=3600, stop=stop) is None and seen == [1]
