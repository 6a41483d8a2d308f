"""The agent against the real registry app (pibake.registry, real SQLite store) served over TLS on
127.0.0.1 with the cluster's own certificate. Services are not started here ("services": "none");
the lab e2e tests (tests/e2e) run munge and slurmd for real."""

import datetime as dt
import json
import os
import stat
import threading

import pytest
import requests
from werkzeug.serving import make_server

from pibake import secrets
from pibake.firstboot import agent
from tests.conftest import needs_root
from tests.firstboot.conftest import write_agent_config

pytest.importorskip("pibake.registry.app")


def _serve(cluster, tmp_path, **options):
    from pibake.registry.app import create_app

    app = create_app(cluster, slurm_conf=str(tmp_path / "slurm.conf"), slurm_apply="none", slurm_state=False,
                     **options)
    sdir = secrets.secrets_dir(cluster)
    server = make_server("127.0.0.1", 0, app, threaded=True,
                         ssl_context=(str(sdir / "registry.crt"), str(sdir / "registry.key")))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


@pytest.fixture
def registry_url(cluster, tmp_path):
    server = _serve(cluster, tmp_path)
    yield f"https://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def approval_registry_url(cluster, tmp_path):
    server = _serve(cluster, tmp_path, require_approval=True)
    yield f"https://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def admin(cluster, registry_url, method, path):
    return requests.request(method, f"{registry_url}/api/v1{path}", auth=("admin", secrets.admin_password(cluster)),
                            verify=str(secrets.secrets_dir(cluster) / "ca.crt"), timeout=10)


@pytest.fixture
def node(tmp_path, cluster, registry_url):
    token = secrets.load_join_token(cluster).token
    nd = tmp_path / "node"
    cfg = write_agent_config(nd, registry_url, secrets.secrets_dir(cluster) / "ca.crt", token)
    (nd / "boot" / "user-data").write_text(
        "#cloud-config\nwrite_files:\n  - path: /etc/pibake/agent.json\n    content: |\n"
        f"      {{\"join_token\": \"{token}\"}}\n")
    (nd / "hosts").write_text("127.0.0.1 localhost\n")
    return nd, cfg, token


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@needs_root("needs root (the munge key is chowned to munge)")
def test_enrol_then_every_later_boot_uses_the_credential(node, cluster, registry_url):
    nd, cfg, token = node
    result = agent.run_agent(str(cfg))
    assert result["status"] == "ready" and result["enrolment"] == "new"
    hostname = result["hostname"]

    # the credential is stored 0600; the token is gone from the config and the boot partition
    assert mode(nd / "node-credential") == 0o600 and len((nd / "node-credential").read_text().strip()) >= 20
    config = json.loads(cfg.read_text())
    assert "join_token" not in config and config["registry_url"] == registry_url and mode(cfg) == 0o600
    user_data = (nd / "boot" / "user-data").read_text()
    assert token not in user_data and "pibake-join-token-removed" in user_data
    assert set(result["token_removed_from"]) == {str(cfg), str(nd / "boot" / "user-data")}

    # munge key from the registry, 0400 munge; slurmd configless; the manager resolves
    key = nd / "munge.key"
    assert key.read_bytes() == secrets.munge_key(cluster) and mode(key) == 0o400
    import pwd
    assert os.stat(key).st_uid == pwd.getpwnam("munge").pw_uid
    assert (nd / "default-slurmd").read_text() == 'SLURMD_OPTIONS="--conf-server localhost:6817"\n'
    assert (nd / "hosts").read_text() == "127.0.0.1 localhost\n"  # already mapped: left alone
    state = json.loads((nd / "agent-state.json").read_text())
    assert state["conf_server"] == "localhost:6817" and mode(nd / "agent-state.json") == 0o600
    assert (nd / "node-credential").read_text().strip() not in json.dumps(state)

    # the registry has the node, ready, with its facts
    rec = admin(cluster, registry_url, "GET", f"/nodes/{hostname}").json()
    assert rec["status"] == "ready" and rec["cpus"] == result_cpus() and rec["mac"]

    # second boot: credential, nothing rewritten
    again = agent.run_agent(str(cfg))
    assert again["enrolment"] == "credential" and again["changed"] == [] and again["status"] == "ready"
    assert admin(cluster, registry_url, "GET", "/nodes").json().__len__() == 1


def result_cpus():
    return agent.fact_cpus()


@needs_root()
def test_removed_node_is_refused_and_told_why(node, cluster, registry_url):
    nd, cfg, _token = node
    hostname = agent.run_agent(str(cfg))["hostname"]
    assert admin(cluster, registry_url, "DELETE", f"/nodes/{hostname}").status_code == 200
    with pytest.raises(agent.AgentError, match=r"rejected this node's credential \(HTTP 401.*removed by an admin"):
        agent.run_agent(str(cfg))


