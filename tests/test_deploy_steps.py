"""pibake.deploy's steps without ssh: each step's command from recorded facts, each step's outcome read
from recorded output (tests/fixtures/deploy/), tables of (input, expected). The remote programs run here
too, as python3 runs them on a node. The ssh side: tests/e2e/test_deploy.py."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pibake.deploy import facts, node, steps
from pibake.deploy.results import HostResult
from pibake.model import Cluster

FIXTURES = Path(__file__).parent / "fixtures" / "deploy"
CLUSTER = Cluster(name="red", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
AUTH = {"user": "pi", "line": 'from="10.1.1.10",restrict ssh-ed25519 AAAAkey pibake-manager@red',
        "blob": "AAAAkey", "name": "pibake-manager@red"}
SECRETS = {"agent": b"agent source", "ca": b"ca pem", "token": "join-token-secret", "authorize": AUTH}
INPUTS = steps.Inputs(CLUSTER, SECRETS, None)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def recorded(name):
    return (FIXTURES / name).read_text()


def worker(facts_file=None, **state):
    host = steps.HostState.for_target("red01")
    if facts_file:
        host.facts = facts.parse_host_facts(recorded(facts_file))
        host.result.hostname = host.facts["hostname"]
    for key, value in state.items():
        setattr(host, key, value)
    return host


def stdin_spec(command):
    return json.loads(command.stdin)


# --------------------------------------------------------------------------- commands from facts


@pytest.mark.parametrize("facts_file, expected", [
    ("facts-lab-bookworm.txt", None),  # all four installed: the step is skipped
    ("facts-pi-trixie-old-agent.txt", "slurmd munge slurm-client python3-psutil"),
])
def test_packages_command_installs_only_what_is_missing(facts_file, expected):
    command = steps.packages_command(worker(facts_file), INPUTS)
    if expected is None:
        assert command is None
    else:
        assert f"apt-get install -y -q --no-install-recommends {expected} >/dev/null" in command.shell
        assert "apt-get update" in command.shell and command.timeout == 900


@pytest.mark.parametrize("facts_file, paths, token", [
    # lab host: nothing shipped yet, no systemd, no credential: three files and the join token
    ("facts-lab-bookworm.txt", [node.AGENT_PATH, node.AGENT_CONFIG, node.CA_PATH], True),
    # a Pi: systemd (timesyncd drop-in too), an old agent, a credential: no token
    ("facts-pi-trixie-old-agent.txt", [node.AGENT_PATH, node.AGENT_CONFIG, node.CA_PATH, node.TIMESYNCD_DROPIN,
                                       *node.SENSOR_FILES], False),
])
def test_files_command_ships_what_differs_and_the_token_only_without_credential(facts_file, paths, token):
    command = steps.files_command(worker(facts_file), INPUTS)
    spec = stdin_spec(command)
    shipped = [f["path"] for f in spec["files"]]
    assert shipped == paths + ([node.TOKEN_FILE] if token else [])
    assert command.sends_token is token
    assert "join-token-secret" not in command.shell  # secrets on stdin only
    assert spec["dirs"] == [list(d) for d in node.NODE_DIRS] and "authorize" not in spec  # no authorized section recorded


def test_files_command_is_skipped_when_the_node_has_everything():
    host = worker("facts-pi-trixie-old-agent.txt")
    wanted = steps.host_wanted_files(host, INPUTS)
    host.facts["sha256"] = {p: hashlib.sha256(data).hexdigest() for p, (data, _m) in wanted.items()}
    host.facts["authorized"] = "present"
    assert steps.files_command(host, INPUTS) is None
    host.force_ship = {node.AGENT_CONFIG}
    assert [f["path"] for f in stdin_spec(steps.files_command(host, INPUTS))["files"]] == [node.AGENT_CONFIG]
    host.force_ship = set()
    host.facts["authorized"] = "absent"
    assert stdin_spec(steps.files_command(host, INPUTS))["authorize"] == AUTH


def test_a_worker_goes_connect_files_agent_and_waits_for_idle():
    """The whole worker sequence from recorded outputs, as the runner drives it (each step's outcome is its
    result in the host's one session)."""
    host = steps.HostState.for_target("red01")
    seen = []

    def run(step, outcome):
        command = steps.next_command(host, step, INPUTS)
        steps.started(host, command)
        seen.append((command.step, command.ships_files))
        return steps.step_done(host, outcome, INPUTS)

    connect = steps.next_command(host, "connect", INPUTS)
    assert connect.shell == "" and connect.facts["files"] == list(node.WORKER_FACT_FILES)
    following = run("connect", steps.Outcome(0, recorded("facts-lab-bookworm.txt")))
    assert following == "packages"
    command = steps.next_command(host, following, INPUTS)  # packages skipped: all installed
    assert command.step == "files" and command.stdin and command.timeout == 300
    assert command.shell.startswith("/usr/bin/python3 -c ")
    written = [node.AGENT_PATH, node.AGENT_CONFIG, node.CA_PATH, node.TOKEN_FILE]
    assert run(following, steps.Outcome(0, json.dumps(written))) == "agent"
    assert host.token_sent and host.written == written
    assert run("agent", steps.Outcome(0, recorded("agent-ready-new.json"))) == steps.WAIT_IDLE
    assert steps.next_command(host, "agent", INPUTS).shell == \
        f"/usr/bin/python3 {node.AGENT_PATH} --config {node.AGENT_CONFIG} --json"
    assert seen == [("connect", False), ("files", True), ("agent", False)]
    assert host.result.hostname == "red01"
    assert host.result.changes == [node.AGENT_PATH, node.AGENT_CONFIG, node.CA_PATH, "enrolment new", "/etc/hosts",
                                   "/etc/munge/munge.key", "/etc/default/slurmd", "munge started", "slurmd started"]


def test_with_nothing_to_ship_the_agent_comes_next():
    host = worker("facts-pi-trixie-old-agent.txt")
    wanted = steps.host_wanted_files(host, INPUTS)
    host.facts["sha256"] = {p: hashlib.sha256(data).hexdigest() for p, (data, _m) in wanted.items()}
    host.facts["authorized"] = "present"
    command = steps.next_command(host, "files", INPUTS)
    assert (command.step, command.ships_files, command.stdin) == ("agent", False, None)
    assert command == steps.agent_command(host, INPUTS)


# --------------------------------------------------------------------------- outcomes


@pytest.mark.parametrize("step, outcome, error", [
    ("connect", steps.Outcome(None, timedout=True), "ssh: no answer in time (connection timed out)"),
    ("connect", steps.Outcome(255, err="ssh: connect to host 10.1.1.11 port 22: Connection refused\n"),
     "ssh: connect to host 10.1.1.11 port 22: Connection refused"),
    ("connect", steps.Outcome(0, "@@pibake os-release\n"),
     "facts: the facts script did not finish (no end marker): exited with 0"),
    ("packages", steps.Outcome(100, err="E: Unable to locate package slurmd\n"),
     "packages: apt-get exited with 100: E: Unable to locate package slurmd"),
    ("packages", steps.Outcome(None, timedout=True), "packages: did not finish in time on the node"),
    ("files", steps.Outcome(1, err="PermissionError: [Errno 13] Permission denied: '/etc/pibake'\n"),
     "files: PermissionError: [Errno 13] Permission denied: '/etc/pibake'"),
    ("files", steps.Outcome(0, "Traceback"), "files: unexpected answer from the node: exited with 0"),
    ("agent", steps.Outcome(1, "", "python3: can't open file\n"), "agent: exited with 1: python3: can't open file"),
    ("agent", steps.Outcome(1, '{"status": "error", "message": "join token expired"}'), "agent: join token expired"),
])
def test_a_failed_step_gives_one_line(step, outcome, error):
    host = worker("facts-lab-bookworm.txt", step=step)
    with pytest.raises(steps.StepFailed) as exc:
        steps.step_done(host, outcome, INPUTS)
    assert str(exc.value) == error


@pytest.mark.parametrize("role, uid, hostname, user, problem", [
    ("worker", "0", "red01", None, None),
    ("worker", "1000", "red01", None, "facts: logged in as uid 1000, not root"),
    ("worker", "1000", "red01", "pi", None),  # sudo -n runs the commands
    ("worker", "0", "red00", None, "facts: this machine is the cluster's manager (red00)"),
    ("manager", "0", "raspberrypi", None, "facts: this machine is named raspberrypi, but cluster.yaml's manager"),
    ("manager", "0", "red00", None, None),
])
def test_facts_that_rule_a_host_out(role, uid, hostname, user, problem):
    found = steps.facts_problem({"uid": uid, "hostname": hostname}, role, CLUSTER, user)
    assert found == problem if problem is None else found.startswith(problem)


def test_a_rejected_credential_sends_the_token_once():
    host = worker("facts-pi-trixie-old-agent.txt", step="agent")
    assert host.facts["credential"]
    rejected = steps.Outcome(1, recorded("agent-credential-rejected.json"))
    assert steps.step_done(host, rejected, INPUTS) == "files"
    command = steps.next_command(host, "files", INPUTS)
    assert command.sends_token and node.TOKEN_FILE in [f["path"] for f in stdin_spec(command)["files"]]
    steps.started(host, command)
    assert host.step == "files" and host.token_sent
    assert steps.step_done(host, steps.Outcome(0, json.dumps([node.TOKEN_FILE])), INPUTS) == "agent"
    steps.started(host, steps.next_command(host, "agent", INPUTS))
    with pytest.raises(steps.StepFailed, match="rejected this node's credential"):
        steps.step_done(host, rejected, INPUTS)


def test_an_agent_that_changed_nothing():
    host = worker("facts-lab-bookworm.txt", step="agent")
    assert steps.step_done(host, steps.Outcome(0, recorded("agent-ready-unchanged.json")), INPUTS) == "idle"
    assert host.result.changes == []


def test_a_non_root_login_runs_through_sudo():
    assert steps.remote("id -u", None) == "id -u" and steps.remote("id -u", "root") == "id -u"
    assert steps.remote("echo 'a b'", "pi") == "sudo -n sh -c 'echo '\"'\"'a b'\"'\"''"


# --------------------------------------------------------------------------- the remote programs


def test_the_remote_programs_are_package_data_and_stdlib_only():
    for name in ("session.py", "install_files.py"):
        source = facts.remote_program(name)
        proc = subprocess.run([PYTHON, "-I", "-c", "import ast, json, sys; tree = ast.parse(sys.stdin.read()); "
                               "print(json.dumps(sorted({a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import)"
                               " for a in n.names} | {n.module.split('.')[0] for n in ast.walk(tree) "
                               "if isinstance(n, ast.ImportFrom)})))"], input=source, capture_output=True, text=True,
                              check=True)
        assert set(json.loads(proc.stdout)) <= set(sys.stdlib_module_names), name
    assert facts._MARK == "@@pibake "
    assert 'MARK = "@@pibake "' in facts.remote_program("session.py")  # the parser's marker


def test_the_session_reports_the_facts_of_this_machine(tmp_path):
    credential = tmp_path / "credential"
    credential.write_text("secret\n")
    shipped = tmp_path / "agent.py"
    shipped.write_bytes(b"print('agent')\n")
    spec = {"packages": ["dpkg", "no-such-package-pibake"], "files": [str(shipped), str(tmp_path / "absent")],
            "credential": str(credential), "venv": str(tmp_path / "no-venv"), "auth_user": "no-such-user-pibake",
            "auth_line": "x"}
    out = subprocess.run(["sh", "-c", facts.session_command(spec).replace("/usr/bin/python3", PYTHON, 1)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.endswith("@@pibake end\n")  # stdin ended: no step, the session exits 0
    got = facts.parse_host_facts(out)
    assert got["hostname"] == socket.gethostname() and got["uid"] == str(os.geteuid())
    assert got["sha256"] == {str(shipped): hashlib.sha256(b"print('agent')\n").hexdigest()}
    assert got["credential"] is True and got["venv"] is False and got["authorized"] == "no-user"
    if Path("/usr/bin/dpkg-query").exists():  # Debian: the one package manager deploy supports
        assert got["packages"] == {"dpkg": "installed"}
    assert got["os_release"].get("ID") == dict(
        line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)["ID"].strip('"')


def test_host_result_rows_start_pending():
    assert steps.HostState.for_target("red02").result == HostResult(host="red02")


def test_the_session_runs_each_step_it_is_sent_and_answers_with_a_result_line(tmp_path):
    """Steps after the facts: stdin (a secret, base64 in the request) reaches the step, a failing step
    gives its exit code and stderr, and a step past its timeout is killed with its whole process group (the
    grandchild too, as apt-get's children would be)."""
    pidfile = tmp_path / "grandchild.pid"
    requests = [facts.step_request("cat; echo; echo to-err >&2", b"join-token-secret", 30),
                facts.step_request("echo out; exit 3", None, 30),
                facts.step_request(f"sleep 60 & echo $! > {pidfile}; wait", None, 1)]
    proc = subprocess.run(["sh", "-c", facts.session_command(None).replace("/usr/bin/python3", PYTHON, 1)],
                          input=b"".join(requests), capture_output=True, timeout=60, check=True)
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == facts.END and len(lines) == 4  # no facts asked for: the end marker, then one line a step
    results = [facts.parse_step_result(line) for line in lines[1:]]
    assert results[0] == (0, "join-token-secret\n", "to-err\n", False)
    assert results[1] == (3, "out\n", "", False)
    assert results[2][0] is None and results[2][3] is True
    grandchild = int(pidfile.read_text())
    assert not Path(f"/proc/{grandchild}").exists() or \
        Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("line", ["@@pibake end", "@@pibake result [1]", "@@pibake result {", "ok"])
def test_a_line_that_is_not_a_step_result_is_refused(line):
    with pytest.raises(ValueError):
        facts.parse_step_result(line)
