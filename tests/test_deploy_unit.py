"""The pure parts of pibake.deploy: host lists, facts parsing, what changes, result folding, the table.
The ssh side is tested on lab hosts in tests/e2e/test_deploy.py."""

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pibake import deploy as d
from pibake.deploy import steps
from pibake.errors import PlanError
from pibake.model import Cluster
from pibake.ssh import SshOptions
from tests.conftest import needs_program, needs_root
from tests.fixtures_plugin import new_cluster

FIXTURES = Path(__file__).parent / "fixtures" / "deploy"
# Recorded from a lab host (Debian 12, packages installed, nothing deployed yet) ...
FACTS_FRESH = (FIXTURES / "facts-lab-bookworm.txt").read_text()
# ... and from a Raspberry Pi OS card before deploy: systemd, slurmd not installed, an old agent.
FACTS_PI = (FIXTURES / "facts-pi-trixie-old-agent.txt").read_text()


@pytest.mark.parametrize("hosts, expected", [
    ("red[01-04]", ["red01", "red02", "red03", "red04"]),
    ("10.1.1.[11-13]", ["10.1.1.11", "10.1.1.12", "10.1.1.13"]),
    ("red03,red[01-02]", ["red03", "red01", "red02"]),  # the order given
    ("red01,red01,red[01-02]", ["red01", "red02"]),  # no duplicates
    (["red01", "10.1.1.[11-12]"], ["red01", "10.1.1.11", "10.1.1.12"]),
    ("pi-a.lab.example", ["pi-a.lab.example"]),
])
def test_parse_hosts(hosts, expected):
    assert d.parse_hosts(hosts) == expected


@pytest.mark.parametrize("hosts, message", [
    ("", "--hosts: no host given"),
    ("red[04-01", "--hosts 'red[04-01'"),
    ("red[a-b]", "--hosts 'red[a-b]'"),
    ("red_01", "not a host name or IP address: red_01"),
    ("-oProxyCommand=x", "not a host name or IP address"),
    ("@@0", "node groups (@...) are not supported"),  # found by the REST API's schemathesis run: was a 500
    ("@pibake:x", "node groups (@...) are not supported"),
])
def test_parse_hosts_errors(hosts, message):
    with pytest.raises(PlanError) as err:
        d.parse_hosts(hosts)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_facts_fresh_host():
    f = d.parse_host_facts(FACTS_FRESH)
    assert f["os_release"]["ID"] == "debian" and f["os_release"]["VERSION_ID"] == "12"
    assert f["pid1"] == "pibake-lab-init" and f["systemd"] is False
    assert f["hostname"] == "w1" and f["uid"] == "0"
    assert f["sha256"] == {} and f["credential"] is False
    assert d.missing_packages("worker", f["packages"]) == []


def test_parse_facts_pi():
    f = d.parse_host_facts(FACTS_PI)
    assert f["systemd"] is True and f["credential"] is True
    assert f["sha256"] == {"/usr/local/lib/pibake/agent.py": "0123456789abcdef" * 4}
    # not-installed and absent packages are both missing, in the role's order
    assert d.missing_packages("worker", f["packages"]) == ["slurmd", "munge", "slurm-client", "python3-psutil"]


def test_parse_facts_cut_short():
    with pytest.raises(ValueError, match="did not finish"):
        d.parse_host_facts(FACTS_FRESH.replace("@@pibake end\n", ""))


def test_files_to_ship_compares_checksums():
    agent, conf = b"print('agent')\n", b"{}\n"
    wanted = {d.AGENT_PATH: (agent, 0o755), d.AGENT_CONFIG: (conf, 0o600)}
    assert d.files_to_ship(wanted, {}) == [d.AGENT_PATH, d.AGENT_CONFIG]
    same = {d.AGENT_PATH: hashlib.sha256(agent).hexdigest(), d.AGENT_CONFIG: hashlib.sha256(conf).hexdigest()}
    assert d.files_to_ship(wanted, same) == []
    assert d.files_to_ship(wanted, {**same, d.AGENT_CONFIG: "0" * 64}) == [d.AGENT_CONFIG]


