"""cluster.yaml: schema + semantic validation, init_cluster, the reference page's example."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from pibake import secrets
from pibake.cluster import (
    CLUSTER_SCHEMA,
    update_cluster_yaml,
    init_cluster,
    load_cluster,
    render_cluster_yaml,
    ssh_key_problem,
    validate_cluster_data,
)
from pibake.errors import ConfigError
from pibake.model import Cluster, Wifi
from tests.conftest import needs_root

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cluster-yaml.md"
BASE = dict(manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")


def ssh_pubkey(comment="you@laptop"):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}"


KEY = ssh_pubkey()
VALID = {
    "name": "red",
    "manager": "red00",
    "manager_ip": "10.1.1.10",
    "network": "10.1.1.0/24",
    "gateway": "10.1.1.1",
    "dns": ["10.1.1.1", "9.9.9.9"],
    "user": "pi",
    "ssh_keys": [KEY],
    "timezone": "Europe/Berlin",
    "locale": "en_US.UTF-8",
    "wifi": {"country": "DE", "ssid": "HomeNet", "psk": "a" * 64},
    "image": "raspios-trixie-lite-arm64",
    "ntp_servers": ["0.debian.pool.ntp.org", "10.1.1.1"],
    "registry_port": 8443,
}


def write_cluster(tmp_path, data=None, text=None):
    cdir = tmp_path / "cluster"
    cdir.mkdir(exist_ok=True)
    (cdir / "cluster.yaml").write_text(text if text is not None else yaml.safe_dump(data))
    return cdir


def with_(**changes):
    data = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


_DROP = object()


# --------------------------------------------------------------------------- load_cluster


def test_valid_file_loads_into_the_model(tmp_path):
    cluster = load_cluster(write_cluster(tmp_path, VALID))
    assert cluster == Cluster(
        name="red", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24", gateway="10.1.1.1",
        dns=("10.1.1.1", "9.9.9.9"), user="pi", ssh_keys=(KEY,), timezone="Europe/Berlin", locale="en_US.UTF-8",
        wifi=Wifi(country="DE", ssid="HomeNet", psk="a" * 64), image="raspios-trixie-lite-arm64", family="raspios",
        ntp_servers=("0.debian.pool.ntp.org", "10.1.1.1"), registry_port=8443,
    )
    assert cluster.directory == tmp_path / "cluster"


def test_minimal_file_gets_model_defaults(tmp_path):
    cluster = load_cluster(write_cluster(tmp_path, {k: VALID[k] for k in ("name", "manager", "manager_ip", "network")}))
    assert (cluster.user, cluster.locale, cluster.timezone, cluster.family) == ("pi", "C.UTF-8", "Etc/UTC", "raspios")
    assert cluster.gateway is None and cluster.dns == () and cluster.wifi is None


BAD = [
    # (changes to the valid file, fragment of the error)
    ({"network": "10.1.1.0/33"}, "network: '10.1.1.0/33' is not an IPv4 network in CIDR form"),
    ({"network": "10.1.1.5/24"}, "network: '10.1.1.5/24' is not an IPv4 network in CIDR form, host bits clear"),
    ({"network": "10.1.1.0/31"}, "network: '10.1.1.0/31' is not an IPv4 network in CIDR form, host bits clear, /30 or larger"),
    ({"network": "fe80::/64"}, "network: 'fe80::/64' is not an IPv4 network"),
    ({"manager_ip": "10.1.2.10"}, "manager_ip: 10.1.2.10 is outside the network 10.1.1.0/24"),
    ({"manager_ip": "10.1.1.0"}, "manager_ip: 10.1.1.0 is the network address"),
    ({"manager_ip": "10.1.1.255"}, "manager_ip: 10.1.1.255 is the broadcast address"),
    ({"manager_ip": "10.1.1.300"}, "manager_ip: '10.1.1.300' is not an IPv4 address"),
    ({"gateway": "192.168.1.1"}, "gateway: 192.168.1.1 is outside the network 10.1.1.0/24"),
    ({"dns": ["10.1.1.1", "1.1.1"]}, "dns[1]: '1.1.1' is not an IPv4 address"),
    ({"dns": "10.1.1.1"}, "dns: '10.1.1.1' is not of type 'array'"),
    ({"dns": ["1.1.1.1"] * 4}, "dns: at most 3 entries"),
    ({"manager": "Red00"}, "manager: 'Red00' is not a valid hostname"),
    ({"manager": "red00.lan"}, "manager: 'red00.lan' is not a valid hostname"),
    ({"manager": "-red"}, "manager: '-red' is not a valid hostname"),
    ({"manager": "r" * 64}, "manager: 'rrrr"),
    ({"manager": "1234"}, "manager: '1234' is not a valid hostname"),
    ({"manager": "admin"}, "manager: 'admin' is not a valid hostname"),
    ({"manager": "red00\n"}, "manager: 'red00\\n' is not a valid hostname"),
    ({"manager": "red00\nruncmd: [reboot]"}, "manager: 'red00\\nruncmd: [reboot]' is not a valid hostname"),
    ({"name": "Red Cluster"}, "name: 'Red Cluster' is not a valid cluster name"),
    ({"user": "Pi"}, "user: 'Pi' is not a valid user name"),
    ({"user": "1pi"}, "user: '1pi' is not a valid user name"),
    ({"user": "root"}, "user: 'root' is not a valid user name (1-32 of a-z 0-9 _ -, starting with a letter or _; not a system account"),
    ({"ssh_keys": ["ssh-ed25519"]}, "ssh_keys[0]: is not an ssh public key"),
    ({"ssh_keys": [KEY, "ssh-ed25519 not-base64!"]}, "ssh_keys[1]: is not an ssh public key: the key data is not base64"),
    ({"ssh_keys": ["ssh-dsa AAAAB3NzaC1yc2E="]}, "ssh_keys[0]: is not an ssh public key: unknown key type 'ssh-dsa'"),
    ({"ssh_keys": ["ssh-rsa " + KEY.split()[1]]}, "ssh_keys[0]: is not an ssh public key: the key data does not match its type ssh-rsa"),
    ({"ssh_keys": [KEY + "\nssh-ed25519 x"]}, "ssh_keys[0]: must be one line"),
    ({"ssh_keys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]}, "ssh_keys[0]: is a private key"),
    ({"timezone": "Mars/Olympus_Mons"}, "timezone: 'Mars/Olympus_Mons' is not a known time zone"),
    ({"timezone": "../../etc/passwd"}, "timezone: '../../etc/passwd' is not a known time zone"),
    ({"locale": "english"}, "locale: 'english' is not a locale name"),
    ({"wifi": {"country": "XX", "ssid": "a", "psk": "a" * 64}}, "wifi.country: 'XX' is not an ISO 3166 country code"),
    ({"wifi": {"country": False, "ssid": "a", "psk": "a" * 64}}, "wifi.country: False is not text; put the value in quotes"),
    ({"wifi": {"country": "DE", "ssid": "a", "psk": "g" * 64}}, "wifi.psk: <hidden> is not a WPA PSK: 64 hex digits"),
    ({"wifi": {"country": "DE", "ssid": "a", "psk": "hunter2hunter2"}}, "wifi.psk: <hidden> is not a WPA PSK"),
    ({"wifi": {"country": "DE", "ssid": "a\nb", "psk": "a" * 64}}, "wifi.ssid: 'a\\nb' is not an SSID (1 to 32 bytes of UTF-8, no control or line-break characters)"),
    ({"wifi": {"country": "DE", "ssid": "a", "psk": "a" * 64, "password": "x"}}, "wifi: unknown key 'password'"),
    ({"wifi": {"country": "DE", "psk": "a" * 64}}, "wifi.ssid: missing (this key is required)"),
    ({"image": "debian-12-arm64"}, "image: 'debian-12-arm64' is not in the catalog"),
    ({"image": "/srv/images/custom.img"}, "family: required for the local image /srv/images/custom.img"),
    ({"image": "raspios-trixie-lite-arm64", "family": "ubuntu"}, "family: raspios-trixie-lite-arm64 is a raspios image, not ubuntu"),
    ({"family": "arch"}, "family: 'arch' is not one of raspios, ubuntu"),
    ({"ntp_servers": ["pool ntp org"]}, "ntp_servers[0]: 'pool ntp org' is not an IPv4 address or a DNS host name"),
    ({"ntp_servers": ["10.1.1.300"]}, "ntp_servers[0]: '10.1.1.300' is not an IPv4 address or a DNS host name"),
    ({"registry_port": 70000}, "registry_port: 70000 is greater than the maximum of 65535"),
    ({"registry_port": "8443"}, "registry_port: '8443' is not of type 'integer'"),
    ({"gatway": "10.1.1.1"}, "unknown key 'gatway'"),
    ({"registry": {"slurm_apply": "reboot"}}, "registry.slurm_apply: 'reboot' is not one of"),
    ({"registry": {"approval": True}}, "registry: unknown key 'approval'"),
    ({"registry": {"require_approval": "yes"}}, "registry.require_approval: 'yes' is not of type 'boolean'"),
    ({"network": _DROP}, "network: missing (this key is required)"),
    ({"name": 7}, "name: 7 is not text; put the value in quotes"),
    ({"nodes": {"red-zero": {"board": "zero-2-w"}}},
     "nodes.red-zero.board: 'zero-2-w' is not one of zero, zero-w, zero2-w, pi3, pi4, pi5"),
    ({"nodes": {"red-zero": {"bord": "pi4"}}}, "nodes.red-zero: unknown key 'bord' (known keys: board)"),
    ({"nodes": {"Red_Zero": {"board": "pi4"}}}, "nodes.Red_Zero: 'Red_Zero' is not a valid hostname"),
]


def test_node_boards_load():
    from pibake.cluster import cluster_from_data

    data = with_(nodes={"red-zero": {"board": "zero-w"}, "red01": {"board": "pi4"}, "red02": {}, "red03": None})
    assert validate_cluster_data(data) == ["nodes.red03: None is not of type 'object'"]
    del data["nodes"]["red03"]
    cluster = cluster_from_data(data)
    assert cluster.board_of("red-zero") == "zero-w" and cluster.board_of("red01") == "pi4"
    assert cluster.board_of("red02") is None and cluster.board_of("red09") is None


@pytest.mark.parametrize("changes, fragment", BAD, ids=[f[1][:40] for f in BAD])
def test_invalid_values_are_reported_with_their_path(tmp_path, changes, fragment):
    cdir = write_cluster(tmp_path, with_(**changes))
    with pytest.raises(ConfigError) as err:
        load_cluster(cdir)
    message = str(err.value)
    assert fragment in message
    assert message.startswith(f"{cdir / 'cluster.yaml'}: ")
    assert "docs/cluster-yaml.md" in message
    assert "\n" not in message.replace("\\n", "")  # one line for the CLI
    assert "hunter2" not in message  # a PSK (or a passphrase written there) is never echoed


def test_every_problem_is_reported_at_once(tmp_path):
    cdir = write_cluster(tmp_path, with_(network="10.1.1.0/33", dns=["10.1.1.1", "1.1.1"], user="Root",
                                         timezone="Nowhere", wifi={"country": "ZZ", "ssid": "x", "psk": "0" * 64}))
    with pytest.raises(ConfigError) as err:
        load_cluster(cdir)
    problems = err.value.problems
    assert len(problems) == 5, problems
    for fragment in ("network: '10.1.1.0/33'", "dns[1]: '1.1.1'", "user: 'Root'", "timezone: 'Nowhere'", "wifi.country: 'ZZ'"):
        assert any(p.startswith(fragment) for p in problems), fragment


def test_valid_data_has_no_problems():
    assert validate_cluster_data(VALID) == []
    assert validate_cluster_data(with_(image="/srv/ubuntu.img.xz", family="ubuntu")) == []
    assert validate_cluster_data(with_(gateway="10.1.1.10")) == []  # the manager may route


def test_local_image_path_is_relative_to_the_cluster_directory(tmp_path):
    cluster = load_cluster(write_cluster(tmp_path, with_(image="images/custom.img", family="ubuntu")))
    assert cluster.image == str(tmp_path / "cluster" / "images" / "custom.img")
    assert cluster.family == "ubuntu"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: red\nmanager: red00\n  manager_ip: 10.1.1.10\n", "line 3, column 13: mapping values are not allowed here"),
        ("name: red\nmanager: [red00\n", "line 3"),
        ("name: red\nname: blue\nmanager: red00\n", "line 2, column 1: duplicate key 'name' (first on line 1)"),
        ("- red00\n- 10.1.1.10\n", "the file must be a mapping of keys to values (got list)"),
        ("", "is empty"),
        ("name: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
        ("\xff\xfe".encode("latin-1").decode("latin-1"), None),
    ],
)
def test_malformed_yaml_names_the_line(tmp_path, text, fragment):
    cdir = tmp_path / "cluster"
    cdir.mkdir()
    if fragment is None:
        (cdir / "cluster.yaml").write_bytes(b"\xff\xfe\x00")
        fragment = "not UTF-8 text"
    else:
        (cdir / "cluster.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(cdir)
    assert fragment in str(err.value)


def test_missing_file_or_directory_says_run_init(tmp_path):
    with pytest.raises(ConfigError, match=r"no cluster directory .*run `pibake init` first"):
        load_cluster(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty/cluster.yaml is missing: run `pibake init` first"):
        load_cluster(tmp_path / "empty")


def test_ssh_key_check_accepts_real_key_types(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    for private in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        line = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert ssh_key_problem(line.decode() + " comment with spaces") is None
    assert ssh_key_problem(KEY) is None


# --------------------------------------------------------------------------- the reference page


def _doc_yaml_blocks():
    return re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_full_example_loads_and_validates(tmp_path):
    blocks = _doc_yaml_blocks()
    full = yaml.safe_load(blocks[0])
    assert set(full) == set(CLUSTER_SCHEMA["properties"]), "the full example must show every key"
    cluster = load_cluster(write_cluster(tmp_path, text=blocks[0]))
    assert cluster.wifi.psk == secrets.wpa_psk("HomeNet", "correct horse battery")
    assert cluster.ssh_keys[0].endswith("you@laptop")
    minimal = yaml.safe_load(blocks[1])
    assert validate_cluster_data(minimal) == []


def test_docs_document_every_key():
    text = DOCS.read_text()
    for key in CLUSTER_SCHEMA["properties"]:
        assert f"| `{key}` |" in text, key


# --------------------------------------------------------------------------- writing


@settings(max_examples=150, deadline=None)
@given(
    ssid=st.text(min_size=1, max_size=40),
    user=st.text(max_size=40),
    name=st.text(max_size=40),
    key=st.text(max_size=200),
)
def test_rendered_yaml_holds_exactly_the_values(ssid, user, name, key):
    """Whatever the strings are, cluster.yaml says them verbatim and adds no keys (values only via safe_dump)."""
    data = with_(name=name, user=user, ssh_keys=[key], wifi={"country": "DE", "ssid": ssid, "psk": "0" * 64})
    text = render_cluster_yaml(data)
    assert yaml.safe_load(text) == data


# --------------------------------------------------------------------------- init_cluster


@pytest.fixture
def home(tmp_path):
    """A home directory with two ssh public keys (and a private key that must be ignored)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519.pub").write_text(ssh_pubkey("me@laptop") + "\n")
    (home / ".ssh" / "work.pub").write_text(ssh_pubkey("me@work") + "\n")
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return home


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _secret_bytes(cdir):
    return {p.name: p.read_bytes() for p in sorted((cdir / "secrets").iterdir())}


