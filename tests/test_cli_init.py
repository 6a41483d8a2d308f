"""`pibake init` and `pibake token` through the real command line (subprocess) and click's CliRunner."""

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pibake import secrets
from pibake.cli import cli
from pibake.cluster import load_cluster

INIT = ["init", "--manager", "red00", "--manager-ip", "10.1.1.10", "--network", "10.1.1.0/24"]


@pytest.fixture
def env(tmp_path):
    """A HOME with one ssh key, and the cluster directory in PIBAKE_CLUSTER."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    (home / ".ssh" / "id_ed25519.pub").write_text(line + " me@laptop\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("SUDO_USER", "PIBAKE_CLUSTER")}
    environ.update(HOME=str(home), PIBAKE_CLUSTER=str(tmp_path / "cluster"))
    return environ


def pibake(env, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pibake", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=60)


def assert_user_error(out, fragment):
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pibake: error: "), out.stderr
    assert fragment in lines[0], lines[0]


def test_init_creates_the_cluster_and_says_what_next(env, tmp_path):
    out = pibake(env, *INIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert "Created cluster 'red'" in out.stderr
    assert "cluster.yaml   created" in out.stderr
    assert "1 from" in out.stderr and "id_ed25519.pub" in out.stderr
    assert "pibake burn --hostname red00 --ip 10.1.1.10 --role manager" in out.stderr
    assert "pibake burn --hostname 'red[01-04]' --ip '10.1.1.[11-14]'" in out.stderr
    cluster = load_cluster(tmp_path / "cluster")
    assert cluster.ssh_keys[0].endswith("me@laptop")


def test_init_json_and_rerun(env, tmp_path):
    out = pibake(env, *INIT, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["cluster_yaml_status"] == "created" and result["name"] == "red"
    cdir = tmp_path / "cluster"
    for secret in (secrets.load_join_token(cdir).token, secrets.admin_password(cdir), secrets.munge_key_b64(cdir)):
        assert secret not in out.stdout and secret not in out.stderr
    again = pibake(env, *INIT, "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["cluster_yaml_status"] == "unchanged"
    assert set(json.loads(again.stdout)["secrets"].values()) == {"kept"}


def test_init_refuses_different_values_then_force_keeps_a_backup(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    out = pibake(env, *INIT[:-2], "--network", "10.1.0.0/16")
    assert_user_error(out, "network: 10.1.1.0/24 there, 10.1.0.0/16 asked")
    assert "--force" in out.stderr
    out = pibake(env, *INIT[:-2], "--network", "10.1.0.0/16", "--force")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "cluster" / "cluster.yaml.bak").exists()
    assert load_cluster(tmp_path / "cluster").network == "10.1.0.0/16"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--network", "10.1.1.0/33"], "--network: '10.1.1.0/33' is not an IPv4 network"),
        (["--dns", "1.1.1"], "--dns: '1.1.1' is not an IPv4 address"),
        (["--manager", "1234"], "--manager: '1234' is not a valid hostname (RFC 1123 label"),
        (["--timezone", "Mars/Base"], "--timezone: 'Mars/Base' is not a known time zone"),
        (["--manager", "red00\nruncmd: [reboot]"], "--manager: 'red00\\nruncmd: [reboot]' is not a valid hostname"),
        (["--ssh-key", "/nonexistent.pub"], "--ssh-key /nonexistent.pub: no such file"),
        (["--rotate", "everything"], "--rotate: unknown secret everything"),
        (["--wifi-ssid", "HomeNet"], "--wifi-ssid needs --wifi-country"),
        (["--image", "gentoo"], "image: 'gentoo' is not in the catalog"),
    ],
)
def test_init_user_errors_are_one_line(env, tmp_path, extra, fragment):
    args = list(INIT)
    if extra[0] in args:
        i = args.index(extra[0])
        args[i + 1] = extra[1]
        extra = extra[2:]
    out = pibake(env, *args, *extra)
    assert_user_error(out, fragment)
    assert not (tmp_path / "cluster").exists()


def test_missing_required_option_is_a_usage_error(env):
    out = pibake(env, "init", "--manager", "red00")
    assert out.returncode == 2
    assert "Missing option '--manager-ip'" in out.stderr and "Traceback" not in out.stderr


def test_plain_wifi_password_option_is_refused_without_echo(env, tmp_path):
    out = pibake(env, *INIT, "--wifi-country", "DE", "--wifi-ssid", "HomeNet", "--wifi-password", "hunter2hunter2")
    assert out.returncode == 2
    assert "--wifi-password is not accepted" in out.stderr
    assert "hunter2hunter2" not in out.stderr + out.stdout
    assert not (tmp_path / "cluster").exists()


def test_wifi_password_from_stdin_file(env, tmp_path):
    out = pibake(env, *INIT, "--wifi-country", "de", "--wifi-ssid", "IEEE", "--wifi-password-file", "-", "--json",
                 stdin="password\n")
    assert out.returncode == 0, out.stderr
    assert "password" not in json.dumps(json.loads(out.stdout)["wifi"])
    psk = "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    assert psk not in out.stdout + out.stderr
    assert load_cluster(tmp_path / "cluster").wifi.psk == psk


def test_wifi_password_prompt_is_hidden(env, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["--cluster", str(tmp_path / "cluster"), *INIT, "--wifi-country", "DE", "--wifi-ssid", "HomeNet"],
        input="correct horse battery\ncorrect horse battery\n", env={"HOME": env["HOME"]},
    )
    assert result.exit_code == 0, result.output
    assert "Wi-Fi passphrase for HomeNet" in result.output
    assert "correct horse battery" not in result.output
    assert load_cluster(tmp_path / "cluster").wifi.psk == secrets.wpa_psk("HomeNet", "correct horse battery")


def test_rotate_named_and_all(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    munge = (tmp_path / "cluster" / "secrets" / "munge.key").read_bytes()
    ca = (tmp_path / "cluster" / "secrets" / "ca.crt").read_bytes()
    out = pibake(env, *INIT, "--rotate", "munge-key", "--json")
    assert json.loads(out.stdout)["secrets"]["munge-key"] == "rotated"
    assert json.loads(out.stdout)["secrets"]["ca"] == "kept"
    assert (tmp_path / "cluster" / "secrets" / "munge.key").read_bytes() != munge
    assert (tmp_path / "cluster" / "secrets" / "ca.crt").read_bytes() == ca
    out = pibake(env, *INIT, "--rotate", "--json")
    assert set(json.loads(out.stdout)["secrets"].values()) == {"rotated"}
    assert (tmp_path / "cluster" / "secrets" / "ca.crt").read_bytes() != ca


def test_global_cluster_option_wins_over_env(env, tmp_path):
    out = pibake(env, "--cluster", str(tmp_path / "other"), *INIT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "other" / "cluster.yaml").exists()
    assert not (tmp_path / "cluster").exists()


def test_broken_cluster_yaml_through_the_cli(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    (tmp_path / "cluster" / "cluster.yaml").write_text("name: red\nmanager: [red00\n")
    assert_user_error(pibake(env, *INIT), "line 3")


# --------------------------------------------------------------------------- token


def test_token_show(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    token = secrets.load_join_token(tmp_path / "cluster")
    out = pibake(env, "token", "show")
    assert out.returncode == 0
    assert out.stdout == token.token + "\n"
    assert "anyone with this token can enrol a machine into cluster red" in out.stderr
    out = pibake(env, "token", "show", "--json")
    data = json.loads(out.stdout)
    assert data["token"] == token.token and data["expired"] is False
    assert dt.datetime.fromisoformat(data["expires"]) == token.expires


def test_token_rotate(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    old = secrets.load_join_token(tmp_path / "cluster")
    out = pibake(env, "token", "rotate", "--ttl", "12h", "--json")
    assert out.returncode == 0, out.stderr
    new = secrets.load_join_token(tmp_path / "cluster")
    assert new.token != old.token
    assert new.expires - new.created == dt.timedelta(hours=12)
    assert new.token not in out.stdout + out.stderr  # rotate does not print the secret
    assert json.loads(out.stdout)["expires"] == new.expires.isoformat()
    assert not secrets.check_join_token(tmp_path / "cluster", old.token)
    assert secrets.check_join_token(tmp_path / "cluster", new.token)


@pytest.mark.parametrize("ttl", ["0d", "forever", "400d", "-1h", "7x"])
def test_token_rotate_bad_ttl(env, ttl):
    assert pibake(env, *INIT).returncode == 0
    assert_user_error(pibake(env, "token", "rotate", "--ttl", ttl), "--ttl")


def test_token_commands_before_init(env):
    assert_user_error(pibake(env, "token", "show"), "run `pibake init` first")
    assert_user_error(pibake(env, "token", "rotate"), "run `pibake init` first")


def test_help_texts_have_examples(env):
    for args in (["init", "--help"], ["token", "--help"], ["token", "show", "--help"], ["token", "rotate", "--help"]):
        out = pibake(env, *args)
        assert out.returncode == 0
        assert "Example" in out.stdout, args


def test_token_show_warns_when_expired(env, tmp_path):
    assert pibake(env, *INIT).returncode == 0
    secrets.rotate_join_token(tmp_path / "cluster", ttl=dt.timedelta(seconds=-1))
    out = pibake(env, "token", "show", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout)["expired"] is True
    assert "expired" in out.stderr and "pibake token rotate" in out.stderr


def test_docs_init_examples_run(env, tmp_path):
    """Every `$ pibake ...` line of docs/init.md runs, in order, with the documented outcome."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "init.md").read_text()
    lines = [m.group(1) for m in re.finditer(r"^\$ (pibake .*)$", doc, flags=re.M)]
    assert len(lines) >= 8
    work = tmp_path / "work"
    work.mkdir()
    (work / "wifi-pass.txt").write_text("correct horse battery\n")
    environ = {k: v for k, v in env.items() if k != "PIBAKE_CLUSTER"}
    for line in lines:
        expect = 1 if line.rstrip().endswith("# exits 1") else 0
        argv = shlex.split(line.split("#", 1)[0])[1:]
        out = subprocess.run([sys.executable, "-m", "pibake", *argv], capture_output=True, text=True,
                             env=environ, cwd=work, timeout=60)
        assert out.returncode == expect, (line, out.stderr)
        assert "Traceback" not in out.stderr
    assert load_cluster(work / "cluster").manager_ip == "10.1.1.20"
    assert (work / "cluster" / "cluster.yaml.bak").exists()
    home = load_cluster(work / "home")
    assert (home.user, home.dns, home.wifi.country) == ("alice", ("192.168.50.1", "9.9.9.9"), "DE")
    assert load_cluster(work / "ubuntu").family == "ubuntu"
