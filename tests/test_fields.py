"""One validator per field (pibake.fields): every entry point accepts and refuses exactly the same values, with
the field's one message.

The entry points are the real ones: cluster.yaml validation (``validate_cluster_data``), seed rendering's
checks (``validate_seed_inputs``), the registry's enrolment check (``validate_enrolment``: the published
schema, as the server runs it; a few cases also go through the Flask app) and the CLI's option converter
(``FieldType``, as click calls it). Hypothesis generates valid-looking values (from each field's own rule),
near misses (one character changed, case flipped, a trailing newline) and junk.
"""

import dataclasses
import json
import string
import zoneinfo

import click
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pibake import fields
from pibake.bake.seed import validate_seed_inputs
from pibake.cli import options
from pibake.cluster import cluster_from_data, validate_cluster_data
from pibake.errors import ConfigError, LabError, RegistryError, SeedError
from pibake.lab.hosts import LabHost
from pibake.model import PlannedNode, SeedSecrets, Wifi
from pibake.registry.schema import openapi_document
from pibake.registry.service import validate_enrolment
from tests.registry.conftest import enrolment

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PSK = "0123456789abcdef" * 4
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtrbGtra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tr pi@laptop"
VALID_YAML = {"name": "red", "manager": "red00", "manager_ip": "10.1.1.10", "network": "10.1.1.0/24",
              "gateway": "10.1.1.1", "dns": ["10.1.1.1"], "user": "pi", "ssh_keys": [], "timezone": "Etc/UTC",
              "locale": "C.UTF-8", "ntp_servers": ["ntp.example.org"],
              "wifi": {"country": "DE", "ssid": "lab", "psk": PSK}}
CLUSTER = cluster_from_data(VALID_YAML)
WORKER = PlannedNode(hostname="red01", ip="10.1.1.11", role="worker")
SECRETS = SeedSecrets(join_token="K10" + "ab" * 32 + "::abc123." + "s" * 32,
                      ca_cert_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                      manager_ssh_key=None)


# ----------------------------------------------------------------------------- the entry points

def _yaml_with(path, value):
    data = json.loads(json.dumps(VALID_YAML))
    key, _, sub = path.partition(".")
    if key in ("dns", "ntp_servers"):
        data[key] = [value]
        path = f"{key}[0]"
    elif sub:
        data[key][sub] = value
    else:
        data[key] = value
    return data, path


def cluster_yaml_verdict(path, value):
    """The problem cluster.yaml validation reports at ``path`` (None: accepted)."""
    data, where = _yaml_with(path, value)
    found = [p for p in validate_cluster_data(data) if p.startswith(f"{where}: ")]
    return found[0][len(where) + 2:] if found else None


def seed_verdict(path, value):
    """The problem seed rendering's checks report at ``path`` (None: accepted)."""
    node, cluster = WORKER, CLUSTER
    if path == "hostname":
        node = dataclasses.replace(WORKER, hostname=value)
    elif path.startswith("wifi."):
        cluster = dataclasses.replace(CLUSTER, wifi=dataclasses.replace(CLUSTER.wifi, **{path[5:]: value}))
    elif path in ("dns", "ntp_servers"):
        cluster = dataclasses.replace(CLUSTER, **{path: (value,)})
    else:
        cluster = dataclasses.replace(CLUSTER, **{path: value})
    where = {"hostname": "hostname", "dns": "cluster.dns[0]", "ntp_servers": "cluster.ntp_servers[0]"}.get(
        path, f"cluster.{path}")
    try:
        validate_seed_inputs(cluster, node, SECRETS)
    except SeedError as err:
        text = str(err).split(": cannot render: ", 1)[1]
        if path == "network" and text.startswith("ip: ") and "outside the cluster network" in text:
            return None  # a valid network the worker's address is not in: the network itself was accepted
        assert text.startswith(f"{where}: "), text  # nothing else in the seed is wrong
        return text[len(where) + 2:]
    return None


def registry_verdict(key, value):
    """The problem the registry's enrolment check reports for ``key`` (None: accepted)."""
    body = enrolment()
    if key == "ips":
        body["ips"], key = [value], "ips[0]"
    else:
        body[key] = value
    try:
        validate_enrolment(body)
    except RegistryError as err:
        assert err.status == 400
        found = [p for p in err.problems if p.startswith(f"{key}: ")]
        return found[0][len(key) + 2:] if found else None
    return None


def cli_verdict(field, value, opt="--value"):
    """The problem the CLI's option converter reports (None: accepted)."""
    try:
        options.FieldType(field).convert(value, click.Option([opt]), None)
    except ConfigError as err:
        assert str(err).startswith(f"{opt}: ")
        return str(err)[len(opt) + 2:]
    return None