def test_init_creates_a_documented_cluster_yaml_and_secrets(tmp_path, home):
    cdir = tmp_path / "c"
    result = init_cluster(cdir, home=home, timezone="Europe/Berlin", **BASE)
    assert result["cluster_yaml_status"] == "created"
    assert set(result["secrets"].values()) == {"created"}
    assert result["ssh_keys_default"] is True and result["ssh_keys"] == 2
    assert result["ssh_key_files"] == [str(home / ".ssh" / "id_ed25519.pub"), str(home / ".ssh" / "work.pub")]
    text = (cdir / "cluster.yaml").read_text()
    assert text.count("\n# ") >= 10  # a comment above each key
    cluster = load_cluster(cdir)
    assert (cluster.name, cluster.gateway, cluster.dns, cluster.user) == ("red", "10.1.1.1", ("10.1.1.1",), "pi")
    assert (cluster.timezone, cluster.locale, cluster.image, cluster.family) == (
        "Europe/Berlin", "C.UTF-8", "raspios-trixie-lite-arm64", "raspios")
    assert _mode(cdir / "secrets") == 0o700
    assert _mode(cdir / "secrets" / "munge.key") == 0o400
    assert _mode(cdir / "cluster.yaml") == 0o644
    json.dumps(result)  # JSON-able


