"""Boot a burned card image as an emulated arm64 Pi: qemu-system-aarch64 (TCG), systemd as PID 1.

What a Pi's firmware does with the card, done here from the same file: read ``config.txt``,
``cmdline.txt``, ``kernel8.img`` and ``initramfs8`` from the FAT boot partition (``firmware_boot``), then
start the kernel with the card as its disk. The machine is qemu's ``virt`` board (a Cortex-A72 like the
Pi 4's), so the differences to a real Pi are the firmware's own: ``console=serial0`` is the board's first
UART (``ttyAMA0``), there is no screen (``console=tty1`` dropped), and the network card is a virtio NIC
that Raspberry Pi OS's naming would call ``eth0`` (``net.ifnames=0``, as the seed expects).

Networking is a tap on a lab bridge (``attach_tap``), so the VM reaches the lab's hosts and nothing else;
the bridge has no address on this machine. The serial console is logged to a file and every line gets a
timestamp (``TargetVM.timeline``), which is how boot phases are measured from outside.

    vm = TargetVM("red01.img", workdir, tap="pk1-tvm1", mac="02:77:0a:4d:07:0b")
    vm.start(); vm.wait_for_serial(r"login:", timeout=600); vm.stop()
"""

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pibake.bake import bootpart
from pibake.errors import VMError
from pibake.run import run, which

LOG = logging.getLogger(__name__)

QEMU = "qemu-system-aarch64"
KVM_NOTE = "TCG (software emulation): /dev/kvm guests fail with 'KVM internal error' in this kind of VM"
# Pi firmware: serial0 is the primary UART; virt's first (and only) UART is the PL011 ttyAMA0.
SERIAL_CONSOLE = "ttyAMA0"


@dataclass(frozen=True)
class FirmwareBoot:
    """What the firmware takes from the boot partition: kernel, initramfs, the kernel command line."""

    kernel: Path
    initrd: Path | None
    cmdline: str


# ----------------------------------------------------------------------------- pure helpers


# systemd's wait for a disk's partitions under TCG on a busy machine (a Pi's own boot needs none of this)
DEVICE_TIMEOUT_S = 900


def vm_cmdline(cmdline_txt):
    """The kernel command line for the emulated board from a card's ``cmdline.txt`` (one line).

    ``console=serial0[,baud]`` becomes ``console=ttyAMA0[,baud]`` (the firmware maps the alias to the
    board's UART); ``console=tty1`` goes (no screen, and the last console= would take /dev/console);
    ``net.ifnames=0`` keeps the NIC's name ``eth0``; ``systemd.default_device_timeout_sec`` gives udev
    under emulation time to announce the disk's partitions (at load 7-8 on this 2-CPU machine the FAT
    partition's by-partuuid link took longer than systemd's 90 s default and the boot fell into emergency
    mode). Everything else, root=PARTUUID included, stays.
    """
    words = cmdline_txt.split()
    out = []
    for word in words:
        if word.startswith("console=serial0"):
            out.append(word.replace("serial0", SERIAL_CONSOLE, 1))
        elif word.startswith("console=tty") and not word.startswith(f"console={SERIAL_CONSOLE}"):
            continue
        else:
            out.append(word)
    if not any(w.startswith("console=") for w in out):
        out.append(f"console={SERIAL_CONSOLE},115200")
    if not any(w.startswith("net.ifnames=") for w in out):
        out.append("net.ifnames=0")
    if not any(w.startswith("systemd.default_device_timeout_sec=") for w in out):
        out.append(f"systemd.default_device_timeout_sec={DEVICE_TIMEOUT_S}")
    return " ".join(out)


def config_txt_files(config_txt):
    """(kernel, initramfs) file names the firmware loads for a 64-bit Pi according to ``config.txt``.

    Only the ``[all]``/unconditional ``kernel=`` and ``initramfs`` lines are read; the defaults are
    Raspberry Pi OS's (``kernel8.img``, and with ``auto_initramfs=1`` the matching ``initramfs8``).
    """
    kernel, initramfs, auto = "kernel8.img", None, False
    section = "all"
    for raw in config_txt.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        if section != "all":
            continue
        if line.startswith("kernel="):
            kernel = line.split("=", 1)[1].strip()
        elif line.startswith("initramfs "):
            initramfs = line.split()[1]
        elif line.replace(" ", "") == "auto_initramfs=1":
            auto = True
    if initramfs is None and auto:
        initramfs = re.sub(r"^kernel", "initramfs", kernel).removesuffix(".img")
    return kernel, initramfs


def qemu_argv(*, boot, image, tap=None, mac=None, memory_mb=2048, cpus=2, serial_log, qmp, qemu=QEMU):
    """The qemu-system-aarch64 command line (a list) for one emulated Pi."""
    argv = [
        qemu, "-M", "virt", "-cpu", "cortex-a72", "-smp", str(cpus), "-m", str(memory_mb),
        "-accel", "tcg,thread=multi",
        "-kernel", str(boot.kernel), "-append", boot.cmdline,
        "-drive", f"file={image},format=raw,if=none,id=card,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=card",
        # entropy for the first boot's key generation (a Pi has a hardware RNG)
        "-object", "rng-random,filename=/dev/urandom,id=rng", "-device", "virtio-rng-pci,rng=rng",
        "-display", "none", "-monitor", "none", "-serial", f"file:{serial_log}",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-no-reboot",
    ]
    if boot.initrd:
        argv[argv.index("-append"):argv.index("-append")] = ["-initrd", str(boot.initrd)]
    if tap:
        argv += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
                 "-device", "virtio-net-pci,netdev=net0,romfile=" + (f",mac={mac}" if mac else "")]
    else:
        argv += ["-nic", "none"]
    return argv


