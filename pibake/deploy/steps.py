"""The steps deploy takes on one host, in pyinfra's manner: a step's command is a pure function of the host's
facts and the deploy's inputs (None when the facts say it is not needed), and a step's outcome (exit code,
stdout, stderr) is read by a function that records what changed on the host and names the step that comes
next. Nothing here opens a connection or sleeps: ``runner.py`` executes the commands over ssh, all of a
host's steps in one ssh session. The order:

    connect (facts) -> packages -> files -> [manager: install -> registry -> (deploy waits for /health)] -> agent

A worker then waits for ``idle`` in sinfo (``session.py``), the manager is ``ready``. docs/deploy.md says what
each step does on the host.
"""

import base64
import json
import logging
import shlex
from dataclasses import dataclass, field

from pibake.deploy.facts import facts_spec, parse_host_facts, remote_program
from pibake.deploy.hosts import ssh_error
from pibake.deploy.manager import MANAGER_WHEEL_DIR, agent_script, setup_script, shell_line
from pibake.deploy.node import (
    AFTER_WRITE,
    AGENT_CONFIG,
    AGENT_DEADLINE_S,
    AGENT_PATH,
    NODE_DIRS,
    REMOTE_PATH,
    REMOTE_PYTHON,
    TOKEN_FILE,
    VENV_PIBAKE,
    WORKER_FACT_FILES,
    files_to_ship,
    manager_config_equivalents,
    missing_packages,
    role_packages,
    wanted_files,
)
from pibake.deploy.results import HostResult

LOG = logging.getLogger(__name__)

WAIT_IDLE = "idle"  # a worker whose agent is done: deploy polls the registry until sinfo says idle
WAIT_HEALTH = "health"  # the manager's registry was started: deploy polls /health, then runs its agent
READY = "ready"  # the manager is done


@dataclass(frozen=True)
class Inputs:
    """What the steps of every host share: the cluster, the secrets (``agent`` source bytes, ``ca`` bytes,
    join ``token``, ``authorize``: the manager's ssh key entry) and the ssh login (None: ssh's choice)."""

    cluster: object
    secrets: dict
    user: str | None = None


@dataclass(frozen=True)
class Command:
    """One step on a host: shell text, optional stdin (secrets travel there), a timeout, and what the step
    changes by running at all (e.g. the manager's reinstall). ``facts``: the connect step's facts spec (the
    session starts with them; it has no shell text)."""

    step: str
    shell: str
    stdin: bytes | None = None
    timeout: int = 120
    changes: tuple = ()
    sends_token: bool = False
    ships_files: bool = False  # the files step's installer runs
    facts: dict | None = None


@dataclass(frozen=True)
class Outcome:
    """How a step's session ended: exit code (None: no exit seen), stdout, stderr, whether it timed out."""

    rc: int | None
    out: str = ""
    err: str = ""
    timedout: bool = False


class StepFailed(Exception):
    """A step failed on its host; the message is the host's one-line error (never a secret)."""


@dataclass
class HostState:
    """A host's way through the steps: its result row plus what later steps need from earlier ones."""

    result: HostResult
    plan: object = None  # the ManagerPlan on the manager, None on a worker
    step: str | None = None  # the step whose session runs (or ran last)
    facts: dict | None = None
    written: list = field(default_factory=list)  # what the files step wrote in this run
    token_sent: bool = False
    installed: bool = False  # the manager went through install + registry in this run
    force_ship: set = field(default_factory=set)  # files to send again whatever their checksum
    started: float | None = None
    step_started: float | None = None

    @classmethod
    def for_target(cls, target, role="worker", plan=None):
        return cls(result=HostResult(host=target, role=role), plan=plan)

    @property
    def role(self):
        return self.result.role

    def packages(self, cluster):
        """The manager's seed packages, or the role's (with MQTT, the sensor agent's publisher library too)."""
        return self.plan.packages if self.plan else role_packages(cluster, self.role)

    @property
    def fact_files(self):
        return tuple(self.plan.files) if self.plan else WORKER_FACT_FILES


# --------------------------------------------------------------------------- pure checks


def facts_problem(facts, role, cluster, user):
    """The one-line error when a host's facts rule out deploying onto it, else None (pure)."""
    if user in (None, "root") and facts["uid"] not in ("0", ""):
        return f"facts: logged in as uid {facts['uid']}, not root: give --user root or a user with passwordless sudo"
    if role == "manager" and facts["hostname"] != cluster.manager:
        # slurmctld runs only on the host named SlurmctldHost (cluster.yaml's manager); a seed sets the hostname
        # at first boot, deploy does not rename a running machine
        return (f"facts: this machine is named {facts['hostname'] or '?'}, but cluster.yaml's manager is "
                f"{cluster.manager}: rename it (hostnamectl set-hostname {cluster.manager}) and deploy again")
    if role == "worker" and facts["hostname"] == cluster.manager:
        return (f"facts: this machine is the cluster's manager ({cluster.manager}); "
                f"name it {cluster.manager} or {cluster.manager_ip} in --hosts")
    return None


