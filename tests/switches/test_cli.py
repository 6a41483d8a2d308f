"""`pibake switch ...` end to end as a user runs it (a subprocess), against the Kasa simulator and the
Shelly/Tasmota fakes: --json output, state read back, the log, and one-line errors with exit 1."""

import json
import subprocess
import sys
import threading

import pytest

from pibake import switches
from tests.switches.conftest import free_port, needs_kasa_simulator, write_cluster

PIBAKE = [sys.executable, "-m", "pibake"]


def pibake(cluster, *args, stdin=None):
    return subprocess.run(PIBAKE + ["--cluster", str(cluster), *args], capture_output=True, text=True,
                          timeout=60, input=stdin)


def one_line_error(out, text):
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibake: error: ") and text in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def cluster(tmp_path, kasa_plug, shelly, tasmota):
    return write_cluster(tmp_path / "c", [
        {"name": "rack", "driver": "kasa", "address": kasa_plug.address, "thing": "network switch", "timeout": 2},
        {"name": "pi1", "driver": "shelly", "address": shelly.address, "node": "red01", "timeout": 2},
        {"name": "fan", "driver": "tasmota", "address": tasmota.address, "thing": "fan", "timeout": 2},
    ])


@needs_kasa_simulator
def test_list_status_on_off_toggle_with_json(cluster, shelly, tasmota):
    assert pibake(cluster, "switch", "credentials", "pi1", "--password-file", "-", stdin="shelly-pass-1\n").returncode == 0
    assert pibake(cluster, "switch", "credentials", "fan", "--password-file", "-", stdin="tasmota-pass-1\n").returncode == 0
    listed = json.loads(pibake(cluster, "switch", "list", "--json").stdout)
    assert [(s["name"], s["driver"], s["node"], s["thing"]) for s in listed] == [
        ("rack", "kasa", None, "network switch"), ("pi1", "shelly", "red01", None), ("fan", "tasmota", None, "fan")]

    on = json.loads(pibake(cluster, "switch", "on", "rack", "--json").stdout)
    assert on["state"]["on"] is True and on["state"]["power_w"] > 0
    assert json.loads(pibake(cluster, "switch", "toggle", "fan", "--json").stdout)["state"]["on"] is True
    assert tasmota.power is True
    assert json.loads(pibake(cluster, "switch", "on", "pi1", "--json").stdout)["state"]["on"] is True
    every = json.loads(pibake(cluster, "switch", "status", "--json").stdout)
    assert [s["state"]["on"] for s in every] == [True, True, True]

    out = pibake(cluster, "switch", "off", "pi1")  # it powers a node: no terminal, so --yes is required
    one_line_error(out, "switch pi1 powers node red01: turning it off cuts its power; add --yes")
    assert shelly.output is True
    out = pibake(cluster, "switch", "off", "pi1", "--yes")
    assert out.returncode == 0 and out.stderr.strip() == "pi1: off 0 W 6.532 kWh"

    log = json.loads(pibake(cluster, "switch", "log", "--json").stdout)
    assert [(e["switch"], e["action"], e["ok"]) for e in log] == [
        ("rack", "on", True), ("fan", "toggle", True), ("pi1", "on", True), ("pi1", "off", True)]
    assert "shelly-pass-1" not in (cluster / "switches" / "log.jsonl").read_text()


@needs_kasa_simulator
def test_cycle_of_a_thing_reports_each_step(cluster):
    out = pibake(cluster, "switch", "cycle", "rack", "--off-seconds", "0.2", "--json")
    result = json.loads(out.stdout)
    assert [s["step"] for s in result["steps"]] == ["read", "off", "wait", "on"]
    assert result["state"]["on"] is True
    assert "rack: off; waiting 0.2 s" in out.stderr and "rack: on again" in out.stderr


