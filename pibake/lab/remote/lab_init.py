"""PID 1 of a lab host (standard library only): started by ``pibake.lab.hosts.LabHost`` inside the host's
new PID, mount and UTS namespaces (``unshare``), from a copy in the host's root so that ``ps`` shows a short
command line. Sets the hostname, mounts a fresh /run, bind-mounts the host's own directories over this
machine's, prints ``ready`` and then reaps orphans until SIGTERM.

argv: NAME MARKER [SRC=DST ...] (MARKER only labels the process for ``ps``; the binds are SRC over DST)."""

import os
import pwd
import signal
import socket
import subprocess
import sys

RUN_DIRS = (("/run/lock", 0o1777), ("/run/munge", 0o755), ("/run/slurm", 0o755), ("/run/sshd", 0o755))
RUN_OWNERS = (("/run/munge", "munge"), ("/run/slurm", "slurm"))


def sh(*argv):
    subprocess.run(argv, check=True)


def parse_binds(args):
    """``SRC=DST`` arguments -> [(src, dst)] (pure)."""
    return [tuple(a.split("=", 1)) for a in args]


def make_run():
    """A private /run (tmpfs) with the directories the daemons expect, owned by their users when they exist."""
    sh("mount", "--make-rprivate", "/")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "pibake-run", "/run")
    for path, mode in RUN_DIRS:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
    for path, user in RUN_OWNERS:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        os.chown(path, entry.pw_uid, entry.pw_gid)


def reap(*_):
    """Collect every exited child (orphans re-parent to PID 1)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv):
    name, binds = argv[0], parse_binds(argv[2:])
    socket.sethostname(name)
    make_run()
    for src, dst in binds:
        sh("mount", "--bind", src, dst)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGCHLD, reap)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.close(1)
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])