def test_init_result_contains_no_secret(tmp_path, home):
    cdir = tmp_path / "c"
    result = json.dumps(init_cluster(cdir, home=home, wifi_country="DE", wifi_ssid="HomeNet",
                                     wifi_password="correct horse battery", **BASE))
    for secret in (
        secrets.load_join_token(cdir).token, secrets.admin_password(cdir), secrets.munge_key_b64(cdir),
        secrets.wpa_psk("HomeNet", "correct horse battery"), "correct horse battery",
    ):
        assert secret not in result
    assert "correct horse battery" not in (cdir / "cluster.yaml").read_text()


def test_wifi_passphrase_becomes_the_ieee_psk(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, wifi_country="us", wifi_ssid="IEEE", wifi_password="password", **BASE)
    cluster = load_cluster(cdir)
    # IEEE 802.11i-2004, Annex H.4.1 test vector
    assert cluster.wifi == Wifi("US", "IEEE", "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e")
    assert _mode(cdir / "cluster.yaml") == 0o600  # the PSK opens the network too


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"wifi_ssid": "x"}, "Wi-Fi needs a country, an SSID and a password: missing --wifi-country, a Wi-Fi password"),
        ({"wifi_ssid": "HomeNet", "wifi_country": "DE", "wifi_password": "short"}, "a WPA passphrase has 8 to 63 characters"),
        ({"wifi_ssid": "HomeNet", "wifi_country": "XY", "wifi_password": "longenough"}, "--wifi-country: 'XY'"),
        ({"network": "10.1.1.0/33"}, "--network: '10.1.1.0/33' is not an IPv4 network"),
        ({"manager_ip": "10.9.9.9"}, "--manager-ip: 10.9.9.9 is outside the network 10.1.1.0/24"),
        ({"dns": ["10.1.1.1,1.2.3"]}, "--dns: '1.2.3' is not an IPv4 address"),
        ({"manager": "RED00"}, "--manager: 'RED00' is not a valid hostname"),
        ({"user": "root"}, "--user: 'root' is not a valid user name"),
        ({"rotate": ["munge"]}, "--rotate: unknown secret munge; choose from all, ca, registry-cert"),
        ({"image": "./custom.img"}, "family: required for the local image ./custom.img"),
    ],
)
def test_init_refuses_bad_options_and_writes_nothing(tmp_path, home, options, fragment):
    cdir = tmp_path / "c"
    with pytest.raises(ConfigError) as err:
        init_cluster(cdir, home=home, **{**BASE, **options})
    assert fragment in str(err.value)
    assert not cdir.exists()


