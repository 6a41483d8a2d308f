"""Seed rendering: golden files, every role x image family through the real cloud-init, validation, scripts.

Golden files live in tests/golden/<role>-<family>[-wifi]/. After an intended change to the templates,
regenerate them and review the diff:

    PIBAKE_REGEN_GOLDEN=1 python3 -m pytest tests/bake/test_seed.py -k golden

In golden files the agent's source is replaced by a fixed stand-in (the agent changes on its own schedule);
test_agent_source_shipped_verbatim checks the real one.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pibake.bake import seed as seed_mod
from pibake.bake.lint import lint_seed
from pibake.bake.seed import TOP_LEVEL_KEYS, render_seed
from pibake.errors import SeedError
from pibake.model import SeedSecrets, Wifi
from tests.conftest import needs_program, needs_root, not_applicable
from tests.bake.seed_fixtures import (
    BUNDLE, CLUSTER, FAKE_ADMIN, FAKE_MUNGE, FAKE_TOKEN, FAMILIES, NODES, PSK, SECRETS, cloud_init_network,
    cloud_init_schema, cluster_for, has_cloud_init, render, ssh_key,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_CASES = [("manager", "raspios", False), ("worker", "raspios", True), ("sensor", "raspios", False),
                ("sensor", "raspios", True), ("worker", "ubuntu", False)]
AGENT_STAND_IN = "# pibake agent (stand-in for golden files)\n"
SENSOR_AGENT_STAND_IN = "# pibake sensor agent (stand-in for golden files)\n"
needs_cloud_init = pytest.mark.skipif(not has_cloud_init(), reason="cloud-init is not installed")


def files_of(seed):
    return {p["path"]: p for p in yaml.safe_load(seed.user_data)["write_files"]}


@pytest.mark.parametrize("role,family,wifi", GOLDEN_CASES)
def test_golden(role, family, wifi, monkeypatch):
    monkeypatch.setattr(seed_mod, "agent_source", lambda: AGENT_STAND_IN)
    monkeypatch.setattr(seed_mod, "sensor_agent_source", lambda: SENSOR_AGENT_STAND_IN)
    seed = render(role, family, wifi, instance_id=f"pibake-golden-{role}")
    case = GOLDEN / f"{role}-{family}{'-wifi' if wifi else ''}"
    if os.environ.get("PIBAKE_REGEN_GOLDEN"):
        case.mkdir(parents=True, exist_ok=True)
        for name, text in seed.files().items():
            (case / name).write_text(text)
    for name, text in seed.files().items():
        expected = (case / name).read_text()
        assert text == expected, f"{case.name}/{name} differs; regenerate with PIBAKE_REGEN_GOLDEN=1 and review"


def test_agent_source_shipped_verbatim():
    from importlib.resources import files

    source = files("pibake.firstboot").joinpath("agent.py").read_text()
    entry = files_of(render("worker"))["/usr/local/lib/pibake/agent.py"]
    assert entry["content"] == source
    assert entry["permissions"] == "0755"


@pytest.mark.parametrize("family", sorted(FAMILIES.values()))
@pytest.mark.parametrize("role", ["manager", "worker", "sensor"])
@pytest.mark.parametrize("wifi", [False, True])
def test_every_role_and_family_lints_clean(role, family, wifi):
    seed = render(role, family, wifi)
    report = lint_seed(seed, hostname=NODES[role].hostname, family=family)
    assert report.errors == []
    if role == "sensor" and not wifi:  # explained: test_sensor_without_wifi_is_explained_by_lint
        assert [w.path for w in report.warnings] == ["network.wifis"]
    else:
        assert report.warnings == []
    assert report.schema_file and report.schema_file.endswith("schema-cloud-config-v1.json")
    assert list(yaml.safe_load(seed.user_data)) == list(TOP_LEVEL_KEYS[role])


@needs_cloud_init
@pytest.mark.parametrize("image", sorted(FAMILIES))
@pytest.mark.parametrize("role", ["manager", "worker", "sensor"])
def test_real_cloud_init_schema_accepts(role, image, tmp_path):
    seed = render(role, FAMILIES[image], wifi=True)
    code, output = cloud_init_schema(seed.user_data, tmp_path)
    assert code == 0, output
    assert "Valid cloud-config" in output


@needs_cloud_init
def test_real_cloud_init_schema_rejects_what_lint_rejects(tmp_path):
    seed = render("worker")
    broken = seed.user_data.replace("lock_passwd: true", "lock_passwd: maybe")
    code, _ = cloud_init_schema(broken, tmp_path)
    assert code == 1
    report = lint_seed(dataclasses.replace(seed, user_data=broken))
    assert [str(e) for e in report.errors] == ["user-data: users.0: lock_passwd: 'maybe' is not of type 'boolean'"]


@needs_cloud_init
@pytest.mark.parametrize("family,renderer", [("raspios", "NetworkManager"), ("ubuntu", "networkd")])
def test_network_config_through_cloud_init(family, renderer, tmp_path):
    seed = render("worker", family, wifi=True)
    parsed = cloud_init_network(seed.network_config, tmp_path)
    (eth0,) = [i for i in parsed["interfaces"] if i["name"] == "eth0"]
    (subnet,) = eth0["subnets"]
    assert (subnet["type"], subnet["address"], subnet["prefix"]) == ("static", "10.1.1.11", 24)
    assert subnet["routes"] == [{"gateway": "10.1.1.1", "network": "0.0.0.0", "prefix": 0, "netmask": "0.0.0.0"}]
    assert subnet["dns_nameservers"] == ["10.1.1.1", "9.9.9.9"]
    netplan = parsed["files"]["netplan:etc/netplan/50-cloud-init.yaml"]
    written = yaml.safe_load(netplan)["network"]
    assert written["renderer"] == renderer
    assert written["wifis"]["wlan0"]["access-points"] == {"lab net": {"password": PSK}}
    assert written["wifis"]["wlan0"]["regulatory-domain"] == "DE"
    networkd = parsed["files"]["networkd:etc/systemd/network/10-cloud-init-eth0.network"]
    assert "Address=10.1.1.11/24" in networkd and "Gateway=10.1.1.1" in networkd


@needs_cloud_init
def test_sensor_wlan0_static_through_cloud_init(tmp_path):
    """A Wi-Fi-only sensor node: cloud-init's own v2 parser and netplan renderer give wlan0 the planned
    static address, route, DNS, the network and the regulatory domain; there is no eth0."""
    parsed = cloud_init_network(render("sensor", "raspios", wifi=True).network_config, tmp_path)
    assert "eth0" not in [i["name"] for i in parsed["interfaces"]]
    # cloud-init hands `wifis` to netplan as they are (its own network state has no Wi-Fi interfaces)
    written = yaml.safe_load(parsed["files"]["netplan:etc/netplan/50-cloud-init.yaml"])["network"]
    assert written["renderer"] == "NetworkManager" and "ethernets" not in written
    wlan = written["wifis"]["wlan0"]
    assert wlan["addresses"] == ["10.1.1.12/24"] and wlan["regulatory-domain"] == "DE"
    assert wlan["access-points"] == {"lab net": {"password": PSK}}
    assert wlan["routes"] == [{"to": "0.0.0.0/0", "via": "10.1.1.1"}] and wlan["dhcp4"] is False
    # cloud-init's parser raises KeyError on nameservers under wifis (this test caught it): DNS goes by bootcmd
    broken = yaml.safe_load(render("sensor", "raspios", wifi=True).network_config)
    broken["network"]["wifis"]["wlan0"]["nameservers"] = {"addresses": ["10.1.1.1"]}
    with pytest.raises(AssertionError, match="KeyError: 'wlan0'"):
        cloud_init_network(yaml.safe_dump(broken), tmp_path)


@pytest.mark.parametrize("family,path,line", [
    ("raspios", "etc/NetworkManager/conf.d/90-pibake-dns.conf", "servers=10.1.1.1,9.9.9.9"),
    ("ubuntu", "etc/systemd/resolved.conf.d/90-pibake-dns.conf", "DNS=10.1.1.1 9.9.9.9"),
])
def test_sensor_on_wifi_gets_dns_from_bootcmd(family, path, line, tmp_path):
    """The bootcmd writes the cluster's DNS servers where the image's network stack reads them (run here under
    $PIBAKE_ROOT, without nmcli/systemctl on PATH); a wired sensor's bootcmd does nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "printf"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "PIBAKE_ROOT": str(tmp_path / "root")}
    (command,) = yaml.safe_load(render("sensor", family, wifi=True).user_data)["bootcmd"]
    subprocess.run(command, env=env, check=True, timeout=30)
    written = (tmp_path / "root" / path).read_text().splitlines()
    assert written[-1] == line and written[0].startswith("# written by pibake")
    (wired,) = yaml.safe_load(render("sensor", family, wifi=False).user_data)["bootcmd"]
    subprocess.run(wired, env={**env, "PIBAKE_ROOT": str(tmp_path / "wired")}, check=True, timeout=30)
    assert not (tmp_path / "wired").exists()


