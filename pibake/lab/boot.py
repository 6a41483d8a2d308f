"""Boot a lab host the way a Pi boots its first time: cloud-init's four stages from a NoCloud seed.

A real Pi running Raspberry Pi OS finds ``user-data``, ``meta-data`` and ``network-config``
at the root of its FAT boot partition, mounted at /boot/firmware, through a shipped
cloud-init config (NoCloud, ``seedfrom: file:///boot/firmware/``), and systemd runs
``cloud-init init --local``, ``cloud-init init``, ``cloud-init modules --mode=config`` and
``cloud-init modules --mode=final`` in that order. ``boot_host`` does the same inside a lab
host: it writes the seed to the host's /boot/firmware, writes the Pi's datasource config,
runs the four stages chrooted into the host's own root (see ``rootfs.make_host_root``)
and returns what ``cloud-init status --format json`` says.

The host must have its own UTS namespace (cloud-init sets the hostname) and its own
mount namespace (the root is an overlay mounted there); ``enter`` is the argv prefix that
runs a command in those namespaces.
"""

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field

import yaml

from pibake.errors import BootError, SeedError
from pibake.run import run

LOG = logging.getLogger(__name__)

STAGES = (
    ("init-local", ("init", "--local")),
    ("init", ("init",)),
    ("modules-config", ("modules", "--mode=config")),
    ("modules-final", ("modules", "--mode=final")),
)

# Modelled on what Raspberry Pi OS ships in /etc/cloud/cloud.cfg.d/: NoCloud only, with the
# seed read from the boot partition.
PI_CLOUD_CFG_PATH = "/etc/cloud/cloud.cfg.d/99_pibake_lab_nocloud.cfg"
PI_CLOUD_CFG = {
    "datasource_list": ["NoCloud", "None"],
    "datasource": {"NoCloud": {"seedfrom": "file:///boot/firmware/"}},
}
# cloud-init 22.4 (bookworm) reads only meta-data, user-data and vendor-data through
# ``seedfrom``; newer cloud-init on the Pi also reads network-config from there. Pointing
# NoCloud's seed directory at the boot partition makes 22.4 read all three files from
# the same place, so network-config is parsed as on the Pi.
SEED_DIR = "/var/lib/cloud/seed/nocloud"
BOOT_PARTITION = "/boot/firmware"

HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
}

LOG_TAIL_LINES = 2000


@dataclass
class StageResult:
    name: str
    returncode: int
    seconds: float


@dataclass
class BootResult:
    """What booting one host gave: cloud-init's own status, per stage, and the log tails."""

    host: str
    status: dict
    stages: list = field(default_factory=list)
    hostname: str = ""
    seconds: float = 0.0
    log_tail: str = ""
    output_tail: str = ""

    @property
    def done(self):
        return self.status.get("status") == "done"

    @property
    def errors(self):
        """Every error cloud-init reported: top level and per stage, without duplicates."""
        found = list(self.status.get("errors") or [])
        for name, _ in STAGES:
            stage = self.status.get(name)
            if isinstance(stage, dict):
                found.extend(e for e in stage.get("errors") or [] if e not in found)
        for stage in self.stages:
            if stage.returncode != 0:
                message = f"cloud-init {stage.name} exited with {stage.returncode}"
                if message not in found:
                    found.append(message)
        return found

    @property
    def ok(self):
        return self.done and not self.errors

    def check(self):
        """Raise ``BootError`` naming the host and the first errors unless the boot is clean."""
        if self.ok:
            return self
        errors = "; ".join(self.errors[:3]) or f"status {self.status.get('status')!r}"
        raise BootError(f"{self.host}: cloud-init did not finish cleanly: {errors} "
                        f"(see /var/log/cloud-init.log in the host)")

    def as_dict(self):
        return {
            "host": self.host,
            "done": self.done,
            "errors": self.errors,
            "hostname": self.hostname,
            "seconds": self.seconds,
            "stages": [vars(s) for s in self.stages],
            "status": self.status,
        }


