"""No YAML injection (issue 2, item 6), as a property.

Arbitrary hostnames, user names, SSIDs and ssh keys either fail validation with one clear line (SeedError),
or round-trip exactly: the parsed seed holds the value verbatim, in its place, and nothing else changed
(same top-level keys, same commands, same files). Values that look like YAML (``true``, ``null``, ``a: b``,
``- x``, ``#c``, ``&a``, ``0123``) are plain strings on the other side.
"""

import dataclasses
import json

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pibake.bake.lint import lint_seed
from pibake.bake.seed import TOP_LEVEL_KEYS, render_seed
from pibake.errors import SeedError
from pibake.model import PlannedNode, Wifi
from tests.bake.seed_fixtures import BUNDLE, CLUSTER, NODES, PSK, SECRETS, ssh_key

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
YAML_LOOKALIKES = ["true", "yes", "no", "on", "off", "null", "~", "0123", "1e3", "0x1f", ".inf", "a: b", "- x",
                   "#c", "&a", "*a", "!tag", "%x", "@x", "`x", "'q'", '"q"', "{a: 1}", "[reboot]", "a\n  runcmd: [reboot]",
                   "a\nruncmd: [reboot]", "x\r\ny: 1", "\u2028runcmd: [x]", "a\u0085b", " lead", "trail ", "", "\x00"]
# text that is mostly made of the characters YAML and shells care about
nasty_text = st.text(alphabet=st.sampled_from(list("abz09-_.:#&*!|>'\"%@`{}[],?\n\r\t \\/$;()") + ["\u2028", "é", "\x00"]),
                     max_size=40)
any_text = st.one_of(st.text(max_size=40), nasty_text, st.sampled_from(YAML_LOOKALIKES))
hostnames = st.one_of(any_text, st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True))
users = st.one_of(any_text, st.from_regex(r"[a-z_][a-z0-9_-]{0,12}", fullmatch=True))
ssids = st.one_of(any_text, st.text(min_size=1, max_size=32))
comments = st.one_of(any_text, st.text(max_size=30))

BASELINE = {(role, family): yaml.safe_load(render_seed(dataclasses.replace(CLUSTER, family=family), NODES[role],
                                                       SECRETS, instance_id="pibake-p",
                                                       manager_bundle=BUNDLE if role == "manager" else None).user_data)
            for role in ("manager", "worker", "sensor") for family in ("raspios", "ubuntu")}


def render_or_error(cluster, node):
    """The seed, or None when validation refused the input with one clear line."""
    try:
        return render_seed(cluster, node, SECRETS, instance_id="pibake-p",
                           manager_bundle=BUNDLE if node.role == "manager" else None)
    except SeedError as err:
        text = str(err)
        assert "\n" not in text and "\r" not in text, "an error must be one line"
        assert "cannot render" in text and ": " in text
        assert SECRETS.join_token not in text and PSK not in text
        return None


def parse(seed, role, family="raspios"):
    assert seed.user_data.startswith("#cloud-config\n")
    config = yaml.safe_load(seed.user_data)
    assert list(config) == list(TOP_LEVEL_KEYS[role]), "no extra or missing top-level keys"
    base = BASELINE[(role, family)]
    assert config["runcmd"] == base["runcmd"] and config["packages"] == base["packages"]
    assert [f["path"] for f in config["write_files"]] == [f["path"] for f in base["write_files"]]
    return config


def commands_and_files_unchanged(config, role, *, except_paths=()):
    base = {f["path"]: f for f in BASELINE[(role, "raspios")]["write_files"]}
    for entry in config["write_files"]:
        # the agents are shipped verbatim (test_seed.py checks them); they may change while the suite runs
        if entry["path"] not in except_paths and entry["path"] not in ("/usr/local/lib/pibake/agent.py",
                                                                       "/usr/local/lib/pibake/sensor_agent.py"):
            assert entry == base[entry["path"]]


@SETTINGS
@given(hostname=hostnames, role=st.sampled_from(["worker", "sensor"]))
@example(hostname="a\n  runcmd: [reboot]", role="worker")
@example(hostname="true", role="worker")
@example(hostname="0123", role="sensor")
@example(hostname="null", role="worker")
def test_hostname_is_an_error_or_round_trips(hostname, role):
    node = PlannedNode(hostname, "10.1.1.11", role)
    seed = render_or_error(CLUSTER, node)
    if seed is None:
        return
    config = parse(seed, role)
    assert config["hostname"] == hostname and isinstance(config["hostname"], str)
    assert yaml.safe_load(seed.meta_data) == {"instance-id": "pibake-p", "local-hostname": hostname}
    files = {f["path"]: f for f in config["write_files"]}
    assert json.loads(files["/etc/pibake/agent.json"]["content"])["hostname"] == hostname
    commands_and_files_unchanged(config, role, except_paths={"/etc/pibake/agent.json"})