def strip_escapes(text):
    """A serial console line without terminal escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\r", "", text)


# ----------------------------------------------------------------------------- firmware, network


def firmware_boot(image, workdir):
    """Read kernel, initramfs and command line from ``image``'s boot partition into ``workdir``."""
    part = bootpart.find_boot_partition(image)
    config = bootpart.read_files(part, ["config.txt"])["config.txt"] or b""
    kernel_name, initrd_name = config_txt_files(config.decode(errors="replace"))
    files = bootpart.read_files(part, [n for n in (kernel_name, initrd_name, "cmdline.txt") if n])
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not files.get(kernel_name):
        raise VMError(f"{image}: the boot partition has no {kernel_name} (config.txt names it): not a bootable "
                      "arm64 image (pibake.lab.target builds one)")
    if not files.get("cmdline.txt"):
        raise VMError(f"{image}: the boot partition has no cmdline.txt")
    kernel = workdir / kernel_name
    kernel.write_bytes(files[kernel_name])
    initrd = None
    if initrd_name and files.get(initrd_name):
        initrd = workdir / initrd_name
        initrd.write_bytes(files[initrd_name])
    return FirmwareBoot(kernel=kernel, initrd=initrd, cmdline=vm_cmdline(files["cmdline.txt"].decode()))


def attach_tap(name, bridge):
    """Create tap ``name`` on lab bridge ``bridge`` (no address, no IPv6 on this machine's side)."""
    if len(name) > 15:
        raise VMError(f"tap name {name!r} is longer than 15 characters")
    run(["ip", "link", "del", name], check=False)
    run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
    ipv6 = Path("/proc/sys/net/ipv6/conf") / name / "disable_ipv6"
    if ipv6.exists():
        ipv6.write_text("1\n")
    run(["ip", "link", "set", name, "master", bridge, "up"])
    return name


def detach_tap(name):
    run(["ip", "link", "del", name], check=False)


# ----------------------------------------------------------------------------- the VM


class TargetVM:
    """One emulated Pi booting a burned card image. ``start()``, ``wait_for_serial()``, ``stop()``."""

    def __init__(self, image, workdir, *, tap=None, mac=None, memory_mb=2048, cpus=2, name=None):
        self.image = Path(image)
        self.workdir = Path(workdir)
        self.tap, self.mac = tap, mac
        self.memory_mb, self.cpus = memory_mb, cpus
        self.name = name or self.image.stem
        self.serial_log = self.workdir / "serial.log"
        self.qmp = self.workdir / "qmp.sock"
        self.proc = None
        self.started = None  # time.monotonic() at power-on
        self.timeline = []  # (seconds since power-on, console line)
        self._reader = None
        self._lock = threading.Lock()

    def start(self):
        if not which(QEMU):
            raise VMError(f"{QEMU} is not installed: apt-get install qemu-system-arm")
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = firmware_boot(self.image, self.workdir / "firmware")
        self.serial_log.write_bytes(b"")
        self.qmp.unlink(missing_ok=True)
        argv = qemu_argv(boot=boot, image=self.image, tap=self.tap, mac=self.mac, memory_mb=self.memory_mb,
                         cpus=self.cpus, serial_log=self.serial_log, qmp=self.qmp)
        (self.workdir / "qemu.argv.json").write_text(json.dumps(argv, indent=1) + "\n")
        LOG.info("%s: powering on (%s)", self.name, KVM_NOTE)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.workdir / "qemu.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._follow_serial, name=f"serial-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _follow_serial(self):
        pending = b""
        with open(self.serial_log, "rb") as handle:
            while True:
                chunk = handle.read(65536)
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    now = time.monotonic() - self.started
                    with self._lock:
                        for line in lines:
                            self.timeline.append((round(now, 2), strip_escapes(line.decode(errors="replace"))))
                    continue
                if self.proc.poll() is not None:
                    return
                time.sleep(0.1)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def find_serial(self, pattern):
        """Seconds since power-on of the first console line matching ``pattern``, or None."""
        regex = re.compile(pattern)
        with self._lock:
            return next((t for t, line in self.timeline if regex.search(line)), None)

    def wait_for_serial(self, pattern, *, timeout):
        """Wait until a console line matches ``pattern``; its time since power-on. VMError on timeout/exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find_serial(pattern)
            if found is not None:
                return found
            if not self.running():
                raise VMError(f"{self.name}: qemu exited ({self.proc.returncode}) before /{pattern}/ on the "
                              f"console; last lines: {self.tail(5)}")
            time.sleep(0.2)
        raise VMError(f"{self.name}: no /{pattern}/ on the console after {timeout:.0f} s; last lines: {self.tail(5)}")

    def tail(self, count=20):
        with self._lock:
            return " | ".join(line for _, line in self.timeline[-count:] if line.strip())

    def stop(self, timeout=60):
        """Shut down cleanly (ACPI power button through QMP), else kill qemu. Safe to call twice."""
        if self.proc is None:
            return
        if self.running():
            with contextlib.suppress(OSError, ValueError):
                self._qmp("system_powerdown")
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                LOG.warning("%s: no clean shutdown within %d s; killing qemu", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=30)
        if self._reader:
            self._reader.join(timeout=5)

    def _qmp(self, command):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.qmp))
            stream = sock.makefile("rw")
            stream.readline()  # greeting
            for message in ({"execute": "qmp_capabilities"}, {"execute": command}):
                stream.write(json.dumps(message) + "\n")
                stream.flush()
                stream.readline()
