"""switches: in cluster.yaml, checked by the one schema and validator: every problem at once, with its path."""

import os
import stat

import pytest

from pibake.cluster import load_cluster, validate_cluster_data
from pibake.errors import ConfigError, SecretsError
from pibake import switches
from tests.switches.conftest import BASE, write_cluster

OK = {"name": "rack", "driver": "kasa", "address": "10.1.1.50", "node": "red01", "auto_cycle": True}

CASES = [
    ([dict(OK, driver="zwave")], "switches[0].driver: 'zwave' is not one of kasa, shelly, tasmota"),
    ([dict(OK, colour="red")], "switches[0]: unknown key 'colour'"),
    ([{"name": "rack", "driver": "kasa", "node": "red01"}], "switches[0].address: missing"),
    ([OK, dict(OK, address="10.1.1.51")], "switches[1].name: 'rack' is already the name of switches[0]"),
    ([dict(OK, name="log")], "switches[0].name: 'log' is reserved"),
    ([dict(OK, name="Rack")], "switches[0].name: 'Rack' is not a valid switch name"),
    ([dict(OK, address="10.1.1.50:99999")], "switches[0].address: '99999' is not a TCP port"),
    ([dict(OK, address="admin:pw@10.1.1.50")], "credentials belong in secrets/"),
    ([dict(OK, thing="fan")], "switches[0]: give node or thing"),
    ([{"name": "x", "driver": "kasa", "address": "p1"}], "switches[0]: say what the switch powers"),
    ([dict(OK, node="red00")], "switches[0].auto_cycle: red00 is the manager"),
    ([{"name": "sw", "driver": "kasa", "address": "p1", "thing": "network switch", "auto_cycle": True}],
     "switches[0].auto_cycle: only a switch that powers a node"),
    ([dict(OK, mqtt_topic="t")], "switches[0].mqtt_topic: MQTT is for the tasmota driver only"),
    ([dict(OK, driver="tasmota", mqtt_topic="t")], "switches[0].mqtt_broker: missing"),
    ([dict(OK, driver="tasmota", mqtt_topic="a/#", mqtt_broker="10.1.1.10:1883")], "must be the device's topic"),
    ([dict(OK, driver="tasmota", mqtt_tls=True)], "switches[0].mqtt_broker: missing"),
    ([dict(OK, mqtt_tls=True)], "switches[0].mqtt_tls: MQTT is for the tasmota driver only"),
    ([dict(OK, timeout=0)], "switches[0].timeout"),
    ([dict(OK, auto_cycle="yes")], "switches[0].auto_cycle"),
]


@pytest.mark.parametrize("entries, message", CASES)
def test_each_problem_is_named_with_its_path(entries, message):
    problems = validate_cluster_data({**BASE, "switches": entries})
    assert any(message in p for p in problems), problems


def test_every_problem_is_reported_at_once(tmp_path):
    write_cluster(tmp_path, [dict(OK, driver="zwave"), dict(OK, name="Bad", node="red00"),
                             {"name": "f", "driver": "shelly", "address": "1.2.3.4:0", "thing": "fan"}])
    with pytest.raises(ConfigError) as err:
        load_cluster(tmp_path)
    text = str(err.value)
    for part in ("switches[0].driver", "switches[1].name", "switches[1].auto_cycle", "switches[2].address"):
        assert part in text


def test_a_valid_list_loads(tmp_path):
    write_cluster(tmp_path, [OK, {"name": "fan", "driver": "tasmota", "address": "fan.lan", "thing": "fan",
                                  "mqtt_broker": "10.1.1.10:1883", "mqtt_topic": "tasmota_5A1B2C"}])
    cluster = load_cluster(tmp_path)
    assert [s.name for s in cluster.switches] == ["rack", "fan"]
    assert cluster.switches[0].node == "red01" and cluster.switches[0].auto_cycle is True
    assert switches.list_switches(tmp_path)[1]["transport"] == "mqtt"


def test_credentials_are_private_and_never_in_cluster_yaml(tmp_path):
    write_cluster(tmp_path, [OK])
    path = switches.set_credentials(tmp_path, "rack", username="me@example.org", password="s3cret-pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert switches.load_credentials(tmp_path, "rack")["password"] == "s3cret-pw"
    assert "s3cret-pw" not in (tmp_path / "cluster.yaml").read_text()
    switches.set_credentials(tmp_path, "rack", password="second")  # replacing a 0400 file works
    switches.set_credentials(tmp_path, "rack", mqtt_username="b", mqtt_password="c")  # the other pair is kept
    assert switches.load_credentials(tmp_path, "rack") == {"username": "me@example.org", "password": "second",
                                                            "mqtt_username": "b", "mqtt_password": "c"}
    os.chmod(path, 0o644)
    with pytest.raises(SecretsError, match="readable by others"):
        switches.load_credentials(tmp_path, "rack")
    with pytest.raises(ConfigError, match="no switch named 'nope'"):
        switches.set_credentials(tmp_path, "nope", password="x")


def test_docs_example_loads(tmp_path):
    """docs/switches.md, block sw-config: the example cluster.yaml loads as shown."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "switches.md").read_text()
    block = re.search(r"```yaml\n# doc-test: sw-config\n(.*?)```", page, re.S).group(1)
    (tmp_path / "cluster.yaml").write_text(block)
    cluster = load_cluster(tmp_path)
    assert [(s.name, s.driver, s.powers) for s in cluster.switches] == [
        ("rack-red01", "kasa", "node red01"), ("net", "shelly", "network switch"), ("fan", "tasmota", "fan")]