def test_network_config_without_gateway_dns_wifi():
    seed = render("worker", cluster=cluster_for(gateway=None, dns=()))
    eth0 = yaml.safe_load(seed.network_config)["network"]["ethernets"]["eth0"]
    assert eth0 == {"dhcp4": False, "dhcp6": False, "addresses": ["10.1.1.11/24"]}


def test_meta_data_and_unique_instance_ids():
    first = render_seed(CLUSTER, NODES["worker"], SECRETS)
    second = render_seed(CLUSTER, NODES["worker"], SECRETS)
    assert first.instance_id != second.instance_id
    assert first.instance_id.startswith("pibake-")
    assert yaml.safe_load(first.meta_data) == {"instance-id": first.instance_id, "local-hostname": "red01"}
    assert first.user_data.replace(first.instance_id, "") == second.user_data.replace(second.instance_id, "")


def test_worker_content():
    seed = render("worker")
    config = yaml.safe_load(seed.user_data)
    assert seed.user_data.startswith("#cloud-config\n")
    assert config["hostname"] == "red01"
    (user,) = config["users"]
    assert user["name"] == "pi" and user["lock_passwd"] is True
    # the cluster's keys, then the manager's (the registry's jobs log in with it), from the manager's IP only
    assert user["ssh_authorized_keys"] == [ssh_key(), f'from="10.1.1.10",restrict {SECRETS.manager_ssh_key}']
    assert config["ssh_pwauth"] is False
    assert config["packages"] == ["slurmd", "munge", "slurm-client", "python3-psutil"]
    assert config["timezone"] == "Europe/Berlin"
    files = files_of(seed)
    agent_cfg = json.loads(files["/etc/pibake/agent.json"]["content"])
    assert agent_cfg == {
        "registry_url": "https://red00:8443", "join_token": FAKE_TOKEN, "ca_cert": "/etc/pibake/ca.crt",
        "hostname": "red01", "role": "worker", "manager": "red00", "manager_ip": "10.1.1.10",
        "credential_file": "/etc/pibake/node-credential", "boot_dir": "/boot/firmware",
    }
    assert files["/etc/pibake/agent.json"]["permissions"] == "0600"
    assert files["/etc/pibake/ca.crt"]["content"] == SECRETS.ca_cert_pem
    timesync = files["/etc/systemd/timesyncd.conf.d/pibake.conf"]["content"]
    assert "\nNTP=10.1.1.10\n" in timesync and "\nFallbackNTP=ntp.example.org\n" in timesync
    assert config["runcmd"][1] == ["/usr/local/lib/pibake/pibake-hosts-entry", "10.1.1.10", "red00"]
    assert config["runcmd"][-2] == ["/usr/local/lib/pibake/pibake-start", "pibake-agent.service", "--",
                                    "/usr/bin/python3", "/usr/local/lib/pibake/agent.py", "--config",
                                    "/etc/pibake/agent.json"]
    unit = files["/etc/systemd/system/pibake-agent.service"]["content"]
    assert "Type=oneshot" in unit
    assert "ExecStart=/usr/bin/python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json" in unit


