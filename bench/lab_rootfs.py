"""How long the lab's foundation takes: a cold rootfs build, a cached lookup, a host root, a boot.

    python3 bench/lab_rootfs.py            # cold build into a temporary cache (downloads ~70 MB)
    python3 bench/lab_rootfs.py --warm     # use the machine's cache (/var/cache/pibake/lab)
    python3 bench/lab_rootfs.py --lab-up   # `lab up` from the cached rootfs to all workers idle (x --reps)

Prints one JSON object. Needs root, debootstrap and namespaces; reaches only the Debian mirror
(for the build) and nothing else: the booted host has its own empty network namespace.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pibake.lab.boot import boot_host  # noqa: E402
from pibake.lab.rootfs import ensure_rootfs, make_host_root, remove_host_root, rootfs_stamp  # noqa: E402
from tests.lab.sandbox import Sandbox  # noqa: E402

SEED = {
    "user-data": "#cloud-config\nhostname: bench01\npackage_update: false\npackages: [slurmd, munge]\n"
                 "runcmd:\n  - [touch, /var/tmp/booted]\n",
    "meta-data": "instance-id: bench01-0001\n",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true", help="use the machine's rootfs cache instead of a cold one")
    parser.add_argument("--lab-up", action="store_true",
                        help="time pibake lab up (manager + --workers) from the cached rootfs to all idle")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.lab_up:
        print(json.dumps(bench_lab_up(args.workers, args.reps), indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="pibake-bench-lab-"))
    report = {}
    try:
        cache = None if args.warm else work / "cache"
        t0 = time.monotonic()
        rootfs = ensure_rootfs(cache)
        report["build_or_lookup_s"] = round(time.monotonic() - t0, 1)
        stamp = rootfs_stamp(rootfs)
        report["rootfs"] = str(rootfs)
        report["rootfs_recorded_build_s"] = stamp["build_seconds"]
        report["rootfs_mb"] = round(stamp["size_bytes"] / 2**20)
        if cache:
            du = subprocess.run(["du", "-sb", cache / "debs"], capture_output=True, text=True, check=True)
            report["downloads_mb"] = round(int(du.stdout.split()[0]) / 2**20)
        t0 = time.monotonic()
        ensure_rootfs(cache)
        report["cached_lookup_ms"] = round((time.monotonic() - t0) * 1000, 1)

        sandbox = Sandbox("bench01")
        try:
            t0 = time.monotonic()
            root = make_host_root(rootfs, work / "host", enter=sandbox.enter)
            report["host_root_s"] = round(time.monotonic() - t0, 2)
            t0 = time.monotonic()
            result = boot_host(root, SEED, enter=sandbox.enter, host="bench01")
            report["boot_s"] = round(time.monotonic() - t0, 2)
            report["stages_s"] = {s.name: s.seconds for s in result.stages}
            report["boot_ok"] = result.ok
        finally:
            sandbox.destroy()
            remove_host_root(work / "host")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def bench_lab_up(workers, reps):
    """init + burn (synthetic base image) once, then ``reps`` x (lab up to all idle, lab down).

    Subnet 10.77.97.0/24, names ``pq<pid>-*``: everything stays inside the lab's namespaces."""
    import os
    import statistics

    from pibake.cluster import init_cluster
    from pibake.lab.cluster import burn_lab_images, lab_down, lab_up
    from tests.bake.seed_fixtures import ssh_key

    ensure_rootfs()
    work = Path(tempfile.mkdtemp(prefix="pibake-bench-labup-"))
    work.chmod(0o755)
    prefix = f"pq{os.getpid()}"
    runs = []
    try:
        cdir = work / "cluster"
        init_cluster(cdir, manager="red00", manager_ip="10.77.97.10", network="10.77.97.0/24", name="bench",
                     ssh_keys=(ssh_key(),), timezone="Etc/UTC", home=work)
        t0 = time.monotonic()
        images = burn_lab_images(cdir, work / "images", workers=workers)
        burn_s = round(time.monotonic() - t0, 2)
        for _ in range(reps):
            try:
                report = lab_up(cdir, images_dir=images, prefix=prefix, timeout=600)
            finally:
                lab_down(prefix=prefix)
            runs.append({"total_s": report["timings"]["total_s"], "timings": report["timings"],
                         "hosts": {h["name"]: h["timings"] for h in report["hosts"]}})
    finally:
        lab_down(prefix=prefix)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "command": f"python3 bench/lab_rootfs.py --lab-up --workers {workers} --reps {reps}",
        "workers": workers, "burn_s": burn_s,
        "median_total_to_all_idle_s": statistics.median(r["total_s"] for r in runs),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
