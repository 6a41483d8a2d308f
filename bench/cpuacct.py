"""CPU accounting for a benchmark window: machine-wide CPU-seconds (/proc/stat) and, per process, the CPU of
this process and all its descendants (lab hosts' daemons included), grouped by what they are.

Processes that live through the window are read from /proc/<pid>/stat (utime+stime, difference start->end);
processes that exit inside it come from BSD process accounting (acct(2), v3 records: the kernel writes one
record per exiting process with its CPU time). Which side a process's work would run on with real machines:

* ``node``: sshd sessions and what they run (the agent, the file installer, shells), slurmd, the nodes' munged;
* ``manager``: the registry (gunicorn workers, their scontrol/sinfo), slurmctld, the manager's munged;
* ``deployer``: this process (deploy's ClusterShell loop, the idle polls over TLS) and its ssh clients.

    with CpuWindow() as w:
        ...
    w.result  # {"wall_s", "machine_cpu_s", "ours_cpu_s", "other_cpu_s", "by_group": {...}, "by_side": {...}}
"""

import ctypes
import os
import struct
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
AHZ = 100  # acct v3 times are in AHZ ticks (100 on Linux)
ACCT_V3 = struct.Struct("<BBHIIIIIIf8H16s")  # 64 bytes


def machine_busy_s():
    """CPU-seconds all CPUs spent busy since boot (user+nice+system+irq+softirq)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _comp_t(value):
    return (value & 0x1FFF) << (3 * (value >> 13))


def parse_acct(data):
    """acct v3 records -> [{"pid", "ppid", "comm", "cpu_s", "btime"}] (pure)."""
    out = []
    for off in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
        rec = ACCT_V3.unpack_from(data, off)
        if rec[1] & 0x0F != 3:  # ac_version
            continue
        utime, stime = rec[10], rec[11]
        out.append({"pid": rec[6], "ppid": rec[7], "btime": rec[8],
                    "cpu_s": (_comp_t(utime) + _comp_t(stime)) / AHZ,
                    "comm": rec[18].split(b"\0", 1)[0].decode("utf-8", "replace")})
    return out


def snapshot():
    """{pid: {"ppid", "comm", "cpu_s", "start", "cmdline"}} of every process now."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        procs[int(entry)] = {"ppid": int(rest[1]), "comm": comm,
                             "cpu_s": (int(rest[11]) + int(rest[12])) / CLK_TCK,
                             "start": int(rest[19]), "cmdline": cmdline}
    return procs


class CpuWindow:
    def __init__(self, root_pid=None):
        self.root = root_pid or os.getpid()
        self.result = None
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self):
        fd, self.acct_path = tempfile.mkstemp(prefix="pibake-bench-acct-")
        os.close(fd)
        self.acct_on = self._libc.acct(self.acct_path.encode()) == 0
        self.before = snapshot()
        self.t0, self.busy0 = time.monotonic(), machine_busy_s()
        return self

    def __exit__(self, *exc):
        wall, busy = time.monotonic() - self.t0, machine_busy_s() - self.busy0
        after = snapshot()
        if self.acct_on:
            self._libc.acct(None)
        with open(self.acct_path, "rb") as fh:
            exited = parse_acct(fh.read())
        os.unlink(self.acct_path)
        self.result = account(self.root, self.before, after, exited, wall, busy, self.acct_on)
        return False


# OpenSSH 9.8 on (trixie's 10.0) runs each connection as sshd-session (and sshd-auth from 10.0), not as sshd
SSHD_COMMS = ("sshd", "sshd-session", "sshd-auth")