def parse_agent_output(text):
    """The agent's ``--json`` result (a JSON object on stdout), or None when stdout holds none."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:
        result = json.loads(text[start:])
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def agent_changes(result):
    """What an agent run (its ``--json`` result) changed on the node, as short phrases (pure).

    Empty when the node was already right: authenticated with its stored credential, no file written,
    munge and slurmd already running."""
    changes = []
    if result.get("enrolment") in ("new", "re-enrolled"):
        changes.append(f"enrolment {result['enrolment']}")
    changes += [str(p) for p in result.get("changed") or ()]
    for name, state in sorted((result.get("services") or {}).items()):
        if state not in ("running", "unchanged"):
            changes.append(f"{name} {state}")
    return changes


def credential_rejected(message):
    """True when the agent's error says the registry no longer accepts the node's stored credential."""
    return "rejected this node's credential" in (message or "")


def remote(command, user):
    """``command`` as the login runs it: as is for root, through ``sudo -n`` for another user."""
    return command if user in (None, "root") else f"sudo -n sh -c {shlex.quote(command)}"


# --------------------------------------------------------------------------- each step's command


def connect_command(host, inputs):
    return Command("connect", "", timeout=60,
                   facts=facts_spec(host.packages(inputs.cluster), host.fact_files, inputs.secrets["authorize"]))


def packages_command(host, inputs):
    missing = missing_packages(host.role, host.facts["packages"], host.packages(inputs.cluster))
    if not missing:
        return None
    install = f"apt-get install -y -q --no-install-recommends {' '.join(shlex.quote(p) for p in missing)}"
    return Command("packages", f"export DEBIAN_FRONTEND=noninteractive; {install} >/dev/null || "
                               f"{{ apt-get update -q >/dev/null && {install} >/dev/null; }}", timeout=900)


def host_wanted_files(host, inputs):
    """{path: (bytes, mode)} the host must have: the manager seed's files, or a worker's agent files."""
    if host.plan:
        return host.plan.files
    return wanted_files(inputs.cluster, host.result.hostname or host.result.host, host.role, host.facts,
                        inputs.secrets["agent"], inputs.secrets["ca"])


def files_command(host, inputs):
    wanted = host_wanted_files(host, inputs)
    manager = host.plan is not None
    ship = files_to_ship(wanted, host.facts["sha256"], manager_config_equivalents(wanted) if manager else None)
    ship += sorted(p for p in host.force_ship if p in wanted and p not in ship)
    # a manager's join token is in its seed's agent config (as on a burned card); a worker's has its own file
    need_token = not manager and not host.facts["credential"] and not host.token_sent
    # the manager's ssh key, for its verify/deploy jobs: on every node but the manager (as the seeds do)
    need_auth = not manager and host.facts["authorized"] == "absent"
    if not manager and host.facts["authorized"] == "no-user":
        LOG.warning("deploy: %s has no user %s (cluster.yaml's user): the manager's ssh key is not authorized "
                    "there, so the registry's verify and deploy jobs cannot log in to it", host.result.host,
                    inputs.cluster.user)
    if not ship and not need_token and not need_auth:
        return None
    files = [{"path": p, "mode": wanted[p][1], "b64": base64.b64encode(wanted[p][0]).decode(),
              "then": AFTER_WRITE.get(p)} for p in ship]
    if need_token:
        files.append({"path": TOKEN_FILE, "mode": 0o600,
                      "b64": base64.b64encode(inputs.secrets["token"].encode() + b"\n").decode()})
    spec = {"dirs": NODE_DIRS, "files": files}
    if need_auth:
        spec["authorize"] = inputs.secrets["authorize"]
    command = f"{REMOTE_PYTHON} -c {shlex.quote(remote_program('install_files.py'))}"
    stdin = json.dumps(spec).encode()  # secrets (join token, the manager's bundle) travel here, never on a command line
    if manager:  # the seed's bootcmd first: the registry's cluster directory exists 0700 before its secrets
        command = " && ".join([f"export PATH={REMOTE_PATH}"] + [shell_line(c) for c in host.plan.bootcmd]
                              + [command])
    return Command("files", command, stdin=stdin, timeout=300, sends_token=need_token, ships_files=True)


def install_command(host, inputs):
    # a new pibake wheel, or new wheels of its dependencies (python-kasa for a Kasa manager), or no venv yet
    reinstall = (not host.facts.get("venv")
                 or any(path == host.plan.wheel or path.startswith(f"{MANAGER_WHEEL_DIR}/deps/") for path in host.written))
    changes = (f"pibake installed into {VENV_PIBAKE.rsplit('/bin/', 1)[0]}",) if reinstall else ()
    return Command("install", setup_script(host.plan, reinstall=reinstall), timeout=900, changes=changes)


def registry_command(host, inputs):
    return Command("registry", f"export PATH={REMOTE_PATH}; {shell_line(host.plan.registry)} >/dev/null")


def agent_command(host, inputs):
    if host.plan:
        return Command("agent", agent_script(host.plan.agent, host.plan.after), timeout=AGENT_DEADLINE_S + 60)
    return Command("agent", f"{REMOTE_PYTHON} {AGENT_PATH} --config {AGENT_CONFIG} --json",
                   timeout=AGENT_DEADLINE_S + 60)


def after_files(host):
    """The step after files: the manager's install (once per run), else the agent."""
    return "install" if host.plan and not host.installed else "agent"


