"""The ssh client of a built lab rootfs (Debian trixie: OpenSSH 10.0) as this machine's `ssh`, for bench/deploy.

The rootfs's ssh needs its own glibc and OpenSSL, so it runs chrooted into an overlay of that rootfs
(pibake.lab.rootfs.make_host_root: /proc, /dev, /run) with this machine's /tmp bound in, where the lab's ssh config,
keys and known_hosts live (and --ssh-costs' ControlPath sockets). The overlay is mounted in the mount namespace of a holder
process (``unshare --mount``, private propagation), so nothing is mounted on this machine and it all goes when the
holder ends. ``ssh`` in ``bin_dir`` (put first on PATH) is a small C program compiled here: setns into the holder's
mount namespace, chroot, execv /usr/bin/ssh with the arguments unchanged. One exec more than a plain `ssh`, no
shell: its own CPU per invocation is measured (``overhead_ms``) and reported beside the figures it adds to.

    with RootfsSshClient(rootfs) as client:
        os.environ["PATH"] = f"{client.bin_dir}:{os.environ['PATH']}"
        ...   # every `ssh` pibake starts is the rootfs's
"""

import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pibake.lab.rootfs import make_host_root

WRAPPER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <unistd.h>
/* argv passes through unchanged: argv[0] stays what the caller gave (bench/cpuacct classifies by it) */
int main(int argc, char **argv) {
    (void)argc;
    int fd = open(NS_PATH, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNS) != 0) { perror("rootfs ssh: setns " NS_PATH); return 255; }
    close(fd);
    if (chroot(ROOT) != 0 || chdir("/") != 0) { perror("rootfs ssh: chroot " ROOT); return 255; }
    execv("/usr/bin/ssh", argv);
    perror("rootfs ssh: exec /usr/bin/ssh");
    return 255;
}
"""


class RootfsSshClient:
    """The rootfs's /usr/bin/ssh behind ``bin_dir/ssh`` (see the module docstring). Needs root and a C compiler."""

    def __init__(self, rootfs):
        self.rootfs = Path(rootfs)
        self.work = None
        self.holder = None
        self.root = None
        self.bin_dir = None
        self.version = None
        self.overhead_ms = None

    def __enter__(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            raise SystemExit("bench/deploy: --ssh-client rootfs compiles a small exec wrapper: apt-get install gcc")
        # not under /tmp: /tmp is bound into the client's root, which would then contain itself
        self.work = Path(tempfile.mkdtemp(prefix="pibake-bench-ssh-", dir="/run"))
        try:
            self._start_holder()
            self.root = make_host_root(self.rootfs, self.work / "host", enter=self._enter(), timeout=120)
            subprocess.run([*self._enter(), "mount", "--rbind", "/tmp", str(self.root / "tmp")], check=True,
                           timeout=30)
            self.bin_dir = self.work / "bin"
            self.bin_dir.mkdir()
            self._compile(cc)
            self.version = subprocess.run([str(self.bin_dir / "ssh"), "-V"], capture_output=True, text=True,
                                          timeout=30).stderr.strip()
            self.overhead_ms = self._overhead_ms()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_holder(self):
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        ours = os.readlink("/proc/self/ns/mnt")
        end = time.monotonic() + 10
        while time.monotonic() < end:  # unshare execs sleep once it is in its own mount namespace
            try:
                if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != ours:
                    return
            except OSError:
                pass
            time.sleep(0.01)
        raise SystemExit("bench/deploy: the mount namespace holder for the rootfs ssh client did not start")

    def _enter(self):
        return ["nsenter", "-t", str(self.holder.pid), "-m"]

    def _compile(self, cc):
        src = self.work / "rootfs-ssh.c"
        src.write_text(WRAPPER_C)
        ns_path = f"/proc/{self.holder.pid}/ns/mnt"
        subprocess.run([cc, "-O2", "-o", str(self.bin_dir / "ssh"), f'-DNS_PATH="{ns_path}"',
                        f'-DROOT="{self.root}"', str(src)], check=True, timeout=120)

    def _overhead_ms(self, reps=100):
        """The wrapper's own CPU per invocation: `ssh -V` through it less the same ssh started directly (through
        the rootfs's dynamic loader, with its libraries)."""
        loader = self.rootfs / "lib64" / "ld-linux-x86-64.so.2"
        direct = [str(loader), "--library-path", str(self.rootfs / "usr/lib/x86_64-linux-gnu"),
                  str(self.rootfs / "usr/bin/ssh"), "-V"]

        def cpu(argv):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            for _ in range(reps):
                subprocess.run(argv, capture_output=True, timeout=30)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            return (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / reps * 1000

        wrapped = cpu([str(self.bin_dir / "ssh"), "-V"])
        return round(max(0.0, wrapped - cpu(direct)), 2) if loader.exists() else round(wrapped, 2)

    def __exit__(self, *exc):
        if self.holder is not None:
            self.holder.kill()  # its mount namespace, and every mount in it, ends with it
            self.holder.wait(timeout=10)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
        return False