def test_agent_changes():
    first = {"status": "ready", "enrolment": "new", "changed": ["/etc/hosts", "/etc/munge/munge.key"],
             "services": {"munge": "started", "slurmd": "started"}}
    assert d.agent_changes(first) == ["enrolment new", "/etc/hosts", "/etc/munge/munge.key", "munge started",
                                      "slurmd started"]
    again = {"status": "ready", "enrolment": "credential", "changed": [],
             "services": {"munge": "running", "slurmd": "running"}}
    assert d.agent_changes(again) == []
    restarted = {**again, "services": {"munge": "running", "slurmd": "restarted"}}
    assert d.agent_changes(restarted) == ["slurmd restarted"]


def test_parse_agent_output():
    assert d.parse_agent_output('{\n  "status": "ready"\n}\n') == {"status": "ready"}
    assert d.parse_agent_output("") is None
    assert d.parse_agent_output("Traceback (most recent call last):\n  boom\n") is None
    assert d.parse_agent_output("[1, 2]") is None


@pytest.mark.parametrize("stderr, rc, expected", [
    ("ssh: connect to host 10.1.1.13 port 22: Connection refused\n", 255,
     "ssh: connect to host 10.1.1.13 port 22: Connection refused"),
    ("Warning: Permanently added '10.1.1.11' (ED25519) to the list of known hosts.\n"
     "root@10.1.1.11: Permission denied (publickey).\n", 255, "root@10.1.1.11: Permission denied (publickey)."),
    ("", 255, "ssh exited with 255 without a message"),
    ("", 3, "exited with 3"),
])
def test_ssh_error(stderr, rc, expected):
    assert d.ssh_error(stderr, rc) == expected


def _results():
    return [
        d.HostResult(host="red01", hostname="red01", step="idle", status="changed", duration_s=21.04,
                     changes=["enrolment new", "slurmd started"], slurm_state="idle"),
        d.HostResult(host="10.1.1.12", hostname="red02", step="idle", status="unchanged", duration_s=0.91,
                     slurm_state="idle"),
        d.HostResult(host="red03", step="connect", status="failed", duration_s=10.0,
                     error="ssh: connect to host red03 port 22: Connection timed out"),
    ]


def test_final_status():
    assert d.final_status(d.HostResult(host="a", changes=["x"])) == "changed"
    assert d.final_status(d.HostResult(host="a")) == "unchanged"


def test_table_one_line_per_host():
    text = d.format_table(_results())
    lines = text.splitlines()
    assert lines[0].split() == ["HOST", "HOSTNAME", "STEP", "STATUS", "TIME", "DETAIL"]
    assert lines[1].split()[:5] == ["red01", "red01", "idle", "changed", "21.0s"]
    assert lines[1].endswith("enrolment new, slurmd started")
    assert lines[2].split() == ["10.1.1.12", "red02", "idle", "unchanged", "0.9s", "-"]
    assert lines[3].split()[:5] == ["red03", "-", "connect", "failed", "10.0s"]
    assert lines[3].endswith("ssh: connect to host red03 port 22: Connection timed out")
    assert lines[4] == "3 host(s): 1 changed, 1 unchanged, 1 failed"
    # columns line up: every row's STATUS cell starts where the header's does
    col = lines[0].index("STATUS")
    assert [line[col:].split()[0] for line in lines[:4]] == ["STATUS", "changed", "unchanged", "failed"]


