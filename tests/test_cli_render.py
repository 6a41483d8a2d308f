"""`pibake render`: a real cluster directory (made by `pibake init`), real cloud-init schema, real files."""

import base64
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from pibake.bake.lint import find_cloud_init_schema
from tests.fixtures_plugin import SSH_KEY_COMMENT

PIBAKE = [sys.executable, "-m", "pibake"]


def run(*args, env=None, cwd=None):
    return subprocess.run(PIBAKE + [str(a) for a in args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})), cwd=cwd)


@pytest.fixture(scope="module")
def cluster(make_cluster):
    return make_cluster(timezone="Europe/Berlin")


def secrets_of(cdir):
    sdir = cdir / "secrets"
    token = json.loads((sdir / "join-token.json").read_text())["token"]
    return [token, (sdir / "admin-password").read_text().strip(),
            base64.b64encode((sdir / "munge.key").read_bytes()).decode()[:40]]


def test_render_one_worker(cluster, tmp_path):
    out = run("--cluster", cluster, "render", "--hostname", "red01", "--ip", "10.1.1.11", "--out",
              tmp_path / "seeds", "--json")
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)
    assert {k: result[k] for k in ("hostname", "ip", "role", "warnings")} == {
        "hostname": "red01", "ip": "10.1.1.11", "role": "worker", "warnings": []}
    host_dir = tmp_path / "seeds" / "red01"
    assert stat.S_IMODE(host_dir.stat().st_mode) == 0o700
    assert sorted(result["paths"]) == ["meta-data", "network-config", "user-data"]
    for name, path in result["paths"].items():
        assert path == str(host_dir / name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    meta = yaml.safe_load((host_dir / "meta-data").read_text())
    assert meta == {"instance-id": result["instance_id"], "local-hostname": "red01"}
    assert sorted(p.name for p in host_dir.iterdir()) == ["meta-data", "network-config", "user-data"]  # no temp
    assert "red01 (worker, 10.1.1.11): wrote" in out.stderr
    for secret in secrets_of(cluster):
        assert secret not in out.stdout and secret not in out.stderr
    if shutil.which("cloud-init"):
        check = subprocess.run(["cloud-init", "schema", "--config-file", str(host_dir / "user-data")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((host_dir / "user-data").read_text())
    agent = json.loads({f["path"]: f for f in config["write_files"]}["/etc/pibake/agent.json"]["content"])
    assert agent["join_token"] == secrets_of(cluster)[0]
    assert agent["registry_url"] == "https://red00:8443"
    assert config["users"][0]["ssh_authorized_keys"][0].endswith(f" {SSH_KEY_COMMENT}")


def test_render_hostlist_with_manager(cluster, tmp_path):
    out = run("--cluster", cluster, "render", "--hostname", "red[00-03]", "--ip", "10.1.1.[10-13]", "--out",
              tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [(r["hostname"], r["role"]) for r in results] == [
        ("red00", "manager"), ("red01", "worker"), ("red02", "worker"), ("red03", "worker")]
    assert len({r["instance_id"] for r in results}) == 4
    manager = yaml.safe_load((tmp_path / "red00" / "user-data").read_text())
    files = {f["path"]: f for f in manager["write_files"]}
    munge = base64.b64decode(files["/var/lib/pibake/cluster/secrets/munge.key"]["content"])
    assert munge == (cluster / "secrets" / "munge.key").read_bytes()
    assert "/var/lib/pibake/cluster/secrets/ca.key" not in files
    for secret in secrets_of(cluster):
        assert secret not in out.stdout and secret not in out.stderr
    plan = yaml.safe_load((cluster / "plan.yaml").read_text())["nodes"]
    assert {"hostname": "red03", "ip": "10.1.1.13", "role": "worker"} in plan


def test_render_sensor_role(cluster, tmp_path):
    out = run("--cluster", cluster, "render", "--hostname", "red20", "--ip", "10.1.1.20", "--role", "sensor",
              "--out", tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["role"] == "sensor"
    assert "i2c-tools" in yaml.safe_load((tmp_path / "red20" / "user-data").read_text())["packages"]


def test_yaml_injection_in_hostname_is_one_line_exit_1(cluster, tmp_path):
    out = run("--cluster", cluster, "render", "--hostname", "red01\nruncmd: [reboot]", "--ip", "10.1.1.11",
              "--out", tmp_path / "seeds")
    assert out.returncode == 1
    assert out.stderr.startswith("pibake: error: ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "seeds").exists()


def test_lint_failure_writes_nothing_and_names_host_and_key(cluster, tmp_path):
    """A stricter cloud-init schema (a tweaked copy of the installed one, made here) rejects a key we use."""
    installed = find_cloud_init_schema()
    if installed is None:
        pytest.skip("cloud-init is not installed")
    schema = json.loads(open(installed, encoding="utf-8").read())
    schema["$defs"]["cc_update_etc_hosts"]["properties"]["manage_etc_hosts"] = {"type": "boolean"}
    strict = tmp_path / "strict-schema.json"
    strict.write_text(json.dumps(schema))
    plan_before = (cluster / "plan.yaml").read_text() if (cluster / "plan.yaml").exists() else None
    out = run("--cluster", cluster, "render", "--hostname", "red[05-06]", "--ip", "10.1.1.[15-16]", "--out",
              tmp_path / "seeds", env={"PIBAKE_CLOUD_INIT_SCHEMA": str(strict)})
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1
    assert "nothing written" in out.stderr
    assert "red05: user-data: manage_etc_hosts: 'localhost' is not of type 'boolean'" in out.stderr
    assert "red06: user-data: manage_etc_hosts" in out.stderr
    assert not (tmp_path / "seeds").exists()
    after = (cluster / "plan.yaml").read_text() if (cluster / "plan.yaml").exists() else None
    assert after == plan_before


def test_without_cloud_init_schema_warns_and_writes(cluster, tmp_path):
    out = run("--cluster", cluster, "render", "--hostname", "red07", "--ip", "10.1.1.17", "--out", tmp_path,
              "--json", env={"PIBAKE_CLOUD_INIT_SCHEMA": str(tmp_path / "none.json")})
    assert out.returncode == 0, out.stderr
    (result,) = json.loads(out.stdout)
    assert len(result["warnings"]) == 1 and "only pibake's own checks ran" in result["warnings"][0]
    assert "warning: seed: cloud-init is not installed" in out.stderr
    assert (tmp_path / "red07" / "user-data").exists()


def test_inventory(cluster, tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({
        "red08": {"host": "red08", "ip": "10.1.1.18", "service": "worker", "tag": "ubuntu"},
        "red09": {"host": "red09", "ip": "10.1.1.19", "service": "worker"},
    }))
    out = run("--cluster", cluster, "render", "--inventory", inventory, "--out", tmp_path / "seeds", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["hostname"] for r in json.loads(out.stdout)] == ["red08", "red09"]
    assert (tmp_path / "seeds" / "red09" / "network-config").exists()


def test_rerender_is_a_new_instance_and_overwrites(cluster, tmp_path):
    first = json.loads(run("--cluster", cluster, "render", "--hostname", "red10", "--ip", "10.1.1.30", "--out",
                           tmp_path, "--json").stdout)[0]
    second = json.loads(run("--cluster", cluster, "render", "--hostname", "red10", "--ip", "10.1.1.30", "--out",
                            tmp_path, "--json").stdout)[0]
    assert first["instance_id"] != second["instance_id"]
    meta = yaml.safe_load((tmp_path / "red10" / "meta-data").read_text())
    assert meta["instance-id"] == second["instance_id"]
    plan = yaml.safe_load((cluster / "plan.yaml").read_text())["nodes"]
    assert [n["hostname"] for n in plan].count("red10") == 1
    moved = run("--cluster", cluster, "render", "--hostname", "red10", "--ip", "10.1.1.31", "--out", tmp_path)
    assert moved.returncode == 1 and "already planned with 10.1.1.30" in moved.stderr


@pytest.mark.parametrize("args,message", [
    (["--out", "x"], "--hostname HOSTLIST and --ip IPLIST"),
    (["--hostname", "red01", "--out", "x"], "--ip"),
    (["--hostname", "red[01-02]", "--ip", "10.1.1.11", "--out", "x"], "give exactly one IP per hostname"),
    (["--hostname", "red01", "--ip", "10.9.9.9", "--out", "x"], "10.9.9.9"),
])
def test_bad_plans_are_one_line(cluster, tmp_path, args, message):
    out = run("--cluster", cluster, "render", *args, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_out_is_a_file(cluster, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    out = run("--cluster", cluster, "render", "--hostname", "red01", "--ip", "10.1.1.11", "--out", target)
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_missing_cluster_is_one_line(tmp_path):
    out = run("--cluster", tmp_path / "nope", "render", "--hostname", "red01", "--ip", "10.1.1.11", "--out",
              tmp_path / "seeds")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "pibake init" in out.stderr