def test_init_with_ssh_key_files(tmp_path, home):
    keyfile = tmp_path / "laptop.pub"
    keyfile.write_text(f"# my keys\n{KEY}\n\n{ssh_pubkey('other')}\n")
    result = init_cluster(tmp_path / "c", home=home, ssh_key_files=[keyfile], **BASE)
    assert result["ssh_keys_default"] is False and result["ssh_keys"] == 2
    assert load_cluster(tmp_path / "c").ssh_keys[0] == KEY
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="is a private key: give the public key"):
        init_cluster(tmp_path / "d", home=home, ssh_key_files=[private], **BASE)
    with pytest.raises(ConfigError, match="no such file"):
        init_cluster(tmp_path / "d", home=home, ssh_key_files=[tmp_path / "nope.pub"], **BASE)


def test_init_without_any_key_warns(tmp_path):
    empty_home = tmp_path / "nohome"
    empty_home.mkdir()
    result = init_cluster(tmp_path / "c", home=empty_home, **BASE)
    assert result["ssh_keys"] == 0
    assert any("no ssh public key" in w for w in result["warnings"])


def test_rerun_with_same_values_changes_nothing(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, **BASE)
    before_text = (cdir / "cluster.yaml").read_bytes()
    before_mtime = os.stat(cdir / "cluster.yaml").st_mtime_ns
    before_secrets = _secret_bytes(cdir)
    result = init_cluster(cdir, home=home, **BASE)
    assert result["cluster_yaml_status"] == "unchanged"
    assert set(result["secrets"].values()) == {"kept"}
    assert (cdir / "cluster.yaml").read_bytes() == before_text
    assert os.stat(cdir / "cluster.yaml").st_mtime_ns == before_mtime
    assert _secret_bytes(cdir) == before_secrets
    assert not (cdir / "cluster.yaml.bak").exists()