def _skip_packages(host):
    return "files"


def _skip_files(host):
    host.written = []
    host.force_ship = set()
    return after_files(host)


COMMANDS = {"connect": connect_command, "packages": packages_command, "files": files_command,
            "install": install_command, "registry": registry_command, "agent": agent_command}
SKIP = {"packages": _skip_packages, "files": _skip_files}  # where a step whose command is None goes


def next_command(host, step, inputs):
    """The Command of ``step``, or of the first step after it that is needed."""
    while True:
        command = COMMANDS[step](host, inputs)
        if command is not None:
            return command
        step = SKIP[step](host)


def started(host, command):
    """Bookkeeping when ``command`` starts on ``host``."""
    host.step = command.step
    host.result.changes += list(command.changes)
    if command.ships_files:
        host.force_ship = set()
        host.token_sent = host.token_sent or command.sends_token


# --------------------------------------------------------------------------- each step's outcome


def connect_done(host, outcome, inputs):
    if outcome.timedout or outcome.rc is None:
        raise StepFailed("ssh: no answer in time (connection timed out)")
    if outcome.rc == 255:
        raise StepFailed(ssh_error(outcome.err, outcome.rc))
    host.result.step = "facts"
    try:
        host.facts = parse_host_facts(outcome.out)
    except ValueError as exc:
        raise StepFailed(f"facts: {exc}: {ssh_error(outcome.err, outcome.rc)}") from None
    host.result.hostname = host.facts["hostname"] or None
    problem = facts_problem(host.facts, host.role, inputs.cluster, inputs.user)
    if problem:
        raise StepFailed(problem)
    return "packages"


def packages_done(host, outcome, inputs):
    if outcome.rc != 0:
        raise StepFailed(f"packages: apt-get exited with {outcome.rc}: {ssh_error(outcome.err, outcome.rc)}")
    host.result.changes += [f"installed {p}" for p in missing_packages(host.role, host.facts["packages"],
                                                                       host.packages(inputs.cluster))]
    return "files"


def files_done(host, outcome, inputs):
    if outcome.rc != 0:
        raise StepFailed(f"files: {ssh_error(outcome.err, outcome.rc)}")
    try:
        written = json.loads(outcome.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise StepFailed(f"files: unexpected answer from the node: {ssh_error(outcome.err, outcome.rc)}") from None
    host.written = written
    host.result.changes += [p for p in written if p != TOKEN_FILE and p not in host.result.changes]
    return after_files(host)


def install_done(host, outcome, inputs):
    if outcome.rc != 0:
        raise StepFailed(f"install: {ssh_error(outcome.err, outcome.rc)}")
    host.installed = True
    return "registry"


def registry_done(host, outcome, inputs):
    if outcome.rc != 0:
        raise StepFailed(f"registry: {ssh_error(outcome.err, outcome.rc)}")
    host.result.changes.append("pibake-registry started")
    return WAIT_HEALTH


def agent_done(host, outcome, inputs):
    result = parse_agent_output(outcome.out)
    if result is None:
        raise StepFailed(f"agent: exited with {outcome.rc}: {ssh_error(outcome.err, outcome.rc)}")
    if result.get("hostname"):
        host.result.hostname = result["hostname"]
    if outcome.rc != 0 or result.get("status") != "ready":
        message = result.get("message") or ssh_error(outcome.err, outcome.rc)
        if credential_rejected(message) and not host.token_sent:
            # removed in the registry (or a re-installed registry): enrol again with the join token
            LOG.info("deploy: %s: stored credential rejected; re-enrolling with the join token", host.result.host)
            host.facts["credential"] = False
            if host.plan:  # the manager's token is in its seed's agent config: send that again
                host.token_sent = True
                host.force_ship.add(AGENT_CONFIG)
            return "files"
        raise StepFailed(f"agent: {message}")
    host.result.changes += agent_changes(result)
    return READY if host.role == "manager" else WAIT_IDLE


DONE = {"connect": connect_done, "packages": packages_done, "files": files_done, "install": install_done,
        "registry": registry_done, "agent": agent_done}


def step_done(host, outcome, inputs):
    """Read the outcome of the host's running step: the next step (a key of COMMANDS) or a wait state
    (WAIT_IDLE, WAIT_HEALTH, READY); raises StepFailed with the host's error."""
    if host.step != "connect" and (outcome.timedout or outcome.rc is None):
        raise StepFailed(f"{host.step}: did not finish in time on the node")
    return DONE[host.step](host, outcome, inputs)