def seed_files(seed):
    """{file name: text} for a ``pibake.model.Seed`` or a plain mapping of the NoCloud files."""
    files = seed.files() if hasattr(seed, "files") else dict(seed)
    missing = [name for name in ("user-data", "meta-data") if not files.get(name)]
    if missing:
        raise SeedError(f"seed has no {' and no '.join(missing)}")
    return {name: text for name, text in files.items() if text is not None}


def validate_seed(root, seed, *, enter, host="host", timeout=60):
    """Check a seed with the host's own cloud-init schema; raise ``SeedError`` naming host and key.

    meta-data and network-config must be YAML mappings; user-data goes through
    ``cloud-init schema --config-file`` run inside the host (the cloud-init version the
    host will boot with).
    """
    files = seed_files(seed)
    for name in ("meta-data", "network-config"):
        if name not in files:
            continue
        try:
            data = yaml.safe_load(files[name])
        except yaml.YAMLError as exc:
            raise SeedError(f"{host}: {name} is not valid YAML: {_first_line(exc)}") from None
        if data is not None and not isinstance(data, dict):
            raise SeedError(f"{host}: {name} must be a YAML mapping")
    user_data = files["user-data"]
    if not user_data.startswith("#cloud-config"):
        raise SeedError(f"{host}: user-data must start with #cloud-config")
    check_path = "/run/pibake-seed-check.yaml"
    write_host_file(root, check_path, user_data, enter=enter, timeout=timeout, mode="0600")
    try:
        proc = run([*enter, "chroot", root, "cloud-init", "schema", "--config-file", check_path],
                   timeout=timeout, check=False, env=HOST_ENV)
    finally:
        run([*enter, "rm", "-f", f"{root}{check_path}"], timeout=timeout, check=False)
    if proc.returncode != 0:
        detail = _schema_errors(proc.stderr + proc.stdout)
        raise SeedError(f"{host}: user-data fails cloud-init's schema: {detail}")


def boot_host(root, seed, *, enter, host="host", timeout=300, validate=True, after_init=None):
    """Boot a lab host from ``seed`` and return a ``BootResult``.

    ``root`` is the host's root as returned by ``make_host_root`` (valid inside ``enter``'s
    mount namespace), ``seed`` a ``pibake.model.Seed`` (e.g. from ``bake.bootpart.read_seed``
    on the burned image) or a mapping of the NoCloud file names to text, ``enter`` the argv
    prefix into the host's namespaces, ``host`` its name for messages, ``timeout`` per stage.

    The seed is validated first (``validate_seed``): a seed that fails the schema raises
    ``SeedError`` and nothing is booted. All four stages run even if one fails, as on a
    Pi; the result carries cloud-init's status, per-stage exit codes and log tails. Use
    ``result.check()`` to turn a failed boot into a ``BootError``.

    ``after_init()`` is called once cloud-init's init stage is done (host keys written, network up), where
    a Pi's systemd starts ssh.service: the config and final stages (packages, runcmd, the agent) then run
    with sshd up, as on a Pi.
    """
    enter = [str(a) for a in enter]
    root = str(root)
    _require_own_uts(enter, host, timeout)
    files = seed_files(seed)
    if validate:
        validate_seed(root, files, enter=enter, host=host, timeout=timeout)
    for name, text in files.items():
        write_host_file(root, f"{BOOT_PARTITION}/{name}", text, enter=enter, timeout=timeout, mode="0600")
    write_host_file(root, PI_CLOUD_CFG_PATH, "# pibake lab: what the Pi image ships\n"
                    + yaml.safe_dump(PI_CLOUD_CFG, sort_keys=False), enter=enter, timeout=timeout)
    run([*enter, "sh", "-eu", "-c", 'mkdir -p "$(dirname "$1")" && ln -sfn "$2" "$1"', "link-seed",
         f"{root}{SEED_DIR}", BOOT_PARTITION], timeout=timeout)
    return _run_stages(root, enter, host, timeout, after_init)