def test_hand_edits_survive_and_differing_values_are_refused(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, **BASE)
    path = cdir / "cluster.yaml"
    edited = path.read_text().replace("timezone: ", "# my own note\ntimezone: America/Denver\nx_old_timezone: ")
    edited = re.sub(r"\nx_old_timezone: .*\n", "\n", edited)
    path.write_text(edited)
    assert load_cluster(cdir).timezone == "America/Denver"

    # Same options again: the hand edit and its comment stay.
    assert init_cluster(cdir, home=home, **BASE)["cluster_yaml_status"] == "unchanged"
    assert path.read_text() == edited

    # A different value: refused, the file untouched, the message says what to do.
    with pytest.raises(ConfigError) as err:
        init_cluster(cdir, home=home, timezone="Europe/Paris", **BASE)
    message = str(err.value)
    assert "timezone: America/Denver there, Europe/Paris asked" in message
    assert "edit" in message and "--force" in message and "cluster.yaml.bak" in message
    assert path.read_text() == edited

    # --force: replaced, backup kept, other hand edits preserved as values.
    result = init_cluster(cdir, home=home, timezone="Europe/Paris", force=True, **BASE)
    assert result["cluster_yaml_status"] == "updated"
    assert (cdir / "cluster.yaml.bak").read_text() == edited
    assert load_cluster(cdir).timezone == "Europe/Paris"
    after = path.read_text()
    assert "# my own note\ntimezone: Europe/Paris\n" in after  # edited in place, the user's comment kept
    assert after.replace("Europe/Paris", "America/Denver") == edited


