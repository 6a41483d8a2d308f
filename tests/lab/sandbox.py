"""A throwaway lab host for these tests: its own mount, UTS, PID, IPC and network namespaces.

A stand-in for ``pibake.lab.hosts.LabHost`` that needs nothing but util-linux, so the
rootfs and boot pieces can be tested on their own. ``enter`` is the argv prefix into it.
"""

import os
import signal
import subprocess
import time

from tests.conftest import running_as_root


class Sandbox:
    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--uts", "--ipc", "--net", "--pid", "--fork",
             "--kill-child", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self._child_pid()
        subprocess.run([*self.enter, "hostname", name], check=True)

    def _child_pid(self):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as handle:
                    children = handle.read().split()
            except FileNotFoundError:
                children = []
            if children and os.readlink(f"/proc/{children[0]}/ns/uts") != os.readlink("/proc/self/ns/uts"):
                return int(children[0])
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError("unshare did not start its namespaces")

    @property
    def enter(self):
        return ["nsenter", "--target", str(self.pid), "--mount", "--uts", "--ipc", "--net", "--pid", "--wd=/"]

    def destroy(self):
        # SIGKILL to the namespace's PID 1 takes every process in it, and the mounts with them.
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def mounted_under(path):
    """Mount points at or under ``path`` in this (the machine's) mount namespace."""
    path = str(path).rstrip("/")
    with open("/proc/self/mountinfo") as handle:
        points = [line.split()[4] for line in handle]
    return [p for p in points if p == path or p.startswith(path + "/")]


def namespaces_missing():
    """Why lab namespaces cannot be made here ('' when they can)."""
    with open("/proc/filesystems") as handle:
        if "overlay" not in handle.read():
            return "the kernel has no overlayfs"
    if not running_as_root():
        return "needs root"
    proc = subprocess.run(["unshare", "--mount", "--uts", "--net", "--pid", "--fork", "true"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create namespaces: {proc.stderr.strip()}"
    return ""