def test_manager_content_and_bundle():
    seed = render("manager")
    config = yaml.safe_load(seed.user_data)
    for pkg in ("slurmctld", "munge", "slurm-client", "python3-flask", "gunicorn", "python3-clustershell"):
        assert pkg in config["packages"]
    assert config["bootcmd"] == [["install", "-d", "-m", "0700", "/var/lib/pibake", "/var/lib/pibake/cluster",
                                  "/var/lib/pibake/cluster/secrets"]]
    files = files_of(seed)
    import base64

    munge = files["/var/lib/pibake/cluster/secrets/munge.key"]
    assert (munge["encoding"], munge["permissions"]) == ("b64", "0400")
    assert base64.b64decode(munge["content"]) == FAKE_MUNGE
    for rel, data in BUNDLE.items():
        entry = files[f"/var/lib/pibake/cluster/{rel}"]
        assert base64.b64decode(entry["content"]) == data
    assert files["/var/lib/pibake/cluster/secrets/ca.crt"]["permissions"] == "0444"
    assert "secrets/ca.key" not in BUNDLE
    unit = files["/etc/systemd/system/pibake-registry.service"]["content"]
    assert "ExecStart=/opt/pibake/bin/pibake --cluster /var/lib/pibake/cluster registry serve" in unit
    assert ["/usr/local/lib/pibake/pibake-install", "/boot/firmware/pibake/pibake-*.whl"] in config["runcmd"]
    chrony = files["/etc/chrony/conf.d/pibake.conf"]["content"]
    assert "allow 10.1.1.0/24\n" in chrony and "server ntp.example.org iburst\n" in chrony
    scrub = config["runcmd"][0]
    assert scrub[:2] == ["/usr/local/lib/pibake/pibake-scrub-seed", "/boot/firmware/user-data"]
    assert "/var/lib/pibake/cluster/secrets/munge.key" in scrub
    assert "/var/lib/pibake/cluster/secrets/ca.crt" not in scrub


