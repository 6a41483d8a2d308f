"""MQTT end to end in the lab, with the real programs: a cluster with ``mqtt: enabled``, a manager and a sensor
node burned with `pibake burn` and booted by the lab from their own seeds. The manager's first boot runs
`pibake mqtt setup` and starts Mosquitto (TLS, passwords, ACL); the sensor node enrols, asks the registry for its
broker password, reads the simulated BME280 through the real driver and publishes its state, availability and
Home Assistant discovery messages. A subscriber logged in as ``pibake_admin`` (as Home Assistant would be) sees
them retained; the node's own password cannot publish under another node's topics.

Subnet 10.77.84.0/24, names ``pq<pid>-*``: traffic stays inside namespaces this test creates.
"""

import json
import textwrap

import pytest
import yaml

from tests.e2e.test_lab_sensor import in_host, wait_for
from tests.firstboot.sensorkit import FIXTURES
from tests.fixtures_plugin import lab_prefix, make_ssh_key, needs_lab, pibake

NET = "10.77.84"
pytestmark = [pytest.mark.e2e, needs_lab("debootstrap")]

# Runs inside a lab host with its python3 and paho-mqtt 2.x: connects over TLS (the cluster CA), subscribes,
# collects retained messages for a few seconds and prints {topic: payload}; or publishes one message.
CLIENT = textwrap.dedent("""
    import json, ssl, sys, time
    import paho.mqtt.client as mqtt
    host, port, ca, user, password, mode, topic = sys.argv[1:8]
    got, acks = {}, []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-" + mode)
    c.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    if user:  # none: anonymous
        c.username_pw_set(user, password)
    c.on_message = lambda cl, u, m: got.__setitem__(m.topic, m.payload.decode())
    c.on_connect = lambda cl, u, f, rc, p: acks.append(str(rc))
    c.connect(host, int(port))
    c.loop_start()
    end = time.monotonic() + 10
    while not acks and time.monotonic() < end:
        time.sleep(0.1)
    if mode == "sub":
        c.subscribe(topic, qos=1)
        time.sleep(4)
    else:
        c.publish(topic, sys.argv[8], qos=1, retain=True).wait_for_publish(5)
        time.sleep(1)
    c.loop_stop()
    print(json.dumps({"connect": acks, "messages": got}))
""")
CA = "/var/lib/pibake/cluster/secrets/ca.crt"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, lab_rootfs):
    from pibake.bake.synthetic import build_pi_image
    from pibake.lab.cluster import lab_down, lab_up, load_state

    tmp = tmp_path_factory.mktemp("labmqtt")
    tmp.chmod(0o755)
    make_ssh_key(tmp, "mqtt@e2e", name="key")
    cdir = tmp / "cluster"
    init = ["init", "--manager", "red00", "--manager-ip", f"{NET}.10", "--network", f"{NET}.0/24",
            "--ssh-key", tmp / "key.pub", "--timezone", "Etc/UTC"]
    pibake(cdir, *init)
    data = yaml.safe_load((cdir / "cluster.yaml").read_text())
    data["mqtt"] = {"enabled": True}
    (cdir / "cluster.yaml").write_text(yaml.safe_dump(data))
    pibake(cdir, *init)  # again: adds the broker's certificate and the admin password, keeps the rest
    admin_password = (cdir / "secrets" / "mqtt-admin-password").read_text().strip()
    build_pi_image(tmp / "raspios.img", size="160M", boot_size="64M", family="raspios")
    images = tmp / "images"
    for host, ip, role in (("red00", f"{NET}.10", "manager"), ("red-zero", f"{NET}.40", "sensor")):
        pibake(cdir, "burn", "--hostname", host, "--ip", ip, "--role", role,
               "--output", f"{images}/{{hostname}}.img", "--image", tmp / "raspios.img")
    prefix = lab_prefix("pq")
    try:
        lab_up(cdir, images_dir=images, prefix=prefix, timeout=300, sim_bus=FIXTURES / "bme280-lab.json",
               sensor_settings={"interval_s": 3, "backoff_base_s": 1, "backoff_max_s": 4, "place": "hall"})
        hosts = {h["name"]: h for h in load_state(prefix)["hosts"]}
        yield hosts["red00"], hosts["red-zero"], admin_password
    finally:
        lab_down(prefix=prefix)


def client(host, user, password, mode, topic, payload=None):
    argv = ["python3", "-c", CLIENT, f"{NET}.10", "8883", CA if host["name"] == "red00" else "/etc/pibake/ca.crt",
            user, password, mode, topic] + ([payload] if payload is not None else [])
    return json.loads(in_host(host, argv))


def retained(manager, admin_password, topic="#"):
    return client(manager, "pibake_admin", admin_password, "sub", topic)["messages"]


def test_the_sensor_nodes_readings_reach_home_assistant_through_the_managers_broker(lab):
    manager, sensor, admin_password = lab
    messages = wait_for(
        "the sensor node's retained state and discovery on the broker",
        lambda: (m := retained(manager, admin_password)) and "pibake/red-zero/state" in m
        and "homeassistant/sensor/red-zero/temperature_c/config" in m and m, 240)
    state = json.loads(messages["pibake/red-zero/state"])
    assert state["temperature_c"] == 25.08 and state["place"] == "hall"  # the datasheet example, real driver
    assert messages["pibake/red-zero/availability"] == "online"
    config = json.loads(messages["homeassistant/sensor/red-zero/temperature_c/config"])
    assert config["device_class"] == "temperature" and config["unit_of_measurement"] == "°C"
    assert config["state_topic"] == "pibake/red-zero/state" and config["availability_topic"].endswith("/availability")
    assert "homeassistant/sensor/red-zero/humidity_pct/config" in messages


def test_anonymous_and_wrong_passwords_are_refused_by_the_lab_broker(lab):
    manager, _, admin_password = lab
    wrong = client(manager, "pibake_admin", admin_password + "x", "sub", "#")
    assert wrong["connect"] != ["Success"] and wrong["messages"] == {}
    anonymous = client(manager, "", "", "sub", "#")
    assert anonymous["connect"] != ["Success"] and anonymous["messages"] == {}
    right = client(manager, "pibake_admin", admin_password, "sub", "pibake/red-zero/state")
    assert right["connect"] == ["Success"] and right["messages"]


def test_a_node_cannot_publish_under_another_nodes_topic(lab):
    manager, sensor, admin_password = lab
    password = in_host(sensor, ["cat", "/etc/pibake/mqtt-password"]).strip()
    assert password
    client(sensor, "red-zero", password, "pub", "pibake/red00/forged", '{"temperature_c": -40}')
    client(sensor, "red-zero", password, "pub", "pibake/red-zero/e2e", "mine")
    seen = retained(manager, admin_password, "pibake/#")
    assert seen.get("pibake/red-zero/e2e") == "mine"  # its own topic: accepted
    assert "pibake/red00/forged" not in seen  # another node's: dropped by the ACL (MQTT 3.1.1 cannot say no)