def reboot_host(root, *, enter, host="host", timeout=300, after_init=None):
    """Boot a lab host again, as a Pi boots after a power cut: cloud-init's four stages on what the card
    holds now (the seed already on /boot/firmware, the root's /var/lib/cloud from earlier boots). Nothing is
    written first; cloud-init itself skips what runs once per instance (users, write_files, runcmd) and
    runs what runs every boot. Returns a ``BootResult``; ``after_init``: as for ``boot_host``."""
    enter = [str(a) for a in enter]
    root = str(root)
    _require_own_uts(enter, host, timeout)
    return _run_stages(root, enter, host, timeout, after_init)


def _run_stages(root, enter, host, timeout, after_init=None):
    started = time.monotonic()
    stages = []
    for name, args in STAGES:
        t0 = time.monotonic()
        proc = run([*enter, "chroot", root, "cloud-init", *args], timeout=timeout, check=False, env=HOST_ENV)
        stage = StageResult(name, proc.returncode, round(time.monotonic() - t0, 2))
        stages.append(stage)
        LOG.info("%s: cloud-init %s exited %d after %.2f s", host, name, proc.returncode, stage.seconds)
        if name == "init" and after_init is not None:
            after_init()
    seconds = round(time.monotonic() - started, 2)

    proc = run([*enter, "chroot", root, "cloud-init", "status", "--format", "json"], timeout=timeout,
               check=False, env=HOST_ENV)
    try:
        status = json.loads(proc.stdout)
    except ValueError:
        raise BootError(f"{host}: cloud-init status gave no JSON (exit {proc.returncode}): "
                        f"{_first_line(proc.stderr) or 'no output'}") from None
    hostname = run([*enter, "hostname"], timeout=timeout, check=False).stdout.strip()
    return BootResult(
        host=host,
        status=status,
        stages=stages,
        hostname=hostname,
        seconds=seconds,
        log_tail=read_host_file(root, "/var/log/cloud-init.log", enter=enter, tail=LOG_TAIL_LINES),
        output_tail=read_host_file(root, "/var/log/cloud-init-output.log", enter=enter, tail=LOG_TAIL_LINES),
    )


def host_command(root, argv, *, enter):
    """The argv that runs ``argv`` inside a booted host's own root (for lab shells and checks)."""
    return [*[str(a) for a in enter], "chroot", str(root), *[str(a) for a in argv]]


def read_host_file(root, path, *, enter, tail=None, timeout=60):
    """Text of ``path`` inside the host's root ('' when it does not exist); last ``tail`` lines."""
    argv = ["tail", "-n", str(tail)] if tail else ["cat"]
    proc = run([*enter, *argv, f"{root}{path}"], timeout=timeout, check=False)
    return proc.stdout if proc.returncode == 0 else ""


def write_host_file(root, path, text, *, enter, timeout, mode="0644"):
    # The file goes through stdin: contents never reach an argv or a log line.
    run([*enter, "sh", "-eu", "-c", 'mkdir -p "$(dirname "$1")"; umask 077; cat > "$1"; chmod "$2" "$1"',
         "write-host-file", f"{root}{path}", mode], input=text, timeout=timeout)


def _require_own_uts(enter, host, timeout):
    mine = os.readlink("/proc/self/ns/uts")
    theirs = run([*enter, "readlink", "/proc/self/ns/uts"], timeout=timeout).stdout.strip()
    if theirs == mine:
        raise BootError(f"{host}: refusing to boot: {shlex.join(enter) or 'the host'} does not give it its own "
                        "UTS namespace, and cloud-init would rename this machine")


def _schema_errors(text):
    """The useful part of ``cloud-init schema`` output: the lines naming keys."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "schema errors:" in line:
            return line.split("schema errors:", 1)[1].strip()
    keep = [line for line in lines if not line.startswith(("Traceback", "File "))]
    return "; ".join(keep[-3:]) or "no detail from cloud-init"


def _first_line(text):
    return str(text).strip().splitlines()[0] if str(text).strip() else ""
