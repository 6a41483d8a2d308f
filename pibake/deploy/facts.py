"""The facts of a host (pyinfra's model: a command plus a pure parser of its output).

The command starts ``remote/session.py`` with Debian's python3, deploy's one session on the host, which prints
the facts first: os-release, PID 1, hostname, uid, the dpkg state of the packages deploy may install, sha256
of the files it ships, whether the node holds an enrolment credential, whether /opt/pibake has pibake,
whether the cluster user has the manager's ssh key. Reading them changes nothing on the host; the session then
runs the steps deploy sends (``pibake.deploy.runner``)."""

import base64
import functools
import json
import shlex
from importlib import resources

from pibake.deploy.node import CREDENTIAL_FILE, REMOTE_PYTHON, VENV_PIBAKE

_MARK = "@@pibake "
RESULT = _MARK + "result "  # a step's result line in the session's output, after the facts' end marker
END = _MARK + "end"


@functools.lru_cache(maxsize=None)
def remote_program(name):
    """The source of a program deploy runs on a node (``pibake/deploy/remote/NAME``, package data); read
    from disk once per process, not once per host."""
    return resources.files("pibake.deploy").joinpath("remote", name).read_text(encoding="utf-8")


def facts_spec(packages, files, authorize):
    """What the session reports (pure): ``packages`` whose dpkg state, ``files`` whose sha256, ``authorize``
    the files step's entry for the manager's ssh key."""
    return {"packages": list(packages), "files": list(files), "credential": CREDENTIAL_FILE, "venv": VENV_PIBAKE,
            "auth_user": authorize["user"], "auth_line": authorize["line"]}


def session_command(spec):
    """The shell command of a host's session (pure): it prints the facts of ``spec`` (none when None), the end
    marker, then runs the steps it reads on stdin."""
    return f"{REMOTE_PYTHON} -c {shlex.quote(remote_program('session.py'))} {shlex.quote(json.dumps(spec))}"


def step_request(shell, stdin, timeout):
    """One step for the session (pure): a JSON line with the shell text, its stdin (base64) and timeout."""
    return (json.dumps({"shell": shell, "stdin": base64.b64encode(stdin).decode() if stdin else None,
                        "timeout": timeout}) + "\n").encode()


def parse_step_result(line):
    """A session's ``@@pibake result {...}`` line -> (rc, out, err, timedout); ValueError when it is not one."""
    if not line.startswith(RESULT):
        raise ValueError("not a step result")
    result = json.loads(line[len(RESULT):])
    if not isinstance(result, dict):
        raise ValueError("not a step result")
    return result.get("rc"), result.get("out") or "", result.get("err") or "", bool(result.get("timedout"))


def parse_host_facts(text):
    """The facts script's output -> {"os_release": {...}, "pid1": "systemd", "hostname", "uid",
    "packages": {name: status}, "sha256": {path: hex}, "credential": bool}."""
    sections, cur = {}, None
    for line in text.splitlines():
        if line.startswith(_MARK):
            cur = line[len(_MARK):].strip()
            sections[cur] = []
        elif cur is not None:
            sections[cur].append(line)
    if "end" not in sections:
        raise ValueError("the facts script did not finish (no end marker)")
    osr = {}
    for line in sections.get("os-release", []):
        if "=" in line:
            k, v = line.split("=", 1)
            osr[k.strip()] = v.strip().strip('"')
    packages = {}
    for line in sections.get("packages", []):
        parts = line.split()
        if len(parts) >= 2:
            packages[parts[0]] = parts[1]
    sha = {}
    for line in sections.get("sha256", []):
        parts = line.split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sha[parts[1].strip()] = parts[0]
    first = lambda key: (sections.get(key) or [""])[0].strip()  # noqa: E731
    return {
        "os_release": osr,
        "pid1": first("pid1"),
        "systemd": first("pid1") == "systemd",
        "hostname": first("hostname"),
        "uid": first("uid"),
        "packages": packages,
        "sha256": sha,
        "credential": first("credential") == "present",
        "venv": first("venv") == "present",
        "authorized": first("authorized"),  # the manager's key for the cluster user: present, absent, no-user
    }