# (field, cluster.yaml key, seed path) for the fields cluster.yaml and seeds share; the registry's below
SHARED = {
    "hostname": (fields.HOSTNAME, "manager", "hostname"),
    "ipv4": (fields.IPV4, "dns", "dns"),
    "network": (fields.NETWORK, "network", "network"),
    "locale": (fields.LOCALE, "locale", "locale"),
    "timezone": (fields.TIMEZONE, "timezone", "timezone"),
    "user": (fields.USERNAME, "user", "user"),
    "country": (fields.COUNTRY, "wifi.country", "wifi.country"),
    "ssid": (fields.SSID, "wifi.ssid", "wifi.ssid"),
    "psk": (fields.PSK, "wifi.psk", "wifi.psk"),
    "host": (fields.HOST, "ntp_servers", "ntp_servers"),
}
REGISTRY = {"hostname": (fields.HOSTNAME, "hostname"), "ip": (fields.IP_ADDRESS, "ips"),
            "mac": (fields.MAC, "mac")}


def verdicts(name, value):
    """{entry point: its problem or None} for one value of field ``name``."""
    out = {}
    if name in SHARED:
        field, yaml_key, seed_path = SHARED[name]
        out["cluster.yaml"] = cluster_yaml_verdict(yaml_key, value)
        out["seed"] = seed_verdict(seed_path, value)
        out["cli"] = cli_verdict(field, value)
    if name in REGISTRY:
        field, key = REGISTRY[name]
        out["registry"] = registry_verdict(key, value)
        out.setdefault("cli", cli_verdict(field, value))
    out["field"] = field.problem(value)
    return out


def assert_agree(name, value):
    found = verdicts(name, value)
    assert len(set(found.values())) == 1, (value, found)  # same verdict, same message


# ----------------------------------------------------------------------------- generated values

def near_misses(valid):
    """Valid values and their near misses: one character replaced/inserted, case flipped, a newline added."""
    edits = st.tuples(valid, st.integers(0, 70), st.sampled_from(list("-._/@ A0z\n\t\x00\u2028é:")),
                      st.sampled_from(["replace", "insert", "swapcase", "newline", "keep"]))

    def edit(args):
        text, at, char, how = args
        at = at % (len(text) + 1)
        if how == "replace":
            return text[:at] + char + text[at + 1:]
        if how == "insert":
            return text[:at] + char + text[at:]
        if how == "swapcase":
            return text.swapcase()
        return text + "\n" if how == "newline" else text
    return edits.map(edit)


def from_pattern(body):
    return st.from_regex(body, fullmatch=True)