def test_broken_file_is_only_replaced_with_force(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, **BASE)
    (cdir / "cluster.yaml").write_text("manager: [red00\n")
    with pytest.raises(ConfigError, match="line 2.*--force"):
        init_cluster(cdir, home=home, **BASE)
    result = init_cluster(cdir, home=home, force=True, **BASE)
    assert result["cluster_yaml_status"] == "replaced"
    assert (cdir / "cluster.yaml.bak").read_text() == "manager: [red00\n"
    assert load_cluster(cdir).manager == "red00"


def test_secrets_are_only_replaced_when_rotated(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, **BASE)
    first = _secret_bytes(cdir)
    result = init_cluster(cdir, home=home, rotate=["munge-key"], **BASE)
    assert result["secrets"]["munge-key"] == "rotated"
    assert [v for k, v in result["secrets"].items() if k != "munge-key"] == ["kept"] * 5
    second = _secret_bytes(cdir)
    assert second["munge.key"] != first["munge.key"]
    assert {k: v for k, v in second.items() if k != "munge.key"} == {k: v for k, v in first.items() if k != "munge.key"}
    result = init_cluster(cdir, home=home, rotate=["all"], **BASE)
    assert set(result["secrets"].values()) == {"rotated"}
    third = _secret_bytes(cdir)
    assert all(third[k] != second[k]
               for k in ("ca.key", "munge.key", "admin-password", "join-token.json", "manager-ssh.key"))


def test_changing_the_manager_reissues_the_registry_certificate(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, **BASE)
    result = init_cluster(cdir, home=home, force=True, **{**BASE, "manager_ip": "10.1.1.20"})
    assert result["secrets"]["registry-cert"] == "rotated"
    assert result["secrets"]["ca"] == "kept"


def test_local_image_and_ubuntu_catalog_image(tmp_path, home):
    init_cluster(tmp_path / "a", home=home, image="/srv/img/my.img.xz", family="ubuntu", **BASE)
    cluster = load_cluster(tmp_path / "a")
    assert (cluster.image, cluster.family) == ("/srv/img/my.img.xz", "ubuntu")
    init_cluster(tmp_path / "b", home=home, image="ubuntu-24.04-server-arm64-raspi", **BASE)
    assert load_cluster(tmp_path / "b").family == "ubuntu"


