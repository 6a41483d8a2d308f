"""Runs on a node (``python3 -c``, standard library only): deploy's one ssh session there. It prints the
node's facts, then runs the step commands deploy sends on stdin, one at a time, until stdin ends.

Argument: one JSON object {"packages": [...], "files": [...], "credential": path, "venv": path,
"auth_user": name, "auth_line": line}, or ``null`` (no facts: a later session of a host deploy knows).
Facts: sections, each after a ``@@pibake NAME`` line, parsed by ``pibake.deploy.facts.parse_host_facts``;
reading them changes nothing, and a fact that cannot be read is left empty. ``@@pibake end`` follows.

Then each line on stdin is one step: {"shell": text, "stdin": base64 or null, "timeout": seconds}. The text
runs under ``/bin/sh -c`` with the given stdin (secrets travel there, never on a command line), in its own
process group, killed whole at the timeout. Its answer is one line, ``@@pibake result {"rc", "out", "err",
"timedout"}``. One session per host instead of one per step: each ssh session costs the deploying machine a
process, and a connection or a channel (bench/deploy --ssh-costs).
"""

import base64
import hashlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys

MARK = "@@pibake "


def section(name, lines=()):
    print(MARK + name)
    for line in lines:
        print(line)


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def package_states(packages):
    """``name status`` per package dpkg knows (dpkg-query prints nothing for one it has never seen)."""
    if not packages:
        return []
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *packages],
                              capture_output=True, text=True, check=False)
    except OSError:
        return []
    return proc.stdout.splitlines()


def checksums(paths):
    out = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                out.append("%s  %s" % (hashlib.sha256(fh.read()).hexdigest(), path))
        except OSError:
            continue
    return out


def authorized(user, line):
    """present / absent: whether ``line`` is a whole line of the user's authorized_keys; no-user."""
    try:
        home = pwd.getpwnam(user).pw_dir
    except KeyError:
        return "no-user"
    if not home:
        return "no-user"
    keys = read_lines(os.path.join(home, ".ssh", "authorized_keys"))
    return "present" if line in keys else "absent"


def facts(spec):
    section("os-release", read_lines("/etc/os-release"))
    section("pid1", read_lines("/proc/1/comm")[:1])
    section("hostname", [socket.gethostname()])
    section("uid", [str(os.geteuid())])
    section("packages", package_states(spec.get("packages") or []))
    section("sha256", checksums(spec.get("files") or []))
    credential = spec.get("credential")
    section("credential", ["present"] if credential and os.path.isfile(credential)
            and os.path.getsize(credential) > 0 else [])
    venv = spec.get("venv")
    section("venv", ["present"] if venv and os.path.isfile(venv) and os.access(venv, os.X_OK) else [])
    section("authorized", [authorized(spec.get("auth_user") or "", spec.get("auth_line") or "")])


def run_step(request):
    """Run one step's shell text; its result as a dict (rc None when it was killed at its timeout)."""
    stdin = base64.b64decode(request["stdin"]) if request.get("stdin") else b""
    proc = subprocess.Popen(["/bin/sh", "-c", request["shell"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=request.get("timeout") or None)
        rc, timedout = proc.returncode, False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # apt-get and its children too, not only the shell
        except OSError:
            pass
        out, err = proc.communicate()
        rc, timedout = None, True
    return {"rc": rc, "out": out.decode("utf-8", "replace"), "err": err.decode("utf-8", "replace"),
            "timedout": timedout}


def main(spec):
    if spec is not None:
        facts(spec)
    section("end")
    sys.stdout.flush()
    for line in sys.stdin.buffer:
        if line.strip():
            print(MARK + "result " + json.dumps(run_step(json.loads(line))), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