def test_ssh_enabled_on_raspios_only():
    start = "/usr/local/lib/pibake/pibake-start"
    for role in ("manager", "worker", "sensor"):
        assert [start, "ssh.service"] in yaml.safe_load(render(role, "raspios").user_data)["runcmd"]
        assert [start, "ssh.service"] not in yaml.safe_load(render(role, "ubuntu").user_data)["runcmd"]


def test_sensor_content():
    config = yaml.safe_load(render("sensor").user_data)
    assert "slurmd" not in config["packages"] and "munge" not in config["packages"]
    assert {"python3-bme280", "python3-smbus2", "i2c-tools"} <= set(config["packages"])
    assert not any("enable-i2c" in " ".join(step) for step in config["runcmd"])  # I2C is on from config.txt
    assert "i2c" in config["users"][0]["groups"]
    files = files_of(render("sensor"))
    assert json.loads(files["/etc/pibake/agent.json"]["content"])["role"] == "sensor"
    assert files["/etc/modules-load.d/pibake-i2c.conf"]["content"].splitlines()[-1] == "i2c-dev"
    assert seed_mod.ROLE_BOOT_CONFIG["sensor"] == ("dtparam=i2c_arm=on",)


@pytest.mark.parametrize("role", ["manager", "worker", "sensor"])
def test_every_role_runs_the_sensor_agent(role):
    """SoC temperature and throttling from every Pi: the same agent and unit on every role, the I2C bus read only
    on sensor nodes; its settings load with the agent's own loader."""
    from tests.firstboot.sensorkit import load_agent

    sensor_agent = load_agent()
    config = yaml.safe_load(render(role).user_data)
    files = {p["path"]: p for p in config["write_files"]}
    assert files["/usr/local/lib/pibake/sensor_agent.py"]["content"] == seed_mod.sensor_agent_source()
    assert files["/usr/local/lib/pibake/sensor_agent.py"]["permissions"] == "0755"
    assert files["/etc/pibake/sensor.json"]["permissions"] == "0600"
    assert "pibake-sensor.service" in files["/etc/systemd/system/pibake-sensor.service"]["path"]
    # the last line but on the manager, whose switch loops come after it
    sensor_line = config["runcmd"][-3 if role == "manager" else -1]
    assert sensor_line == ["/usr/local/lib/pibake/pibake-start", "pibake-sensor.service", "--",
                           *seed_mod.SENSOR_COMMAND]
    settings = json.loads(files["/etc/pibake/sensor.json"]["content"])
    assert set(settings) <= set(sensor_agent.DEFAULTS)
    assert settings["bus"] == (1 if role == "sensor" else None)
    assert settings["agent_config"] == "/etc/pibake/agent.json"


