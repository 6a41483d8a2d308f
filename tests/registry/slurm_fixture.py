"""A private munged + slurmctld for tests: own socket, ports, state, pid and log files under one temp dir."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import running_as_root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_pidfile(path, sig=signal.SIGTERM, wait=10):
    try:
        pid = int(Path(path).read_text().strip())
        os.kill(pid, sig)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


class SlurmSandbox:
    """Paths and settings for a slurmctld of our own; ``settings`` go into the generated slurm.conf."""

    def __init__(self):
        missing = [p for p in ("munged", "mungekey", "slurmctld", "scontrol", "sinfo")
                   if not shutil.which(p, path="/usr/sbin:/usr/bin:/sbin:/bin")]
        if missing:
            pytest.skip(f"Slurm/munge not installed: {', '.join(missing)} (apt-get install munge slurmctld "
                        f"slurm-client)")
        if not running_as_root():
            pytest.skip("needs root: slurmctld runs as SlurmUser=root here")
        # munged insists that every directory above its socket is searchable by all (not pytest's 0700 tmp).
        self.root = Path(tempfile.mkdtemp(prefix="pibake-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        for sub in ("munge", "sock", "state", "run", "log", "etc"):
            (self.root / sub).mkdir()
        (self.root / "munge").chmod(0o700)
        self.socket = self.root / "sock" / "munge.socket"
        self.conf = self.root / "etc" / "slurm.conf"
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.settings = {
            "SlurmUser": "root",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": str(self.root / "state"),
            "SlurmdSpoolDir": str(self.root / "slurmd"),
            "SlurmctldPidFile": str(self.root / "run" / "slurmctld.pid"),
            "SlurmdPidFile": str(self.root / "run" / "slurmd.pid"),
            "SlurmctldLogFile": str(self.root / "log" / "slurmctld.log"),
            "SlurmdLogFile": str(self.root / "log" / "slurmd.log"),
        }

    def start_munge(self):
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        proc = subprocess.run(
            ["munged", f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'seed'}"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"munged could not start here: {proc.stderr.strip()[:200]}")

    @property
    def env(self):
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def scontrol(self, *args):
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=30)

    def slurmctld_pid(self):
        try:
            return int((self.root / "run" / "slurmctld.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def log(self):
        path = self.root / "log" / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self):
        _kill_pidfile(self.root / "run" / "slurmd.pid")
        _kill_pidfile(self.root / "run" / "slurmctld.pid")
        _kill_pidfile(self.root / "munge" / "munged.pid")
        shutil.rmtree(self.root, ignore_errors=True)