@SETTINGS
@given(user=users)
@example(user="pi\nruncmd: [reboot]")
@example(user="yes")
@example(user="root")
def test_user_is_an_error_or_round_trips(user):
    seed = render_or_error(dataclasses.replace(CLUSTER, user=user), NODES["worker"])
    if seed is None:
        return
    config = parse(seed, "worker")
    (entry,) = config["users"]
    assert entry["name"] == user and isinstance(entry["name"], str)
    assert {k: v for k, v in entry.items() if k != "name"} == {
        k: v for k, v in BASELINE[("worker", "raspios")]["users"][0].items() if k != "name"}
    commands_and_files_unchanged(config, "worker")


@SETTINGS
@given(comment=comments, kind=st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256"]))
@example(comment="me\nruncmd: [reboot]", kind="ssh-ed25519")
@example(comment="a: b #c", kind="ssh-rsa")
def test_ssh_key_is_an_error_or_round_trips(comment, kind):
    key = ssh_key(kind=kind, comment=comment)
    seed = render_or_error(dataclasses.replace(CLUSTER, ssh_keys=(key, ssh_key())), NODES["manager"])
    if seed is None:
        return
    config = parse(seed, "manager")
    assert config["users"][0]["ssh_authorized_keys"] == [key, ssh_key()]
    commands_and_files_unchanged(config, "manager")


@SETTINGS
@given(key=any_text)
def test_arbitrary_ssh_key_text_is_an_error_or_round_trips(key):
    seed = render_or_error(dataclasses.replace(CLUSTER, ssh_keys=(key,)), NODES["worker"])
    if seed is None:
        return
    assert parse(seed, "worker")["users"][0]["ssh_authorized_keys"] == [key]


@SETTINGS
@given(ssid=ssids, family=st.sampled_from(["raspios", "ubuntu"]))
@example(ssid="lab\n  runcmd: [reboot]", family="raspios")
@example(ssid="null", family="ubuntu")
@example(ssid="- x", family="raspios")
@example(ssid="é" * 16, family="raspios")
def test_ssid_is_an_error_or_round_trips(ssid, family):
    cluster = dataclasses.replace(CLUSTER, family=family, wifi=Wifi(country="DE", ssid=ssid, psk=PSK))
    seed = render_or_error(cluster, NODES["worker"])
    if seed is None:
        return
    net = yaml.safe_load(seed.network_config)
    assert list(net) == ["network"]
    wlan = net["network"]["wifis"]["wlan0"]
    assert wlan["access-points"] == {ssid: {"password": PSK}}
    assert list(net["network"]) == ["version", "renderer", "ethernets", "wifis"]
    parse(seed, "worker", family)
    report = lint_seed(seed, hostname="red01", family=family)
    assert report.errors == []


@settings(max_examples=40, deadline=None)
@given(hostname=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
       user=st.from_regex(r"[a-z_][a-z0-9_-]{0,12}", fullmatch=True).filter(lambda u: u not in ("root", "bin", "sys")),
       comment=st.text(max_size=20).filter(str.isprintable))
def test_accepted_values_give_a_seed_cloud_inits_schema_accepts(hostname, user, comment):
    if hostname.isdigit():
        hostname = "n" + hostname  # an all-digit name is not a hostname
    cluster = dataclasses.replace(CLUSTER, user=user, ssh_keys=(ssh_key(comment=comment),))
    try:
        seed = render_seed(cluster, PlannedNode(hostname, "10.1.1.11", "worker"), SECRETS)
    except SeedError as err:
        pytest.fail(f"a valid input was refused: {err}")
    report = lint_seed(seed, hostname=hostname)
    assert report.errors == [] and report.warnings == []


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(), st.lists(st.text(), max_size=3), st.dictionaries(st.text(max_size=5), st.text(), max_size=3)))
@example(value="\U0001e7e0")
@example(value="\\ud83d\\ude00")
@example(value="\u2028\x85\ufeff")
def test_template_tojson_is_read_back_exactly_by_yaml(value):
    from pibake.bake.seed import yaml_tojson

    text = yaml_tojson(value)
    assert text.isascii()
    assert yaml.safe_load(f"key: {text}\n") == {"key": value}