def test_sensor_with_wifi_takes_its_address_on_wlan0():
    net = yaml.safe_load(render("sensor", wifi=True).network_config)["network"]
    assert "ethernets" not in net
    wlan = net["wifis"]["wlan0"]
    assert wlan["addresses"] == ["10.1.1.12/24"] and wlan["dhcp4"] is False
    assert wlan["regulatory-domain"] == "DE" and list(wlan["access-points"]) == ["lab net"]
    assert wlan["routes"] == [{"to": "0.0.0.0/0", "via": "10.1.1.1"}]
    assert "nameservers" not in wlan  # see test_sensor_on_wifi_gets_dns_from_bootcmd
    # a worker keeps its address on the wire and Wi-Fi as DHCP backup
    worker = yaml.safe_load(render("worker", wifi=True).network_config)["network"]
    assert worker["ethernets"]["eth0"]["addresses"] == ["10.1.1.11/24"] and worker["wifis"]["wlan0"]["dhcp4"]


def test_sensor_without_wifi_is_explained_by_lint():
    report = lint_seed(render("sensor", wifi=False), hostname=NODES["sensor"].hostname, family="raspios")
    assert report.errors == []
    assert len(report.warnings) == 1 and "a sensor node without Wi-Fi settings" in str(report.warnings[0])
    assert lint_seed(render("sensor", wifi=True), hostname=NODES["sensor"].hostname, family="raspios").warnings == []