@needs_kasa_simulator
def test_faults_are_one_line_errors(cluster, kasa_plug, shelly, tasmota):
    one_line_error(pibake(cluster, "switch", "on", "nope"), "no switch named 'nope' in cluster.yaml")
    one_line_error(pibake(cluster, "switch", "status", "pi1"), "refused the credentials")
    pibake(cluster, "switch", "credentials", "fan", "--password-file", "-", stdin="wrong\n")
    one_line_error(pibake(cluster, "switch", "on", "fan"), "switch fan (tasmota at 127.0.0.1:")
    tasmota.password = None
    tasmota.mode = "garbage"
    one_line_error(pibake(cluster, "switch", "on", "fan"), "not a tasmota reply")
    kasa_plug.pause()
    one_line_error(pibake(cluster, "switch", "status", "rack"), "no answer within 2 s")
    kasa_plug.stop()
    one_line_error(pibake(cluster, "switch", "on", "rack"), "cannot reach the device")
    out = pibake(cluster, "switch", "status")  # every switch: the broken ones listed, exit 1
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.count("error:") == 3


@needs_kasa_simulator
def test_a_cycle_that_cannot_turn_the_plug_back_on_says_so_loudly(tmp_path, kasa_plug):
    cluster = write_cluster(tmp_path / "c", [{"name": "lamp", "driver": "kasa", "address": kasa_plug.address,
                                              "thing": "lamp", "timeout": 1}])
    # the plug stops answering while it is off (paused as soon as pibake says it is off): the cycle's
    # second half fails
    proc = subprocess.Popen(PIBAKE + ["--cluster", str(cluster), "switch", "cycle", "lamp", "--off-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "lamp: off; waiting" in line:
            kasa_plug.pause()
    proc.wait(60)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.read(), "".join(seen[-1:]))
    assert any("lamp: off; waiting 1 s" in line for line in seen)
    one_line_error(out, "CYCLE INCOMPLETE: switch lamp is OFF and could not be turned back on; lamp has no power")
    assert switches.switch_log(cluster)[-1]["ok"] is False


def test_two_commands_for_one_plug_never_interleave(tmp_path, shelly):
    """Eight threads toggle one plug; each toggle is read-modify-write on the device, so any interleaving
    would lose flips: an even count must leave it where it started, and the log shows every one."""
    cluster = write_cluster(tmp_path / "c", [{"name": "p", "driver": "shelly", "address": shelly.address,
                                              "thing": "lamp"}])
    switches.set_credentials(cluster, "p", password="shelly-pass-1")
    results = []

    def flip():
        results.append(switches.switch_command(cluster, "p", "toggle")["state"]["on"])
    threads = [threading.Thread(target=flip) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shelly.output is False and sorted(results) == [False] * 4 + [True] * 4
    assert len(switches.switch_log(cluster)) == 8


def test_unknown_and_unreachable_for_a_cluster_without_the_switch(tmp_path):
    cluster = write_cluster(tmp_path / "c", [{"name": "x", "driver": "shelly", "address": f"127.0.0.1:{free_port()}",
                                              "thing": "lamp", "timeout": 1}])
    one_line_error(pibake(cluster, "switch", "info", "x"), "connection refused")


@needs_kasa_simulator
def test_no_password_in_verbose_output_or_errors(cluster, shelly, tasmota):
    """With -vv (debug logs) neither the Tasmota password (it travels in the query string) nor the Shelly
    password appears anywhere, also when the device refuses it."""
    pibake(cluster, "switch", "credentials", "fan", "--password-file", "-", stdin="tasmota-pass-1\n")
    pibake(cluster, "switch", "credentials", "pi1", "--password-file", "-", stdin="wrong-shelly-pw\n")
    outs = [pibake(cluster, "-vv", "switch", "on", "fan"), pibake(cluster, "-vv", "switch", "status", "pi1"),
            pibake(cluster, "-vv", "switch", "status", "--json")]
    assert outs[0].returncode == 0 and outs[1].returncode == 1
    text = "".join(o.stdout + o.stderr for o in outs) + (cluster / "switches" / "log.jsonl").read_text()
    assert "DEBUG" in text  # the debug logs were on
    assert "tasmota-pass-1" not in text and "wrong-shelly-pw" not in text


def test_the_page_does_not_wait_for_a_busy_plug(tmp_path, shelly):
    from pibake.registry.web import switch_rows

    cluster = write_cluster(tmp_path / "c", [{"name": "p", "driver": "shelly", "address": shelly.address,
                                              "thing": "lamp"}])
    switches.set_credentials(cluster, "p", password="shelly-pass-1")
    with switches._plug_lock(cluster, "p"):  # a cycle in progress
        rows = switch_rows(cluster)
    assert rows[0]["state"] is None and "busy" in rows[0]["error"]
    assert switch_rows(cluster)[0]["state"]["on"] is False