@needs_root()
def test_rejected_credential_with_a_token_still_present_re_enrols(node, cluster, registry_url):
    nd, cfg, token = node
    hostname = agent.run_agent(str(cfg))["hostname"]
    admin(cluster, registry_url, "DELETE", f"/nodes/{hostname}")
    config = json.loads(cfg.read_text())
    config["join_token"] = token  # e.g. `pibake deploy` wrote a fresh config
    cfg.write_text(json.dumps(config))
    result = agent.run_agent(str(cfg))
    assert result["enrolment"] == "new" and result["status"] == "ready"
    assert "join_token" not in json.loads(cfg.read_text())


def test_wrong_token_is_refused_with_the_registry_message(tmp_path, cluster, registry_url):
    real = secrets.load_join_token(cluster).token
    wrong = real[:-32] + "0" * 32  # same CA pin, wrong secret
    cfg = write_agent_config(tmp_path / "n2", registry_url, secrets.secrets_dir(cluster) / "ca.crt", wrong)
    with pytest.raises(agent.Refused, match=r"enrolment refused by the registry \(HTTP 401\): join token") as err:
        agent.run_agent(str(cfg))
    assert "0" * 32 not in str(err.value)
    assert json.loads(cfg.read_text())["join_token"] == wrong  # nothing removed after a refusal
    assert not (tmp_path / "n2" / "node-credential").exists()


def test_expired_token_is_refused(tmp_path, cluster, registry_url):
    old = secrets.rotate_join_token(cluster, ttl=dt.timedelta(seconds=-1))
    cfg = write_agent_config(tmp_path / "n3", registry_url, secrets.secrets_dir(cluster) / "ca.crt", old.token)
    with pytest.raises(agent.Refused, match="HTTP 401") as err:
        agent.run_agent(str(cfg))
    assert "expired" in str(err.value)


def test_no_token_no_credential(tmp_path, cluster, registry_url):
    cfg = write_agent_config(tmp_path / "n4", registry_url, secrets.secrets_dir(cluster) / "ca.crt", None)
    with pytest.raises(agent.AgentError, match="nothing to authenticate with"):
        agent.run_agent(str(cfg))



def pibake(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pibake", *args], capture_output=True, text=True, timeout=120,
                          check=False)


@needs_root()
def test_pibake_agent_run_cli(node, cluster, registry_url):
    nd, cfg, _token = node
    proc = pibake("agent", "run", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ready" and result["enrolment"] == "new"
    assert "enrolled as" in proc.stderr and "join token removed from" in proc.stderr
    secret = (nd / "node-credential").read_text().strip()
    assert secret not in proc.stderr + proc.stdout  # never logged
    assert admin(cluster, registry_url, "DELETE", f"/nodes/{result['hostname']}").status_code == 200
    proc = pibake("agent", "run", "--config", str(cfg), "--once")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "pibake: error: the registry rejected this node's credential (HTTP 401")


def test_pibake_agent_run_cli_pin_mismatch(tmp_path, cluster, cluster_b, registry_url):
    cfg = write_agent_config(tmp_path / "n5", registry_url, secrets.secrets_dir(cluster_b) / "ca.crt",
                             secrets.load_join_token(cluster).token)
    proc = pibake("agent", "run", "--config", str(cfg), "--json")
    assert proc.returncode == 1
    assert "pibake: error: CA pin mismatch" in proc.stderr
    assert json.loads(proc.stdout)["status"] == "error"


@needs_root()
def test_pending_node_waits_for_approval(tmp_path, cluster, approval_registry_url):
    """Approval mode: the node enrols as pending, keeps its credential, and finishes once accepted."""
    url = approval_registry_url
    cfg = write_agent_config(tmp_path / "n6", url, secrets.secrets_dir(cluster) / "ca.crt",
                             secrets.load_join_token(cluster).token)
    with pytest.raises(agent.RegistryUnreachable, match="still pending approval") as err:
        agent.run_agent(str(cfg))
    assert err.value.exit_code == agent.EXIT_TEMPFAIL
    assert (tmp_path / "n6" / "node-credential").exists()
    assert "join_token" not in json.loads(cfg.read_text())  # enrolled: the token did its job
    hostname = agent.fact_hostname()
    assert admin(cluster, url, "GET", f"/nodes/{hostname}").json()["status"] == "pending"
    assert admin(cluster, url, "POST", f"/nodes/{hostname}/accept").status_code == 200
    result = agent.run_agent(str(cfg))  # next boot (or the retry loop) after the admin accepted
    assert result["status"] == "ready" and result["enrolment"] == "credential"
    assert json.loads((tmp_path / "n6" / "agent-state.json").read_text())["status"] == "enrolled"


