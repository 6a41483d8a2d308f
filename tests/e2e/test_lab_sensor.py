"""A sensor node in the lab, with the real programs: `pibake burn --role sensor` onto a synthetic Pi image, the
lab boots its own seed with cloud-init (Debian root with python3-bme280 + python3-smbus2 as on a Pi), the
first-boot agent enrols it, the sensor agent reads the real RPi.bme280 driver over the simulated bus
(tests/fixtures/sensors/bme280-lab.json, selected by the lab's /etc/pibake/sensor.d drop-in) and its readings
arrive at the manager's registry (GET /api/v1/sensors/red-zero/readings). The manager's registry is then killed
for a while: the readings taken meanwhile wait in the node's buffer and arrive afterwards, every seq once.

Subnet 10.77.83.0/24, names ``pz<pid>-*``: traffic stays inside namespaces this test creates.
"""

import json
import subprocess
import time

import pytest

from tests.fixtures_plugin import lab_prefix, make_ssh_key, needs_lab, pibake
from tests.firstboot.sensorkit import FIXTURES

NET = "10.77.83"
pytestmark = [pytest.mark.e2e, needs_lab("debootstrap")]
SEQS = ("import json, sqlite3; db = sqlite3.connect('/var/lib/pibake/cluster/readings.db'); "
        "print(json.dumps([r[0] for r in db.execute('SELECT seq FROM readings JOIN sensor_nodes ON node_id = id "
        "WHERE node = ? ORDER BY seq', ('red-zero',))]))")  # the manager sends its own (SoC) readings too


def in_host(record, argv, check=True):
    from pibake.lab.cluster import host_argv

    proc = subprocess.run(host_argv(record, argv), capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def wait_for(what, predicate, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, lab_rootfs):
    from pibake.bake.synthetic import build_pi_image
    from pibake.lab.cluster import lab_down, lab_up, load_state

    tmp = tmp_path_factory.mktemp("labsensor")
    tmp.chmod(0o755)
    make_ssh_key(tmp, "sensor@e2e", name="key")
    cdir = tmp / "cluster"
    pibake(cdir, "init", "--manager", "red00", "--manager-ip", f"{NET}.10", "--network", f"{NET}.0/24",
           "--ssh-key", tmp / "key.pub", "--timezone", "Etc/UTC")
    build_pi_image(tmp / "raspios.img", size="160M", boot_size="64M", family="raspios")
    images = tmp / "images"
    pibake(cdir, "burn", "--hostname", "red00", "--ip", f"{NET}.10", "--role", "manager",
           "--output", f"{images}/{{hostname}}.img", "--image", tmp / "raspios.img")
    pibake(cdir, "burn", "--hostname", "red-zero", "--ip", f"{NET}.40", "--role", "sensor",
           "--output", f"{images}/{{hostname}}.img", "--image", tmp / "raspios.img")
    prefix = lab_prefix("pz")
    try:
        lab_up(cdir, images_dir=images, prefix=prefix, timeout=300, sim_bus=FIXTURES / "bme280-lab.json",
               sensor_settings={"interval_s": 3, "backoff_base_s": 1, "backoff_max_s": 4, "place": "lab bench"})
        state = load_state(prefix)
        hosts = {h["name"]: h for h in state["hosts"]}
        yield state, hosts["red00"], hosts["red-zero"]
    finally:
        lab_down(prefix=prefix)


def series(state, metric="temperature_c"):
    from pibake.lab.cluster import _registry_get

    status, data = _registry_get(state, f"/sensors/red-zero/readings?metric={metric}")
    return data if status == 200 else None


def stored_seqs(manager):
    return json.loads(in_host(manager, ["python3", "-c", SEQS]))


def pending(sensor):
    out = in_host(sensor, ["python3", "/usr/local/lib/pibake/sensor_agent.py", "--config", "/etc/pibake/sensor.json",
                           "--status", "--json"])
    return json.loads(out)


def test_sensor_node_boots_enrols_and_its_readings_arrive(lab):
    state, manager, sensor = lab
    assert json.loads(in_host(sensor, ["cat", "/etc/pibake/agent.json"]))["role"] == "sensor"
    data = wait_for("3 temperature readings at the registry",
                    lambda: (s := series(state)) and sum(p["n"] for p in s["points"]) >= 3 and s, 180)
    assert {p["min"] for p in data["points"]} == {25.08}  # the datasheet example through the real driver
    humidity = series(state, "humidity_pct")
    assert humidity and {p["max"] for p in humidity["points"]} == {39.04}


def test_registry_away_for_a_while_loses_no_reading(lab):
    from pibake.bake.seed import REGISTRY_COMMAND

    state, manager, sensor = lab
    wait_for("readings at the registry", lambda: stored_seqs(manager), 180)
    pids = in_host(manager, ["pgrep", "-f", "registry serve"]).split()
    assert pids
    in_host(manager, ["kill", *pids])
    wait_for("the registry to stop", lambda: not in_host(manager, ["pgrep", "-f", "registry serve"], check=False), 30)
    before = stored_seqs(manager)
    wait_for("readings to pile up in the sensor's buffer", lambda: pending(sensor)["pending"] >= 5, 90)
    in_host(manager, ["/usr/local/lib/pibake/pibake-start", "pibake-registry.service", "--", *REGISTRY_COMMAND])
    wait_for("the buffer to drain", lambda: pending(sensor)["pending"] == 0, 180)
    after = stored_seqs(manager)
    assert len(after) >= len(before) + 5
    assert after == list(range(after[0], after[-1] + 1)), "a gap: a reading was lost"
    assert pending(sensor)["rejected_batches"] == 0