@needs_root("SUDO_USER only matters when running as root")
def test_sudo_user_home_is_used_for_default_keys(tmp_path, monkeypatch):
    import pwd

    from pibake import cluster as cluster_mod

    someone = next((p for p in pwd.getpwall() if p.pw_uid >= 1000 and Path(p.pw_dir).is_dir()), None)
    if someone is None:
        monkeypatch.setenv("SUDO_USER", "root")
        assert cluster_mod._home_of_invoking_user() == Path.home()
        return
    monkeypatch.setenv("SUDO_USER", someone.pw_name)
    assert cluster_mod._home_of_invoking_user() == Path(someone.pw_dir)


def test_unset_keys_can_be_added_without_force(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=tmp_path, **BASE)  # no ~/.ssh there: ssh_keys: []
    assert load_cluster(cdir).ssh_keys == ()
    keyfile = tmp_path / "k.pub"
    keyfile.write_text(KEY + "\n")
    result = init_cluster(cdir, home=home, ssh_key_files=[keyfile], wifi_country="DE", wifi_ssid="HomeNet",
                          wifi_password="correct horse battery", **BASE)
    assert result["cluster_yaml_status"] == "updated"
    assert result["added"] == ["ssh_keys", "wifi"]
    cluster = load_cluster(cdir)
    assert cluster.ssh_keys == (KEY,) and cluster.wifi.ssid == "HomeNet"
    assert (cdir / "cluster.yaml.bak").exists()
    # and now they are set, a different Wi-Fi is a change that needs --force
    with pytest.raises(ConfigError, match="wifi: different Wi-Fi settings"):
        init_cluster(cdir, home=home, wifi_country="DE", wifi_ssid="Other", wifi_password="correct horse battery",
                     **BASE)


def test_force_over_a_broken_file_keeps_its_good_values(tmp_path, home):
    cdir = tmp_path / "c"
    init_cluster(cdir, home=home, timezone="America/Denver", **BASE)
    path = cdir / "cluster.yaml"
    path.write_text(path.read_text().replace("user: pi", "user: Pi"))
    with pytest.raises(ConfigError, match="user: 'Pi' is not a valid user name.*--force"):
        init_cluster(cdir, home=home, **BASE)
    result = init_cluster(cdir, home=home, user="pi", force=True, **BASE)
    assert result["cluster_yaml_status"] == "replaced"
    assert load_cluster(cdir).timezone == "America/Denver"  # the hand-set value survived


UPDATE_TEXT = """\
# top comment
name: red   # trailing note
manager: red00
dns:
- 10.1.1.1
- 9.9.9.9

# my note about the user
user: pi
ssh_keys: []
# end note
timezone: Etc/UTC
"""


def test_update_in_place_keeps_comments_and_says_exactly_the_data():
    data = yaml.safe_load(UPDATE_TEXT)
    data.update(dns=["1.1.1.1"], ssh_keys=[KEY], timezone="Europe/Berlin", locale="C.UTF-8")
    del data["manager"]
    out = update_cluster_yaml(UPDATE_TEXT, data)
    assert yaml.safe_load(out) == data
    for kept in ("# top comment", "name: red   # trailing note", "# my note about the user", "# end note"):
        assert kept in out
    assert "manager" not in out
    assert "# System locale of the nodes" in out  # an added key gets its documentation


@settings(max_examples=100, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["name", "dns", "user", "ssh_keys", "timezone", "extra"]),
                              st.one_of(st.text(max_size=30), st.lists(st.text(max_size=20), max_size=3)),
                              max_size=6))
def test_update_in_place_always_says_exactly_the_data(values):
    data = {**yaml.safe_load(UPDATE_TEXT), **values}
    assert yaml.safe_load(update_cluster_yaml(UPDATE_TEXT, data)) == data


def test_unwritable_cluster_directory_is_a_clear_error(tmp_path, home):
    (tmp_path / "afile").write_text("not a directory\n")
    with pytest.raises(ConfigError, match=r"cannot write the cluster directory .*afile/c: Not a directory"):
        init_cluster(tmp_path / "afile" / "c", home=home, **BASE)
    with pytest.raises(ConfigError, match=r"afile exists and is not a directory"):
        init_cluster(tmp_path / "afile", home=home, **BASE)
