"""Seed lint: cloud-init's own schema (compared with the real `cloud-init schema`) and pibake's checks."""

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from pibake.bake import lint as lint_mod
from pibake.bake.lint import NO_SCHEMA_WARNING, SIZE_MAX, SIZE_WARN, find_cloud_init_schema, lint_seed, lint_seed_dir
from pibake.bake.seed import dump_yaml
from tests.bake.seed_fixtures import FAKE_ADMIN, FAKE_TOKEN, cloud_init_schema, has_cloud_init, render

needs_cloud_init = pytest.mark.skipif(not has_cloud_init(), reason="cloud-init is not installed")


def with_user_data(seed, mutate):
    config = yaml.safe_load(seed.user_data)
    mutate(config)
    return dataclasses.replace(seed, user_data="#cloud-config\n" + dump_yaml(config))


def messages(problems):
    return [str(p) for p in problems]


def test_schema_is_the_installed_cloud_inits():
    path = find_cloud_init_schema()
    if not has_cloud_init():
        assert path is None
        return
    assert path.endswith("cloudinit/config/schemas/schema-cloud-config-v1.json")
    listing = subprocess.run(["dpkg", "-L", "cloud-init"], capture_output=True, text=True).stdout.split()
    assert path in listing
    # not copied into this repository
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert not path.startswith(repo)


def test_clean_seed_has_no_problems():
    report = lint_seed(render("worker"), hostname="red01", family="raspios")
    assert report.ok and report.errors == [] and report.warnings == []


# (mutation of the parsed user-data, expected error) -- each also rejected by the real `cloud-init schema`
SCHEMA_CASES = [
    (lambda c: c["users"][0].update(lock_passwd="maybe"),
     "user-data: users.0: lock_passwd: 'maybe' is not of type 'boolean'"),
    (lambda c: c.update(ssh_pwauth=[1]), "user-data: ssh_pwauth"),
    (lambda c: c.update(package_update="yes"), "user-data: package_update: 'yes' is not of type 'boolean'"),
    (lambda c: c["write_files"][1].update(permissions=600), "user-data: write_files.1.permissions: must be of type"),
    (lambda c: c["write_files"][1].update(encoding="rot13"), "user-data: write_files.1.encoding: must be one of"),
    (lambda c: c["write_files"][1].pop("path"), "user-data: write_files.1: 'path' is a required property"),
    (lambda c: c.update(runcmd=[1]), "user-data: runcmd.0"),
    (lambda c: c.update(timezone=5), "user-data: timezone: 5 is not of type 'string'"),
]


@pytest.mark.parametrize("mutate,expected", SCHEMA_CASES)
def test_schema_errors_have_paths(mutate, expected, tmp_path):
    seed = with_user_data(render("worker"), mutate)
    report = lint_seed(seed)
    assert any(m.startswith(expected) for m in messages(report.errors)), messages(report.errors)
    for message in messages(report.errors):  # never the content of write_files (secrets)
        assert FAKE_TOKEN not in message and "join_token" not in message
    if has_cloud_init():
        code, output = cloud_init_schema(seed.user_data, tmp_path)
        assert code == 1, output


@needs_cloud_init
def test_agrees_with_cloud_init_on_valid_variants(tmp_path):
    variants = [
        lambda c: c.update(manage_etc_hosts=True),
        lambda c: c.update(packages=c["packages"] + [["munge", "0.5.15-2"]]),
        lambda c: c["write_files"][0].update(defer=True),
    ]
    for mutate in variants:
        seed = with_user_data(render("worker"), mutate)
        assert lint_seed(seed).errors == []
        code, output = cloud_init_schema(seed.user_data, tmp_path)
        assert code == 0, output


def test_manager_secret_never_in_messages():
    seed = with_user_data(render("manager"), lambda c: [f.update(encoding="bogus") for f in c["write_files"]
                                                         if f["path"].endswith("admin-password")])
    report = lint_seed(seed)
    assert report.errors
    import base64

    secret = base64.b64encode((FAKE_ADMIN + "\n").encode()).decode()
    assert all(secret not in m and FAKE_ADMIN not in m for m in messages(report.errors))


def test_deprecated_key_is_a_warning():
    seed = with_user_data(render("worker"), lambda c: c.update(apt_update=True))
    report = lint_seed(seed)
    assert report.errors == []
    assert any(m.startswith("user-data: apt_update: deprecated") for m in messages(report.warnings))


def test_unknown_top_level_key_is_a_warning():
    seed = with_user_data(render("worker"), lambda c: c.update(pakages=["x"]))
    report = lint_seed(seed)
    assert messages(report.warnings) == ["user-data: pakages: is not a key cloud-init knows: it will be ignored"]


def test_header_and_yaml():
    seed = render("worker")
    report = lint_seed(dataclasses.replace(seed, user_data=seed.user_data.replace("#cloud-config\n", "", 1)))
    assert "user-data: must start with the line '#cloud-config'" in messages(report.errors)
    report = lint_seed(dataclasses.replace(seed, user_data="#cloud-config\nhostname: [unclosed\n"))
    assert any(m.startswith("user-data: line ") and "is not valid YAML" in m for m in messages(report.errors))
    report = lint_seed(dataclasses.replace(seed, user_data="#cloud-config\n- a\n"))
    assert "user-data: must be a YAML mapping" in messages(report.errors)