_LABEL = from_pattern(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?")
JUNK = st.text(max_size=80)
STRATEGIES = {
    "hostname": st.one_of(near_misses(st.one_of(_LABEL, st.just("admin"), st.from_regex(r"[0-9]{1,6}", fullmatch=True),
                                                st.just("a" * 63), st.just("a" * 64))), JUNK),
    "ipv4": st.one_of(near_misses(st.ip_addresses(v=4).map(str)), st.ip_addresses(v=6).map(str), JUNK),
    "network": st.one_of(near_misses(st.builds("{}/{}".format, st.ip_addresses(v=4), st.integers(0, 33))), JUNK),
    "locale": st.one_of(near_misses(st.sampled_from(["C", "POSIX", "C.UTF-8", "en_US.UTF-8", "de_DE@euro",
                                                     "sr_RS.UTF-8@latin", "ast_ES.UTF-8", "english"])), JUNK),
    "timezone": st.one_of(near_misses(st.sampled_from(sorted(zoneinfo.available_timezones()))),
                          st.just("../../etc/passwd"), st.just("Mars/Base"), JUNK),
    "user": st.one_of(near_misses(st.one_of(from_pattern(r"[a-z_][a-z0-9_-]{0,33}"),
                                            st.sampled_from(sorted(fields.RESERVED_USERS)))), JUNK),
    "country": st.one_of(near_misses(st.sampled_from(sorted(fields.ISO3166_ALPHA2))),
                         st.text(alphabet=string.ascii_letters, min_size=1, max_size=3), JUNK),
    "ssid": st.one_of(st.text(min_size=0, max_size=34), st.text(alphabet="é€😀", max_size=12), JUNK),
    "psk": st.one_of(near_misses(from_pattern(r"[0-9a-fA-F]{64}")), from_pattern(r"[0-9a-f]{60,66}"), JUNK),
    "host": st.one_of(near_misses(st.one_of(st.ip_addresses(v=4).map(str), from_pattern(
        r"([a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?\.){0,3}[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?"))), JUNK),
    "ip": st.one_of(near_misses(st.ip_addresses().map(str)), st.just("fe80::1%eth0"), JUNK),
    "mac": st.one_of(near_misses(from_pattern(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")), JUNK),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_entry_point_accepts_and_refuses_the_same_values(name):
    @PROPERTY
    @given(STRATEGIES[name])
    def check(value):
        assert_agree(name, value)
    check()


# ----------------------------------------------------------------------------- the old disagreements

# (field, value, accepted): each of these was accepted by one entry point and refused by another before the
# validators were shared. The comment says who disagreed.
FORMER_DISAGREEMENTS = [
    ("hostname", "1234", False),  # registry enrolment accepted all-digit names; cluster.yaml/seed refused them
    ("hostname", "red01\n", False),  # cluster.yaml and the registry accepted a trailing newline (Python's `$`)
    ("hostname", "admin", False),  # refused by the registry only (its admin account); burnable, never enrolled
    ("hostname", "a" * 40, True),  # the lab refused names over 32 characters
    ("psk", PSK.upper(), True),  # seeds accepted upper-case hex, cluster.yaml refused it (now: stored lower)
    ("locale", "english", False),  # seeds accepted any of [A-Za-z0-9_.@-]{1,64}
    ("locale", "en_US.UTF-8@", False),
    ("timezone", "Mars/Base", False),  # seeds checked the shape only, not the zone database
    ("country", "XY", False),  # seeds accepted any two capitals
    ("country", "de", True),  # init upper-cased it, cluster.yaml refused it (now: stored upper)
    ("ssid", "lab\x7f", False),  # cluster.yaml refused only characters below 32, seeds any unprintable
    ("ssid", "lab\u2028net", False),
    ("network", "10.1.1.0/31", False),  # seeds accepted networks too small for a manager and a worker
    ("ipv4", "2001:db8::1", False),  # seeds accepted IPv6 DNS servers, cluster.yaml refused them
    ("host", "2001:db8::1", False),  # the same for NTP servers
    ("host", "pool.ntp.org.", False),  # cluster.yaml accepted a trailing dot, seeds refused it
    ("host", "10.1.1.300", False),  # both read a mistyped address as a DNS name (numeric top-level label)
    ("mac", "dc:a6:32:01:02:03\n", False),  # the registry stored the newline
]


@pytest.mark.parametrize("name, value, accepted", FORMER_DISAGREEMENTS)
def test_former_disagreements_are_gone(name, value, accepted):
    found = verdicts(name, value)
    assert set(found.values()) == {None} if accepted else len(set(found.values())) == 1 and None not in found.values(), found


def test_ssh_key_comments_must_be_printable_everywhere():
    """cluster.yaml accepted a U+2028 in a key's comment; seed rendering refused it."""
    line = KEY + "\u2028x"
    assert fields.ssh_key_problem(line) == "contains control or line-break characters"
    assert any(p.startswith("ssh_keys[0]: contains control") for p in validate_cluster_data({**VALID_YAML,
                                                                                            "ssh_keys": [line]}))
    with pytest.raises(SeedError, match=r"cluster.ssh_keys\[0\]: .* contains control"):
        validate_seed_inputs(dataclasses.replace(CLUSTER, ssh_keys=(line,)), WORKER, SECRETS)


def test_normalised_values_are_what_is_stored():
    cluster = cluster_from_data({**VALID_YAML, "wifi": {"country": "de", "ssid": "lab", "psk": PSK.upper()}})
    assert cluster.wifi == Wifi(country="DE", ssid="lab", psk=PSK)
    assert cli_verdict(fields.COUNTRY, "de") is None
    assert options.FieldType(fields.COUNTRY).convert("de", click.Option(["--wifi-country"]), None) == "DE"
    assert validate_enrolment(enrolment(mac="DC-A6-32-01-02-03"))["mac"] == "dc:a6:32:01:02:03"


def test_the_secret_field_is_never_echoed():
    assert cluster_yaml_verdict("wifi.psk", "hunter2hunter2") == seed_verdict("wifi.psk", "hunter2hunter2")
    assert "hunter2" not in cli_verdict(fields.PSK, "hunter2hunter2")
    assert cli_verdict(fields.PSK, "hunter2hunter2").startswith("<hidden> is not a WPA PSK")


# ----------------------------------------------------------------------------- the published document

def _schemas_with_field(node, found):
    if isinstance(node, dict):
        if "x-field" in node:
            found.append(node)
        for value in node.values():
            _schemas_with_field(value, found)
    elif isinstance(node, list):
        for value in node:
            _schemas_with_field(value, found)
    return found


def test_the_published_patterns_are_the_validators():
    """openapi.json states each field's rule with the field's own pattern (no copy that can drift)."""
    doc = openapi_document()
    marked = _schemas_with_field(doc, [])
    assert {node["x-field"] for node in marked} == {"hostname", "MAC address", "IP address"}
    for node in marked:
        field = fields.FIELDS[node["x-field"]]
        assert node.get("pattern") == field.pattern, node
    # every hostname in a path is the same field
    text = json.dumps(doc)
    assert text.count(json.dumps(fields.HOSTNAME_PATTERN)) == 8
    assert "[a-z0-9-]{0,61}[a-z0-9])?$\"" not in text  # no older copy of the rule is left


def test_the_lab_names_its_hosts_by_the_node_hostname_rule():
    """The lab refused names over 32 characters; no interface carries the name, so the node rule is all it needs
    (both checks below fail before anything is created)."""
    with pytest.raises(LabError) as err:
        LabHost.create("1234", "10.77.0.11", network=None)
    assert str(err.value) == f"lab host name: {fields.HOSTNAME.problem('1234')}"
    with pytest.raises(LabError, match="'not-an-ip' is not an IP address"):  # the 40-character name passed
        LabHost.create("a" * 40, "not-an-ip", network=None)
