"""Runs on a node (``python3 -c``, standard library only): prints what deploy needs to know about it.

Argument: one JSON object {"packages": [...], "files": [...], "credential": path, "venv": path,
"auth_user": name, "auth_line": line}. Output: sections, each after a ``@@pibake NAME`` line, ending with
``@@pibake end``; parsed by ``pibake.deploy.facts.parse_host_facts``. It changes nothing and always exits 0:
a fact it cannot read is left empty.
"""

import hashlib
import json
import os
import pwd
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


def main(spec):
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
    section("end")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