def account(root, before, after, exited, wall, busy, acct_on=True):
    """Per-process CPU inside the window for ``root`` and its descendants, grouped (pure given the inputs)."""
    procs = []  # (pid, ppid, comm, cpu_s, cmdline, existed_before)
    for pid, p in after.items():
        old = before.get(pid)
        same = old is not None and old["start"] == p["start"]
        procs.append((pid, p["ppid"], p["comm"], p["cpu_s"] - (old["cpu_s"] if same else 0.0), p["cmdline"], same))
    for r in exited:
        old = before.get(r["pid"])
        procs.append((r["pid"], r["ppid"], r["comm"], max(0.0, r["cpu_s"] - (old["cpu_s"] if old else 0.0)),
                      old["cmdline"] if old else "", old is not None))
    parent = {pid: ppid for pid, ppid, *_ in procs}
    info = {pid: (comm, cmdline, existed) for pid, _pp, comm, _c, cmdline, existed in procs}

    def ours(pid):
        seen = 0
        while pid and seen < 64:
            if pid == root:
                return True
            pid = parent.get(pid)
            seen += 1
        return False

    def side_and_group(pid):
        comm, cmdline, existed = info[pid]
        if pid == root:
            return "deployer", "deploy (this process)"
        if comm == "ssh":
            return "deployer", "ssh client"
        if comm in SSHD_COMMS:
            return "node", "sshd"
        if comm in ("slurmd", "slurmd-wlm"):  # trixie's slurmd re-executes itself under the -wlm name
            return "node", "slurmd"
        if comm in ("slurmctld", "slurmctld-wlm", "slurmscriptd"):  # a reconfigure re-executes slurmctld-wlm
            return "manager", "slurmctld"
        if comm == "munged":
            return ("manager", "munged (manager)") if existed else ("node", "munged (nodes)")
        if "registry serve" in cmdline or comm == "gunicorn":
            return "manager", "registry (gunicorn, TLS, SQLite)"
        # anything else takes the side of its nearest classified ancestor
        up, hops = parent.get(pid), 0
        while up and up != root and hops < 64:
            if up in info:
                c, cl, ex = info[up]
                if c in SSHD_COMMS or c == "slurmd" or (c == "munged" and not ex):
                    return "node", _name(comm, "node")
                if "registry serve" in cl or c in ("slurmctld", "gunicorn") or (c == "munged" and ex):
                    return "manager", _name(comm, "manager")
            up, hops = parent.get(up), hops + 1
        return "deployer", _name(comm, "deployer")

    by_group, by_side, total = {}, {}, 0.0
    for pid, _pp, _comm, cpu, _cl, _ex in procs:
        if cpu <= 0 or not ours(pid):
            continue
        side, group = side_and_group(pid)
        by_group[group] = by_group.get(group, 0.0) + cpu
        by_side[side] = by_side.get(side, 0.0) + cpu
        total += cpu
    return {"wall_s": wall, "machine_cpu_s": busy, "ours_cpu_s": total, "other_cpu_s": max(0.0, busy - total),
            "acct": acct_on, "by_group": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
            "by_side": by_side}


def _name(comm, side):
    if comm.startswith("python"):
        return {"node": "python3 on nodes (agent, installer)", "manager": "registry (gunicorn, TLS, SQLite)",
                "deployer": "python3 (deployer)"}[side]
    if comm in ("scontrol", "sinfo"):
        return f"{comm} ({'nodes' if side == 'node' else side})"
    if comm in ("sh", "bash", "dash"):
        return f"shells ({side})"
    return f"other ({side})"


# --------------------------------------------------------------------------- exact CPU per side (cgroup v1)

CPUACCT = "/sys/fs/cgroup/cpuacct"
SIDES = ("node", "manager", "deployer")


def pid_namespace(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


class SideCgroups:
    """Exact CPU per side with cgroup v1 cpuacct: every process of a lab host (found by its PID namespace)
    goes to that host's side, this process to ``deployer``; children inherit their parent's group, so every
    ssh client, sshd session, agent, shell, munged, slurmd, registry thread and slurmctld is counted, short
    processes included (BSD accounting rounds those down to 0), with the kernel time charged to them.

        groups = SideCgroups.create("pibake-bench-123")   # None when cgroup v1 cpuacct is not writable
        groups.assign({"node": [pid1_of_each_worker], "manager": [pid1_of_the_manager]})
        before = groups.usage(); ...; after = groups.usage()
        groups.close()                                      # everything back to the root group
    """

    def __init__(self, root):
        self.root = root

    @classmethod
    def create(cls, name):
        root = os.path.join(CPUACCT, name)
        try:
            os.makedirs(root, exist_ok=True)
            for side in SIDES:
                os.makedirs(os.path.join(root, side), exist_ok=True)
        except OSError:
            return None
        return cls(root)

    def _move(self, pid, side):
        try:
            with open(os.path.join(self.root, side, "cgroup.procs"), "w") as fh:
                fh.write(str(pid))
        except OSError:
            pass  # exited meanwhile

    def assign(self, inits):
        """``inits``: {side: [PID 1 of each lab host on that side]}; this process goes to ``deployer``."""
        ns_side = {}
        for side, pids in inits.items():
            for pid in pids:
                ns = pid_namespace(pid)
                if ns:
                    ns_side[ns] = side
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                side = ns_side.get(pid_namespace(int(entry)))
                if side:
                    self._move(int(entry), side)
        self._move(os.getpid(), "deployer")

    def usage(self):
        out = {}
        for side in SIDES:
            with open(os.path.join(self.root, side, "cpuacct.usage")) as fh:
                out[side] = int(fh.read()) / 1e9
        return out

    def close(self):
        for _ in range(5):
            left = False
            for side in SIDES:
                try:
                    with open(os.path.join(self.root, side, "cgroup.procs")) as fh:
                        pids = fh.read().split()
                except OSError:
                    continue
                for pid in pids:
                    left = True
                    try:
                        with open(os.path.join(CPUACCT, "cgroup.procs"), "w") as fh:
                            fh.write(pid)
                    except OSError:
                        pass
            if not left:
                break
        for side in SIDES:
            try:
                os.rmdir(os.path.join(self.root, side))
            except OSError:
                pass
        try:
            os.rmdir(self.root)
        except OSError:
            pass