def test_systemd_units_verify(tmp_path):
    """systemd's own parser accepts the units (no systemd as PID 1 is needed for `systemd-analyze verify`)."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    files = files_of(render("manager"))
    for name in ("pibake-agent.service", "pibake-registry.service", "pibake-sensor.service",
                 "pibake-switch-auto.service", "pibake-switch-rules.service"):
        unit = tmp_path / name
        unit.write_text(files[f"/etc/systemd/system/{name}"]["content"])
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                              text=True, timeout=60)
        problems = [line for line in proc.stderr.splitlines() if name in line and "not executable" not in line
                    and "No such file" not in line]
        assert problems == [], proc.stderr
    broken = tmp_path / "broken.service"  # the check can fail: systemd reports what it ignores
    broken.write_text("[Service]\nType=oneshoot\nExecStart=/bin/true\n")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True,
                          timeout=60)
    assert "oneshoot" in proc.stderr


def test_the_manager_runs_the_switch_loops_as_units_without_privileges(tmp_path):
    """pibake-switch-auto/-rules: on the manager only, the loop's command, restarted on failure, root without a
    single capability and a read-only system but for the cluster directory; systemd's own review of the
    sandbox (`systemd-analyze security --offline`) rates them no worse than MEDIUM."""
    files = files_of(render("manager"))
    runcmd = yaml.safe_load(render("manager").user_data)["runcmd"]
    for loop, unit in seed_mod.SWITCH_LOOPS.items():
        name = f"pibake-switch-{loop}.service"
        text = files[f"/etc/systemd/system/{name}"]["content"]
        lines = text.splitlines()
        assert f"ExecStart={' '.join(unit['command'])}" in lines
        assert {"Restart=on-failure", "CapabilityBoundingSet=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                f"ReadWritePaths={seed_mod.MANAGER_CLUSTER_DIR}", "UMask=0077"} <= set(lines)
        assert [seed_mod.SCRIPTS["start"][0], name, "--", *unit["command"]] in runcmd
        if shutil.which("systemd-analyze"):
            path = tmp_path / name
            path.write_text(text)
            proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True,
                                  text=True, timeout=60)
            level = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
            assert level and float(level.group(1)) <= 5.0, proc.stdout[-400:]
    assert seed_mod.SWITCH_LOOPS["auto"]["command"][-4:] == [
        "--identity", f"{seed_mod.MANAGER_CLUSTER_DIR}/secrets/manager-ssh.key",
        "--known-hosts", f"{seed_mod.MANAGER_CLUSTER_DIR}/switches/known_hosts"]
    for role in ("worker", "sensor"):
        assert not [p for p in files_of(render(role)) if "pibake-switch" in p]


# --------------------------------------------------------------------------- validation


def _node(**changes):
    return dataclasses.replace(NODES["worker"], **changes)


BAD_INPUTS = [
    (dict(node=_node(hostname="Red01")), "hostname: 'Red01' is not a valid hostname"),
    (dict(node=_node(hostname="a\n  runcmd: [reboot]")), "hostname: 'a\\n  runcmd: [reboot]' is not a valid"),
    (dict(node=_node(hostname="-red")), "is not a valid hostname"),
    (dict(node=_node(ip="10.2.2.2")), "ip: 10.2.2.2 is outside the cluster network 10.1.1.0/24"),
    (dict(node=_node(ip="10.1.1.300")), "ip: '10.1.1.300' is not an IPv4 address"),
    (dict(node=_node(role="boss")), "role: 'boss' is not a role"),
    (dict(node=_node(role="manager")), "the manager seed is for red00 (10.1.1.10) as cluster.yaml says"),
    (dict(node=_node(hostname="red00")), "hostname: red00 is the cluster's manager; render it with role manager"),
    (dict(node=_node(ip="10.1.1.10")), "ip: 10.1.1.10 is the manager's address"),
    (dict(cluster=cluster_for(user="root")), "cluster.user: 'root' is not a valid user name"),
    (dict(cluster=cluster_for(user="pi\nruncmd: x")), "cluster.user: 'pi\\nruncmd: x' is not a valid user name"),
    (dict(cluster=cluster_for(ssh_keys=("ssh-ed25519 AAAA\nruncmd: [reboot]",))), "cluster.ssh_keys[0]"),
    (dict(cluster=cluster_for(ssh_keys=(ssh_key(comment="a\nb"),))), "must be one line"),
    (dict(cluster=cluster_for(ssh_keys=(ssh_key(comment="a\u2028b"),))), "contains control or line-break"),
    (dict(cluster=cluster_for(ssh_keys=(ssh_key().replace("ssh-ed25519 ", "ssh-rsa ", 1),))),
     "does not match its type ssh-rsa"),
    (dict(cluster=cluster_for(timezone="Europe/Berlin\n")), "cluster.timezone"),
    (dict(cluster=cluster_for(locale="en US")), "cluster.locale"),
    (dict(cluster=cluster_for(family="fedora")), "cluster.family: 'fedora' is not an image family"),
    (dict(cluster=cluster_for(ntp_servers=("pool.ntp.org\nNTP=evil",))), "cluster.ntp_servers[0]"),
    (dict(cluster=cluster_for(dns=("dns.example",))), "cluster.dns[0]"),
    (dict(cluster=dataclasses.replace(CLUSTER, wifi=Wifi("XY", "x", PSK))), "cluster.wifi.country: 'XY' is not an ISO 3166"),
    (dict(cluster=dataclasses.replace(CLUSTER, wifi=Wifi("DE", "a" * 33, PSK))), "cluster.wifi.ssid: 'aaaa"),
    (dict(cluster=dataclasses.replace(CLUSTER, wifi=Wifi("DE", "lab\nnet", PSK))), "cluster.wifi.ssid"),
    (dict(cluster=dataclasses.replace(CLUSTER, wifi=Wifi("DE", "lab", "hunter2hunter2"))), "cluster.wifi.psk: <hidden> is not a WPA PSK"),
    (dict(secrets=SeedSecrets("not-a-token", SECRETS.ca_cert_pem)), "join_token: is missing or malformed"),
    (dict(instance_id="i d"), "instance_id"),
]


@pytest.mark.parametrize("inputs,message", BAD_INPUTS)
def test_bad_input_is_one_clear_error(inputs, message):
    with pytest.raises(SeedError) as err:
        render_seed(inputs.get("cluster", CLUSTER), inputs.get("node", NODES["worker"]),
                    inputs.get("secrets", SECRETS), instance_id=inputs.get("instance_id"))
    text = str(err.value)
    assert message in text
    assert "\n" not in text
    assert "hunter2" not in text and "not-a-token" not in text


def test_all_problems_reported_at_once():
    with pytest.raises(SeedError) as err:
        render_seed(cluster_for(user="root", timezone="x y"), _node(ip="10.9.9.9"), SECRETS)
    assert all(part in str(err.value) for part in ("ip:", "cluster.user:", "cluster.timezone:"))


def test_manager_needs_bundle_and_only_manager_gets_it():
    with pytest.raises(SeedError, match="needs the cluster bundle"):
        render_seed(CLUSTER, NODES["manager"], SECRETS)
    with pytest.raises(SeedError, match="only the manager's seed"):
        render_seed(CLUSTER, NODES["worker"], SECRETS, manager_bundle=BUNDLE)
    with pytest.raises(SeedError, match="relative paths"):
        render_seed(CLUSTER, NODES["manager"], SECRETS, manager_bundle={"../etc/passwd": b"x"})


# --------------------------------------------------------------------------- the scripts the seed installs


def _script(seed, name, tmp_path):
    entry = files_of(seed)[f"/usr/local/lib/pibake/{name}"]
    path = tmp_path / name
    path.write_text(entry["content"])
    path.chmod(0o755)
    return path


@needs_cloud_init
def test_scrub_removes_secrets_and_keeps_valid_cloud_config(tmp_path):
    seed = render("manager")
    boot = tmp_path / "boot"
    boot.mkdir()
    user_data = boot / "user-data"
    user_data.write_text(seed.user_data)
    scrub = _script(seed, "pibake-scrub-seed", tmp_path)
    argv = yaml.safe_load(seed.user_data)["runcmd"][0]
    assert argv[0] == "/usr/local/lib/pibake/pibake-scrub-seed"
    # Debian's python3 is what runs it on the node (with cloud-init's PyYAML)
    cmd = ["/usr/bin/python3", str(scrub), str(user_data)] + argv[2:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = user_data.read_text()
    import base64

    assert FAKE_TOKEN not in text
    assert base64.b64encode(FAKE_MUNGE).decode() not in text
    assert base64.b64encode((FAKE_ADMIN + "\n").encode()).decode() not in text
    left = {f["path"] for f in yaml.safe_load(text)["write_files"]}
    assert "/var/lib/pibake/cluster/secrets/ca.crt" in left and "/usr/local/lib/pibake/agent.py" in left
    assert not any(p.endswith(("munge.key", "registry.key", "admin-password", "agent.json")) for p in left)
    code, output = cloud_init_schema(text, tmp_path)
    assert code == 0, output
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing secret left" in again.stdout
    assert user_data.read_text() == text
    missing = subprocess.run(["/usr/bin/python3", str(scrub), str(boot / "absent")] + argv[2:],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 0 and "nothing to do" in missing.stdout


def test_hosts_entry_is_idempotent_and_replaces(tmp_path):
    script = _script(render("worker"), "pibake-hosts-entry", tmp_path)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tred00\n# red00 comment\n10.1.1.99 red00 old # was\n"
                     "10.1.1.98 red00\n10.1.1.20 other  red000\n")
    env = dict(os.environ, PIBAKE_HOSTS_FILE=str(hosts))
    for ip in ("10.1.1.10", "10.1.1.10", "10.1.1.50"):
        subprocess.run(["sh", str(script), ip, "red00"], env=env, check=True, timeout=30)
    assert hosts.read_text() == ("127.0.0.1\tlocalhost\n127.0.1.1\tred00\n# red00 comment\n10.1.1.99 old # was\n"
                                 "10.1.1.20 other  red000\n10.1.1.50\tred00\n")


@needs_root("needs root (mount namespace)")
@needs_program("unshare")
def test_hosts_entry_on_a_bind_mounted_hosts_file(tmp_path):
    """A container's /etc/hosts is a bind mount: rename onto it fails (EBUSY), so the script rewrites it in place
    and leaves no temp file."""
    script = _script(render("worker"), "pibake-hosts-entry", tmp_path)
    outside, hosts = tmp_path / "outside", tmp_path / "etc" / "hosts"
    hosts.parent.mkdir()
    outside.write_text("127.0.0.1\tlocalhost\n")
    hosts.write_text("")
    inner = f"mount --bind {outside} {hosts} && PIBAKE_HOSTS_FILE={hosts} sh {script} 10.1.1.10 red00"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert outside.read_text() == "127.0.0.1\tlocalhost\n10.1.1.10\tred00\n"
    assert sorted(p.name for p in hosts.parent.iterdir()) == ["hosts"]


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"),
                    reason=not_applicable("systemd is PID 1 here: would start real units"))
def test_start_without_systemd_runs_command_in_background(tmp_path):
    script = _script(render("worker"), "pibake-start", tmp_path)
    marker = tmp_path / "ran"
    env = dict(os.environ, PIBAKE_LOG_DIR=str(tmp_path / "log"))
    proc = subprocess.run(["sh", str(script), "demo.service", "--", "sh", "-c", f"echo started; touch {marker}"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "no systemd here" in proc.stdout
    import time

    for _ in range(200):  # wait for the detached command (not a timing assertion)
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists()
    for _ in range(200):
        if "started" in (tmp_path / "log" / "demo.log").read_text():
            break
        time.sleep(0.05)
    assert (tmp_path / "log" / "demo.log").read_text() == "started\n"
    alone = subprocess.run(["sh", str(script), "ssh.service"], env=env, capture_output=True, text=True, timeout=30)
    assert alone.returncode == 0 and "ssh.service left alone" in alone.stdout


def test_install_without_wheel_fails_clearly(tmp_path):
    script = _script(render("manager"), "pibake-install", tmp_path)
    proc = subprocess.run(["sh", str(script), str(tmp_path / "boot/pibake/pibake-*.whl")], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PIBAKE_VENV=str(tmp_path / "venv")))
    assert proc.returncode == 1 and "no wheel matches" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_no_ssh_keys_renders_a_valid_seed_with_a_warning():
    """A cluster without ssh keys still boots and enrols; lint says nobody can log in, it does not refuse."""
    import yaml

    from pibake.bake.lint import lint_seed

    seed = render(cluster=cluster_for(ssh_keys=()))
    user = yaml.safe_load(seed.user_data)["users"][0]
    # only the manager's key, which works from the manager's IP only: no person can log in
    assert user["ssh_authorized_keys"] == [f'from="10.1.1.10",restrict {SECRETS.manager_ssh_key}']
    assert user["lock_passwd"] is True
    report = lint_seed(seed, hostname="red01")
    assert report.ok, [str(e) for e in report.errors]
    assert any("nobody can log in" in str(w) for w in report.warnings)