FAKE_SYSTEMCTL = """#!/bin/sh
# a stand-in for systemctl (systemd is not PID 1 here): logs its arguments, keeps unit state in files
echo "$*${SYSTEMCTL_SKIP_SYSV:+ (SYSTEMCTL_SKIP_SYSV=$SYSTEMCTL_SKIP_SYSV)}" >> "$FAKE_SYSTEMD/calls"
for unit; do :; done  # the last argument
case "$1" in
  is-enabled) test -e "$FAKE_SYSTEMD/enabled-$3" ;;
  is-active) test -e "$FAKE_SYSTEMD/active-$3" ;;
  enable) touch "$FAKE_SYSTEMD/enabled-$unit" ;;
  start|restart) touch "$FAKE_SYSTEMD/active-$2" ;;
  daemon-reload) true ;;
  *) exit 1 ;;
esac
"""
# ... and for scontrol: slurmctld lists the node as registered by a slurmd started just now
FAKE_SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$FAKE_SYSTEMD/calls"
echo "NodeName=$3 Arch=x86_64 State=IDLE SlurmdStartTime=$(date +%Y-%m-%dT%H:%M:%S) Reason=(null)"
"""


@needs_root()
def test_systemd_units_and_configless_dropin(node, tmp_path, monkeypatch):
    """Under systemd: enable (symlinks only: no reload, no SysV sync) + start munge and slurmd, a drop-in lifting the packaged unit's
    ConditionPathExists=/etc/slurm/slurm.conf (configless), and no restart when nothing changed."""
    nd, cfg, _token = node
    fake = tmp_path / "fake-systemd"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "systemctl").write_text(FAKE_SYSTEMCTL)
    (fake / "bin" / "systemctl").chmod(0o755)
    (fake / "bin" / "scontrol").write_text(FAKE_SCONTROL)
    (fake / "bin" / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMD", str(fake))
    config = json.loads(cfg.read_text())
    config["services"] = "systemd"
    cfg.write_text(json.dumps(config))

    result = agent.run_agent(str(cfg))
    assert result["services"] == {"munge": "started", "slurmd": "started"}
    dropin = nd / "slurmd.service.d" / "pibake-configless.conf"
    assert "ConditionPathExists=\n" in dropin.read_text() and "Restart=on-failure" in dropin.read_text()
    calls = (fake / "calls").read_text().splitlines()
    assert calls == ["daemon-reload",
                     "is-enabled --quiet munge", "enable --no-reload munge (SYSTEMCTL_SKIP_SYSV=1)", "is-active --quiet munge", "start munge",
                     "is-active --quiet munge",
                     "is-enabled --quiet slurmd", "enable --no-reload slurmd (SYSTEMCTL_SKIP_SYSV=1)", "is-active --quiet slurmd", "start slurmd",
                     "is-active --quiet slurmd",
                     # ready only once slurmctld lists the node as registered by the slurmd just started
                     "is-active --quiet slurmd", "scontrol show node vm -o"]

    (fake / "calls").unlink()
    again = agent.run_agent(str(cfg))
    assert again["services"] == {"munge": "running", "slurmd": "running"} and again["changed"] == []
    assert "restart" not in (fake / "calls").read_text() and "start" not in (fake / "calls").read_text()


@needs_root()
def test_a_token_put_back_next_to_a_working_credential_is_removed(node, cluster, registry_url):
    nd, cfg, token = node
    agent.run_agent(str(cfg))
    config = json.loads(cfg.read_text())
    config["join_token"] = token
    cfg.write_text(json.dumps(config))
    result = agent.run_agent(str(cfg))
    assert result["enrolment"] == "credential" and result["token_removed_from"] == [str(cfg)]
    assert "join_token" not in json.loads(cfg.read_text())


@needs_root()
def test_a_sensor_without_munge_enrols_and_reports_ready(node, cluster, registry_url, monkeypatch):
    """Sensors run no slurmd and their seed installs no munge: the agent enrols and reports ready."""
    nd, cfg, _token = node
    config = json.loads(cfg.read_text())
    config["role"] = "sensor"
    cfg.write_text(json.dumps(config))
    monkeypatch.setattr(agent, "_user_exists", lambda user: False)  # as on a sensor: no munge package
    result = agent.run_agent(str(cfg))
    assert result["status"] == "ready" and result["message"] == "enrolled; munge is not installed on this sensor"
    assert not (nd / "munge.key").exists() and not (nd / "default-slurmd").exists()
    rec = admin(cluster, registry_url, "GET", f"/nodes/{result['hostname']}").json()
    assert rec["role"] == "sensor" and rec["status"] == "ready"
