"""How a running slurmctld takes one more node: `scontrol reconfigure` against a restart, in a lab manager.

    python3 bench/slurm_add_node.py                      # trixie lab (Slurm 24.11), 5 runs of each
    python3 bench/slurm_add_node.py --release bookworm   # Slurm 22.05: there the reconfigure fails

Brings up a lab (manager + 3 workers, its own prefix and network 10.77.66.0/24), then on the manager, per run:
the last worker's node line is taken out of slurm.conf and put in force, then put back either by
`scontrol reconfigure` or by a restart (SIGTERM, wait for the exit, `slurmctld -f`, wait for `scontrol ping`),
timing the command, until `scontrol show node` knows the node, and until it is `idle`. Prints one JSON object
(per-run numbers and medians); the lab is removed at the end. Needs root and the lab's cached rootfs.
NETWORK RULE: everything runs inside the lab's own namespaces.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pibake.lab.cluster import lab_down, lab_run, lab_up  # noqa: E402

NET = "10.77.66"
PREFIX = "pbnode"

# Runs with the manager's own python3. argv: runs, node (the last worker).
INNER = r'''
import json, os, re, subprocess, sys, time
runs, node = int(sys.argv[1]), sys.argv[2]
CONF = "/etc/slurm/slurm.conf"
full = open(CONF).read()

def sh(*argv):
    return subprocess.run(argv, capture_output=True, text=True)

def state(name):
    proc = sh("sinfo", "-h", "-N", "-n", name, "-o", "%T")
    return proc.stdout.strip() if proc.returncode == 0 else ""

def known(name):
    return sh("scontrol", "show", "node", name).returncode == 0

def wait(pred, timeout=120):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit("timed out")

def write(text):
    with open(CONF + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(CONF + ".tmp", CONF)

def without_node(text):
    # one line per node here: the registry folds names and addresses into ranges, so unfold by hand
    out = []
    for line in text.splitlines():
        if line.startswith("NodeName="):
            spec = line.split(" ", 2)[2]
            names = sh("scontrol", "show", "hostnames", line.split()[0].split("=", 1)[1]).stdout.split()
            addrs = sh("scontrol", "show", "hostnames", line.split()[1].split("=", 1)[1]).stdout.split()
            out += [f"NodeName={n} NodeAddr={a} {spec}" for n, a in zip(names, addrs) if n != node]
        else:
            out.append(line)
    return "\n".join(out) + "\n"

def gone(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

def restart():
    try:
        pid = int(open("/run/slurmctld.pid").read())
        os.kill(pid, 15)
        wait(lambda: gone(pid))
    except (OSError, ValueError):
        pass  # not running (22.05 exits on a reconfigure that changes the node set)
    sh("slurmctld", "-f", CONF)
    wait(lambda: "is UP" in sh("scontrol", "ping").stdout)

def reconfigure():
    proc = sh("scontrol", "reconfigure")
    return proc.stderr.strip() if proc.returncode != 0 else None

smaller = without_node(full)
result = {"version": sh("slurmctld", "-V").stdout.strip(), "reconfigure": [], "restart": []}
for _ in range(runs):
    for how, action in (("reconfigure", reconfigure), ("restart", restart)):
        write(smaller)
        restart()  # the node leaves by a restart, which every version supports
        wait(lambda: not state(node))
        time.sleep(1)
        write(full)
        t0 = time.monotonic()
        error = action()
        command_s = time.monotonic() - t0
        entry = {"command_s": round(command_s, 3), "known_right_after": known(node)}
        if error:  # Slurm 22.05: the reconfigure RPC fails when the node set changed
            fatal = [ln for ln in open("/var/log/slurm/slurmctld.log") if "fatal" in ln][-1:]
            entry.update(error=error, slurmctld_up_after="is UP" in sh("scontrol", "ping").stdout, never=True,
                         fatal=fatal[0].strip() if fatal else None)
            restart()
            wait(lambda: state(node) == "idle")
            result[how].append(entry)
            continue
        try:
            wait(lambda: known(node), timeout=15)
            entry["known_s"] = round(time.monotonic() - t0, 3)
            wait(lambda: state(node) == "idle", timeout=60)
            entry["idle_s"] = round(time.monotonic() - t0, 3)
        except SystemExit:
            entry["never"] = True
            restart()  # put the node back for the next run
            wait(lambda: state(node) == "idle")
        result[how].append(entry)
print(json.dumps(result))
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="trixie", choices=("trixie", "bookworm"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pibake-bench-node-"))
    cluster = work / "cluster"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "key"], check=True)
    subprocess.run([sys.executable, "-m", "pibake", "--cluster", cluster, "init", "--manager", "red00",
                    "--manager-ip", f"{NET}.10", "--network", f"{NET}.0/24", "--ssh-key", work / "key.pub"],
                   check=True, capture_output=True)
    try:
        lab_up(cluster, workers=3, prefix=PREFIX, release=args.release, timeout=300)
        proc = lab_run("red00", ["python3", "-", str(args.runs), "red03"], prefix=PREFIX,
                       input=INNER, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"bench/slurm_add_node.py: the measurement failed: {proc.stderr.strip()[-400:]}")
        result = json.loads(proc.stdout)
    finally:
        lab_down(prefix=PREFIX)
        shutil.rmtree(work, ignore_errors=True)
    result["release"] = args.release
    for how in ("reconfigure", "restart"):
        runs = [r for r in result[how] if not r.get("never")]
        result[f"{how}_median"] = {k: statistics.median(r[k] for r in runs) if runs else None
                                   for k in ("command_s", "known_s", "idle_s")}
        result[f"{how}_never"] = len(result[how]) - len(runs)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