def test_report_json_and_exit_code():
    report = d.DeployReport(hosts=_results(), manager="red00", registry="https://10.1.1.10:8443", parallel=32,
                            started_at="2026-11-25T15:00:00Z", duration_s=21.5)
    assert not report.ok and report.exit_code == 1
    assert [h.host for h in report.failed] == ["red03"]
    data = json.loads(report.to_json())
    assert data["summary"] == {"hosts": 3, "changed": 1, "unchanged": 1, "failed": 1}
    assert data["ok"] is False and data["manager"] == "red00"
    assert [h["status"] for h in data["hosts"]] == ["changed", "unchanged", "failed"]
    assert data["hosts"][2]["error"].endswith("Connection timed out") and data["hosts"][2]["step"] == "connect"
    good = d.DeployReport(hosts=_results()[:2], manager="red00", registry="r", parallel=1, started_at="t",
                          duration_s=1)
    assert good.ok and good.exit_code == 0


def test_agent_config_carries_no_secret_and_is_stable():
    cluster = Cluster(name="c", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
    conf = d.agent_config(cluster, "red01")
    assert "join_token" not in conf and conf["join_token_file"] == d.TOKEN_FILE
    assert conf["registry_url"] == "https://red00:8443" and conf["manager_ip"] == "10.1.1.10"
    assert conf["hostname"] == "red01" and conf["role"] == "worker" and conf["scrub_paths"] == []
    assert d.agent_config(cluster, "red01") == conf  # same input, same bytes shipped: re-runs change nothing


def test_credential_rejected():
    assert d.credential_rejected("the registry rejected this node's credential (HTTP 401: unknown node); the "
                                 "node was probably removed by an admin. Re-enrol it ...")
    assert not d.credential_rejected("enrolment refused by the registry (HTTP 401): join token rejected")
    assert not d.credential_rejected(None)


def test_wanted_files_by_init_system():
    cluster = Cluster(name="c", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
    lab = d.wanted_files(cluster, "red01", "worker", d.parse_host_facts(FACTS_FRESH), b"agent", b"ca")
    assert sorted(lab) == sorted([d.AGENT_PATH, d.AGENT_CONFIG, d.CA_PATH])  # no systemd: no timesyncd
    assert lab[d.AGENT_PATH] == (b"agent", 0o755) and lab[d.CA_PATH] == (b"ca", 0o644)
    assert json.loads(lab[d.AGENT_CONFIG][0])["hostname"] == "red01" and lab[d.AGENT_CONFIG][1] == 0o600
    pi = d.wanted_files(cluster, "red01", "worker", d.parse_host_facts(FACTS_PI), b"agent", b"ca")
    text, mode = pi[d.TIMESYNCD_DROPIN]
    assert mode == 0o644 and "NTP=10.1.1.10\n" in text.decode()
    assert d.AFTER_WRITE[d.TIMESYNCD_DROPIN] == ["systemctl", "try-restart", "systemd-timesyncd"]


@needs_root("the installer gives files to root (runs as root on a node)")
def test_installer_writes_only_what_differs(tmp_path):
    """The script deploy runs on a node (with Debian's python3 when present), on files under tmp_path."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    marker = tmp_path / "restarted"
    conf = tmp_path / "etc" / "conf.d" / "x.conf"  # parent directory missing: created
    agent = tmp_path / "lib" / "agent.py"
    agent.parent.mkdir()
    agent.write_bytes(b"old")
    spec = {"dirs": [[str(tmp_path / "private"), 0o700]], "files": [
        {"path": str(conf), "mode": 0o644, "b64": base64.b64encode(b"[Time]\n").decode(),
         "then": ["touch", str(marker)]},
        {"path": str(agent), "mode": 0o755, "b64": base64.b64encode(b"new").decode()}]}

    def install():
        proc = subprocess.run([python, "-c", d.remote_program("install_files.py")], input=json.dumps(spec), capture_output=True,
                              text=True, timeout=30, check=True)
        return json.loads(proc.stdout)

    assert install() == [str(conf), str(agent)]
    assert conf.read_bytes() == b"[Time]\n" and agent.read_bytes() == b"new" and marker.exists()
    assert (conf.stat().st_mode & 0o7777, agent.stat().st_mode & 0o7777) == (0o644, 0o755)
    assert (tmp_path / "private").stat().st_mode & 0o7777 == 0o700
    assert sorted(p.name for p in agent.parent.iterdir()) == ["agent.py"]  # no temp file left
    marker.unlink()
    inode = agent.stat().st_ino
    assert install() == []  # same content and mode: nothing written, nothing restarted
    assert agent.stat().st_ino == inode and not marker.exists()
    agent.chmod(0o644)
    assert install() == [str(agent)]  # a wrong mode alone is fixed


# --------------------------------------------------------------------------- the manager


@pytest.fixture(scope="module")
def manager_seed(tmp_path_factory):
    """A cluster directory (pibake init), the manager's rendered seed (as burn renders it), a stand-in wheel
    and the ManagerPlan deploy takes from them."""
    from pibake.bake.seed import render_checked
    from pibake.cluster import load_cluster
    from pibake.model import PlannedNode

    tmp = tmp_path_factory.mktemp("manager-plan")
    new_cluster(tmp / "cluster", name="unit")
    cluster = load_cluster(tmp / "cluster")
    wheel = tmp / "pibake-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 not really a wheel")
    plan = d.manager_plan_for(cluster, tmp / "cluster", wheel)
    node = PlannedNode(hostname="red00", ip="10.1.1.10", role="manager")
    ((_n, seed, _r),) = render_checked(cluster, tmp / "cluster", [node], family=cluster.family)
    import yaml

    return {"dir": tmp / "cluster", "cluster": cluster, "plan": plan, "seed": yaml.safe_load(seed.user_data),
            "wheel": wheel}


def test_manager_plan_takes_the_seeds_own_steps(manager_seed):
    from pibake.bake.seed import SCRIPTS, WHEEL_GLOB, agent_source

    plan, seed = manager_seed["plan"], manager_seed["seed"]
    assert plan.packages == seed["packages"] and "slurmctld" in plan.packages and "gunicorn" in plan.packages
    assert plan.bootcmd == seed["bootcmd"]
    # every write_files entry, same bytes and mode; the wheel besides
    assert set(plan.files) == {f["path"] for f in seed["write_files"]} | {plan.wheel}
    assert plan.wheel == "/var/lib/pibake/wheel/pibake-0.1.0-py3-none-any.whl"
    assert plan.files[plan.wheel] == (manager_seed["wheel"].read_bytes(), 0o644)
    sdir = manager_seed["dir"] / "secrets"
    assert plan.files["/var/lib/pibake/cluster/secrets/munge.key"] == ((sdir / "munge.key").read_bytes(), 0o400)
    assert plan.files["/var/lib/pibake/cluster/cluster.yaml"][1] == 0o600
    assert plan.files["/var/lib/pibake/cluster/secrets/ca.crt"][1] == 0o444
    assert not any(p.endswith("ca.key") for p in plan.files)  # the CA key never leaves this machine
    assert plan.files[d.AGENT_PATH] == (agent_source().encode(), 0o755)
    # runcmd: all of it but the boot partition scrub, in order; only pibake-install's argument changed
    runcmd = [line for line in seed["runcmd"] if line[0] != SCRIPTS["scrub"][0]]
    assert len(runcmd) == len(seed["runcmd"]) - 1
    assert plan.setup + [plan.registry, plan.agent] + plan.after == [
        [plan.wheel if a == WHEEL_GLOB else a for a in line] for line in runcmd]
    assert plan.install == [SCRIPTS["install_pibake"][0], plan.wheel] and plan.install in plan.setup
    assert plan.registry[:4] == [SCRIPTS["start"][0], "pibake-registry.service", "--", "/opt/pibake/bin/pibake"]
    assert plan.agent[:3] == [SCRIPTS["start"][0], "pibake-agent.service", "--"]
    # the sensor agent's unit and the switch loops start after the agent, as on a burned card; their unit
    # files come with the seed's write_files
    assert [line[:2] for line in plan.after] == [[SCRIPTS["start"][0], "pibake-sensor.service"],
                                                 [SCRIPTS["start"][0], "pibake-switch-auto.service"],
                                                 [SCRIPTS["start"][0], "pibake-switch-rules.service"]]
    assert plan.files["/etc/systemd/system/pibake-switch-rules.service"][1] == 0o644
    script = d.agent_script(plan.agent, plan.after).splitlines()
    assert [unit for unit in ("pibake-sensor.service", "pibake-switch-auto.service", "pibake-switch-rules.service")
            if any(unit in line and line.startswith("if [ $rc -eq 0 ]") for line in script)] == [
        "pibake-sensor.service", "pibake-switch-auto.service", "pibake-switch-rules.service"]


def test_manager_plan_needs_the_seed_shape():
    text = "#cloud-config\nruncmd:\n  - [/usr/local/lib/pibake/pibake-install, x]\n"
    with pytest.raises(ValueError, match="lacks pibake-install, the registry's start or the agent's start"):
        d.manager_plan(text, "pibake-0.1.0-py3-none-any.whl", b"")
    late = ("#cloud-config\nruncmd:\n  - [/usr/local/lib/pibake/pibake-start, pibake-registry.service]\n"
            "  - [reboot]\n")
    with pytest.raises(ValueError, match="reboot after the registry's start"):
        d.manager_plan(late, "w.whl", b"")
    with pytest.raises(ValueError, match="owner pi:pi"):
        d.manager_plan("#cloud-config\nwrite_files:\n  - {path: /x, owner: 'pi:pi', content: x}\n", "w", b"")


@pytest.mark.parametrize("venv, written, reinstall", [
    (False, [], True),  # a manager without pibake's venv yet
    (True, [], False),  # nothing new: pibake-install is not run again
    (True, ["WHEEL"], True),  # a new pibake wheel
    (True, [f"{d.MANAGER_WHEEL_DIR}/deps/python_kasa-0.12.0-py3-none-any.whl"], True),  # only a dependency's wheel
    (True, ["/etc/pibake/agent.json"], False),
])
def test_the_manager_reinstalls_pibake_when_a_wheel_it_installs_changed(manager_seed, venv, written, reinstall):
    plan = manager_seed["plan"]
    host = types.SimpleNamespace(plan=plan, facts={"venv": venv},
                                 written=[plan.wheel if p == "WHEEL" else p for p in written])
    command = steps.install_command(host, None)
    assert ("pibake-install" in command.shell) is reinstall and bool(command.changes) is reinstall


def test_setup_and_agent_scripts(manager_seed):
    plan = manager_seed["plan"]
    full = d.setup_script(plan, reinstall=True)
    lines = full.splitlines()
    assert lines[:2] == ["set -e", f"export PATH={d.REMOTE_PATH}"]  # stops at the first failing step
    assert "/usr/local/lib/pibake/pibake-hosts-entry 10.1.1.10 red00 >/dev/null" in lines
    assert f"/usr/local/lib/pibake/pibake-install {plan.wheel} >/dev/null" in lines
    assert "scrub" not in full and "registry" not in full
    again = d.setup_script(plan, reinstall=False)
    assert "pibake-install" not in again and "pibake-hosts-entry" in again
    agent = d.agent_script(plan.agent)
    assert "\n/usr/bin/python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json --json\n" in agent
    assert "[ -d /run/systemd/system ]; then /usr/local/lib/pibake/pibake-start pibake-agent.service -- " in agent
    with pytest.raises(ValueError):
        d.agent_script("pibake-start pibake-agent.service")


@needs_program("sh")
def test_setup_script_runs_with_a_shell_and_stops_at_a_failure(tmp_path):
    plan = d.ManagerPlan(packages=[], bootcmd=[], files={}, wheel="w",
                         setup=[["touch", str(tmp_path / "one")], ["false"], ["touch", str(tmp_path / "two")]],
                         install=["false"], registry=[], agent=[])
    assert subprocess.run(["/bin/sh", "-c", d.setup_script(plan, reinstall=True)], timeout=30).returncode != 0
    assert (tmp_path / "one").exists() and not (tmp_path / "two").exists()
    # the install step left out: the rest runs through
    assert subprocess.run(["/bin/sh", "-c", d.setup_script(plan, reinstall=False)], timeout=30).returncode == 0
    assert (tmp_path / "two").exists()


def test_the_manager_config_after_enrolment_counts_as_right(manager_seed):
    from pibake.firstboot.agent import config_without_token

    plan = manager_seed["plan"]
    seed_config = plan.files[d.AGENT_CONFIG][0]
    assert b"join_token" in seed_config  # the manager's seed carries it, as on a burned card
    # what the agent writes after enrolling: the token removed, keys sorted
    scrubbed = (json.dumps(config_without_token(json.loads(seed_config)), indent=2, sort_keys=True) + "\n").encode()
    eq = d.manager_config_equivalents(plan.files)
    remote = {d.AGENT_CONFIG: hashlib.sha256(scrubbed).hexdigest()}
    assert d.AGENT_CONFIG not in d.files_to_ship(plan.files, remote, eq)
    assert d.AGENT_CONFIG in d.files_to_ship(plan.files, remote)  # without the equivalence it would be rewritten
    remote[d.AGENT_CONFIG] = hashlib.sha256(b"{}\n").hexdigest()
    assert d.AGENT_CONFIG in d.files_to_ship(plan.files, remote, eq)  # anything else is rewritten


def test_manager_ssh_target():
    cluster = Cluster(name="c", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
    assert d.manager_ssh_target(cluster, ["red01", "10.1.1.10"]) == "10.1.1.10"  # as given in --hosts
    assert d.manager_ssh_target(cluster, ["red01", "red00"], manager="10.1.1.10") == "red00"
    assert d.manager_ssh_target(cluster, ["red01"], manager="10.1.1.10") == "10.1.1.10"  # --manager
    assert d.manager_ssh_target(cluster, ["red01"]) == "red00"  # cluster.yaml's name


def test_manager_row_and_workers_held_back():
    m = d.HostResult(host="red00", hostname="red00", role="manager", step="connect", status="failed",
                     error="ssh: connect to host 10.1.1.10 port 22: Connection refused")
    assert m.to_dict()["role"] == "manager" and d.HostResult(host="red01").to_dict()["role"] == "worker"
    assert d.manager_not_ready(m) == "manager not ready: red00 failed at connect"
    table = d.format_table([m, d.HostResult(host="red01", status="failed", error=d.manager_not_ready(m))])
    assert table.splitlines()[1].split()[:4] == ["red00", "red00", "connect", "failed"]
    assert table.splitlines()[2].endswith("manager not ready: red00 failed at connect")
    assert set(d.MANAGER_STEPS) - set(d.STEPS) == {"install", "registry", "ready"}


def test_parse_facts_venv():
    assert d.parse_host_facts(FACTS_FRESH)["venv"] is False
    text = FACTS_FRESH.replace("@@pibake end\n", "@@pibake venv\npresent\n@@pibake end\n")
    assert d.parse_host_facts(text)["venv"] is True


@pytest.mark.parametrize("why, down", [
    ("connection refused", True), ("timed out", True), ("cannot connect", True),
    (None, False),  # healthy: left alone
    ("TLS check against the cluster CA failed (SSLError)", False),  # another cluster's registry: never touched
    ("HTTP 500", False),
])
def test_registry_down_decides_whether_the_manager_is_set_up(why, down):
    assert d.registry_down(why) is down


# --------------------------------------------------------------------------- planned names over ssh


def test_split_config_option_takes_out_only_the_config_file():
    assert d.split_config_option(("-F", "/x/cfg", "-oBatchMode=yes")) == ("/x/cfg", ("-oBatchMode=yes",))
    assert d.split_config_option(("-F/x/cfg",)) == ("/x/cfg", ())
    assert d.split_config_option(("-v",)) == (None, ("-v",))


def test_address_config_reads_the_users_config_first(tmp_path):
    text = d.address_config(["red01"], {"red01": "10.1.1.11"}, None, home=str(tmp_path))
    lines = text.splitlines()
    first_host = next(i for i, ln in enumerate(lines) if ln.startswith("Match "))
    assert f'Include "{tmp_path}/.ssh/config"' in lines[:first_host]
    assert 'Include "/etc/ssh/ssh_config"' in lines[:first_host]
    # the block applies only while ssh still goes to the name itself (no HostName from the user)
    assert lines[first_host:] == ["Match originalhost red01 host red01", "    HostName 10.1.1.11",
                                  "    HostKeyAlias red01"]
    assert 'Include' not in d.address_config(["a"], {"a": "10.1.1.2"}, "none")


def test_planned_names_reach_their_address_and_the_users_config_wins(tmp_path):
    """Real `ssh -G` (no connection): a planned name ssh cannot map goes to its planned IP; a name the
    user's config maps keeps the user's HostName; an unplanned name and an IP are left alone."""
    user = tmp_path / "user_config"
    user.write_text("Host red02\n    HostName 10.99.0.2\n    Port 2202\nHost *\n    User pi\n")
    planned = {"red01": "10.1.1.11", "red02": "10.1.1.12", "red00": "10.1.1.10"}
    ssh = d.with_planned_addresses(["red01", "red02", "blue01", "10.1.1.13"], planned,
                                   SshOptions(extra=("-F", str(user), "-oBatchMode=yes")), tmp_path)
    assert ssh.extra == ("-F", str(tmp_path / "ssh_config"), "-oBatchMode=yes")

    def resolved(name):
        out = subprocess.run(ssh.config_argv(name), capture_output=True, text=True, check=True).stdout
        return {ln.split(None, 1)[0]: ln.split(None, 1)[1] for ln in out.splitlines() if " " in ln}

    r1 = resolved("red01")
    assert (r1["hostname"], r1["hostkeyalias"], r1["user"]) == ("10.1.1.11", "red01", "pi")
    r2 = resolved("red02")
    assert (r2["hostname"], r2["port"], r2.get("hostkeyalias")) == ("10.99.0.2", "2202", None)
    assert resolved("blue01")["hostname"] == "blue01"
    # a HostName given on the command line wins too
    by_option = dataclasses.replace(ssh, extra=(*ssh.extra, "-o", "HostName=10.99.0.1"))
    out = subprocess.run(by_option.config_argv("red01"), capture_output=True, text=True, check=True).stdout
    assert "hostname 10.99.0.1" in out.splitlines() and not any(ln.startswith("hostkeyalias") for ln in out.splitlines())
    # nothing to map: the options come back as given, and no file is written
    unchanged = SshOptions(extra=("-v",))
    assert d.with_planned_addresses(["10.1.1.13"], planned, unchanged, tmp_path / "none") is unchanged


# --------------------------------------------------------------------------- the manager's ssh key on a node


def _as_node_with_user(tmp_path, argv, stdin):
    """Run ``argv`` as root in a private mount namespace whose /etc/passwd also has the user ``pibaketest``
    (uid 4242, home under tmp_path): the real getent/pwd lookups, nothing of this machine touched."""
    passwd = tmp_path / "passwd"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    passwd.write_text(open("/etc/passwd").read() + f"pibaketest:x:4242:4242::{home}:/bin/sh\n")
    script = f'mount --bind {passwd} /etc/passwd && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *argv], input=stdin,
                          capture_output=True, text=True, timeout=30, check=True).stdout, home


@needs_root("needs root (a private mount namespace with its own /etc/passwd)")
@needs_program("unshare")
def test_the_manager_key_is_authorized_for_the_cluster_user_once(tmp_path):
    cluster = Cluster(name="red", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24", user="pibaketest")
    blob = base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + b"n" * 32).decode()
    auth = d.manager_key_authorization(cluster, f"ssh-ed25519 {blob} pibake-manager@red")
    assert auth == {"user": "pibaketest", "name": "pibake-manager@red", "blob": blob,
                    "line": f'from="10.1.1.10",restrict ssh-ed25519 {blob} pibake-manager@red'}
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

    def facts():
        script = d.session_command(d.facts_spec(["slurmd"], ["/nonexistent"], auth))
        return d.parse_host_facts(_as_node_with_user(tmp_path, ["sh", "-c", script], "")[0])["authorized"]

    def install():
        spec = {"dirs": [], "files": [], "authorize": auth}
        out, home = _as_node_with_user(tmp_path, [python, "-c", d.remote_program("install_files.py")], json.dumps(spec))
        return json.loads(out), home / ".ssh" / "authorized_keys"

    assert facts() == "absent"  # no ~/.ssh yet
    written, keys = install()
    assert written == [str(keys)] and keys.read_text() == auth["line"] + "\n"
    assert (keys.stat().st_uid, keys.stat().st_mode & 0o777) == (4242, 0o600)
    assert (keys.parent.stat().st_uid, keys.parent.stat().st_mode & 0o777) == (4242, 0o700)
    assert facts() == "present"
    # a person's key stays; an older manager key (rotated: same name, other key) is replaced, not added to
    person = "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x20" + b"p" * 32).decode() + " me@laptop"
    keys.write_text(f"{person}\nfrom=\"10.1.1.10\",restrict ssh-ed25519 AAAAold pibake-manager@red\n")
    assert facts() == "absent"
    install()
    assert keys.read_text() == f"{person}\n{auth['line']}\n"
    assert facts() == "present"
    other = dataclasses.replace(cluster, user="nosuchuser")
    script = d.session_command(d.facts_spec(["x"], ["/nonexistent"], {**auth, "user": other.user}))
    assert d.parse_host_facts(subprocess.run(["sh", "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
                                             text=True, timeout=30).stdout)["authorized"] == "no-user"


def test_deploy_installs_the_sensor_agent_as_the_seed_does():
    """Parity: on a systemd node deploy ships exactly the sensor agent files every role's seed writes (same
    paths, bytes and modes), starts its unit once when the unit is new, and restarts it when they change."""
    from pibake.bake import seed
    from pibake.model import PlannedNode

    cluster = Cluster(name="c", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
    pi = d.wanted_files(cluster, "red01", "worker", d.parse_host_facts(FACTS_PI), b"agent", b"ca")
    from_seed = {f["path"]: (f["content"].encode(), int(f["permissions"], 8))
                 for f in seed.sensor_files(cluster, PlannedNode("red01", "10.1.1.11", "worker"))}
    assert set(from_seed) == set(d.SENSOR_FILES) and {p: pi[p] for p in d.SENSOR_FILES} == from_seed
    assert set(d.SENSOR_FILES) <= set(d.WORKER_FACT_FILES)  # their sha256 is a fact: a re-run ships nothing
    assert "enable --now pibake-sensor.service" in d.AFTER_WRITE[d.SENSOR_UNIT][-1]
    lab = d.wanted_files(cluster, "red01", "worker", d.parse_host_facts(FACTS_FRESH), b"agent", b"ca")
    assert not set(d.SENSOR_FILES) & set(lab)  # no systemd (lab hosts): not installed


def test_role_packages_follow_the_seed_with_mqtt():
    """Parity with the worker seed: with mqtt: on, deploy also makes sure of python3-paho-mqtt."""
    import yaml

    from pibake.model import MqttSettings
    from tests.bake.seed_fixtures import cluster_for, render

    for mqtt in (MqttSettings(), MqttSettings(enabled=True)):
        cluster = cluster_for(mqtt=mqtt)
        seed = yaml.safe_load(render("worker", cluster=cluster).user_data)
        assert sorted(d.role_packages(cluster, "worker")) == sorted(seed["packages"])
