"""Runs on a node (``python3 -c``, standard library only): writes the files deploy ships.

Reads on stdin {"dirs": [[path, mode]], "files": [{path, mode, b64, then?}], "authorize"?: {user, line,
blob, name}}. Writes each file whose content, mode or owner (root) differs, atomically (a temp file in the
same directory, then rename); runs a file's "then" command after writing it (e.g. a service restart); puts
"authorize"'s line into the user's authorized_keys, replacing an older line of the same key or key name.
Prints the JSON list of the paths it wrote. Secrets arrive on stdin, never on a command line.
"""

import base64
import hashlib
import json
import os
import pwd
import subprocess
import sys


def write_atomic(path, data, mode, uid=0, gid=0):
    tmp = "%s.pibake-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def is_same(path, data, mode):
    try:
        with open(path, "rb") as fh:
            same = hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
        st = os.stat(path)
    except OSError:
        return False
    return same and st.st_mode & 0o7777 == mode and st.st_uid == 0


def make_dirs(dirs):
    for path, mode in dirs:
        os.makedirs(path, exist_ok=True)
        if os.stat(path).st_mode & 0o7777 != mode:
            os.chmod(path, mode)


def write_files(files):
    written = []
    for f in files:
        os.makedirs(os.path.dirname(f["path"]), mode=0o755, exist_ok=True)
        data = base64.b64decode(f["b64"])
        if is_same(f["path"], data, f["mode"]):
            continue
        write_atomic(f["path"], data, f["mode"])
        written.append(f["path"])
        if f.get("then"):
            subprocess.call(f["then"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return written


def authorize(auth):
    """One line in the user's authorized_keys (0600, in ~/.ssh 0700, owned by the user); returns its path."""
    pw = pwd.getpwnam(auth["user"])
    ssh_dir = os.path.join(pw.pw_dir, ".ssh")
    if not os.path.isdir(ssh_dir):
        os.makedirs(ssh_dir, mode=0o700)
        os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        lines = []
    lines = [ln for ln in lines if auth["blob"] not in ln and not ln.endswith(" " + auth["name"])] + [auth["line"]]
    write_atomic(path, ("\n".join(lines) + "\n").encode(), 0o600, pw.pw_uid, pw.pw_gid)
    return path


def main(spec):
    make_dirs(spec["dirs"])
    written = write_files(spec["files"])
    if spec.get("authorize"):
        written.append(authorize(spec["authorize"]))
    print(json.dumps(written))


if __name__ == "__main__":
    main(json.load(sys.stdin))