def test_meta_data_checks():
    seed = render("worker")
    report = lint_seed(dataclasses.replace(seed, meta_data="local-hostname: red01\n"))
    assert any(m.startswith("meta-data: instance-id: is missing") for m in messages(report.errors))
    report = lint_seed(dataclasses.replace(seed, meta_data="instance-id: other\nlocal-hostname: red01\n"))
    assert "meta-data: instance-id: is 'other' but the seed says 'pibake-00000000-test'" in messages(report.errors)
    report = lint_seed(dataclasses.replace(seed, meta_data=f"instance-id: {seed.instance_id}\nlocal-hostname: x\n"))
    assert "user-data: hostname: 'red01' differs from meta-data local-hostname 'x'" in messages(report.errors)
    report = lint_seed(seed, hostname="red02")
    assert "user-data: hostname: is 'red01', expected 'red02'" in messages(report.errors)


def test_network_config_checks():
    seed = render("worker", "raspios", wifi=True)
    assert lint_seed(seed, family="raspios").errors == []
    report = lint_seed(seed, family="ubuntu")
    assert messages(report.errors) == [
        "network-config: network.renderer: must be networkd for a ubuntu image, not 'NetworkManager'"]
    net = yaml.safe_load(seed.network_config)
    net["network"]["version"] = 1
    net["network"]["ethernets"]["eth0"]["addresses"] = ["10.1.1.11"]
    net["network"]["wifis"]["wlan0"]["access-points"] = {}
    net["network"]["bogus"] = 1
    report = lint_seed(dataclasses.replace(seed, network_config=dump_yaml(net)), family="raspios")
    assert messages(report.errors) == [
        "network-config: network.version: must be 2 (netplan v2), not 1",
        "network-config: network.bogus: is not a netplan v2 key",
        "network-config: network.ethernets.eth0.addresses.0: '10.1.1.11' is not an address with a prefix such "
        "as 10.1.1.11/24",
        "network-config: network.wifis.wlan0.access-points: must name at least one network",
    ]
    # top-level form (no `network:` key) is accepted too, and an unknown renderer without a family is an error
    flat = dump_yaml({"version": 2, "renderer": "eni", "ethernets": {}})
    report = lint_seed(dataclasses.replace(seed, network_config=flat))
    assert messages(report.errors) == ["network-config: renderer: must be one of NetworkManager, networkd, not 'eni'"]


def test_size_limits():
    seed = render("worker")
    big = "#" + "x" * (SIZE_WARN) + "\n"
    report = lint_seed(dataclasses.replace(seed, user_data=seed.user_data + big))
    assert report.errors == [] and any("unusually large" in m for m in messages(report.warnings))
    huge = "#" + "x" * SIZE_MAX + "\n"
    report = lint_seed(dataclasses.replace(seed, user_data=seed.user_data + huge))
    assert any(m.startswith("seed: is ") and "must stay under 1024 KiB" in m for m in messages(report.errors))


def test_no_ssh_key_warns():
    seed = with_user_data(render("worker"), lambda c: c["users"][0].pop("ssh_authorized_keys"))
    assert "user-data: users.0: password locked and no ssh key: nobody can log in (add ssh_keys to cluster.yaml)" \
        in messages(lint_seed(seed).warnings)


def test_without_cloud_init_only_pibake_checks_run(tmp_path):
    report = lint_seed(render("worker"), schema_file=None)
    assert messages(report.warnings) == [f"seed: {NO_SCHEMA_WARNING}"]
    assert report.schema_file is None
    broken = with_user_data(render("worker"), lambda c: c.update(package_update="yes"))
    assert lint_seed(broken, schema_file=None).errors == []  # only cloud-init's schema knows that key's type
    # the same through the environment, in a fresh interpreter
    code = ("from pibake.bake.lint import lint_seed; from tests.bake.seed_fixtures import render; "
            "r = lint_seed(render('worker')); print(r.schema_file, len(r.warnings))")
    env = dict(os.environ, PIBAKE_CLOUD_INIT_SCHEMA=str(tmp_path / "absent.json"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.split() == ["None", "1"], out.stderr


def test_lint_seed_dir(tmp_path):
    seed = render("sensor")
    for name, text in seed.files().items():
        (tmp_path / name).write_text(text)
    assert lint_seed_dir(tmp_path, hostname="red02").errors == []
    (tmp_path / "meta-data").unlink()
    assert any(m.startswith("meta-data") for m in messages(lint_seed_dir(tmp_path).errors))


def test_schema_refs_resolve():
    """The schema's $refs (#/$defs/...) are followed: an error deep inside a referenced definition is found."""
    seed = with_user_data(render("worker"), lambda c: c["users"][0].update(shell=5))
    errors = messages(lint_seed(seed).errors)
    assert any(m.startswith("user-data: users.0: shell: 5 is not of type") for m in errors), errors
    assert lint_mod._known_top_level_keys(lint_mod._load_schema(find_cloud_init_schema())) >= {
        "runcmd", "write_files", "users", "manage_etc_hosts", "bootcmd", "ntp"}
