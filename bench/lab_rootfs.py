"""How long the lab's foundation takes: a cold rootfs build, a cached lookup, a host root, a boot.

    python3 bench/lab_rootfs.py            # cold build into a temporary cache (trixie: downloads 86 MiB)
    python3 bench/lab_rootfs.py --warm     # use the machine's cache (/var/cache/pibake/lab)
    python3 bench/lab_rootfs.py --lab-up   # `lab up` from the cached rootfs to all workers idle (x --reps)
    python3 bench/lab_rootfs.py --replot   # lab-timeline.png + lab.md again from docs/report/lab.json (no run)

Prints one JSON object; --lab-up also writes <report-dir>/lab.md, lab.json and lab-timeline.png.
Needs root, debootstrap and namespaces; reaches only the Debian mirror
(for the build) and nothing else: the booted host has its own empty network namespace.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from plots import lab_plots  # noqa: E402

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
    parser.add_argument("--report-dir", type=Path, default=REPO / "docs/report",
                        help="where --lab-up writes lab.md, lab.json and lab-timeline.png")
    parser.add_argument("--replot", action="store_true",
                        help="no run: draw the figure and write lab.md again from <report-dir>/lab.json")
    args = parser.parse_args()
    if args.replot:
        source = args.report_dir / "lab.json"
        if not source.exists():
            sys.exit(f"bench/lab_rootfs.py: {source} does not exist: run it with --lab-up first")
        write_lab_report(json.loads(source.read_text()), args.report_dir)
        return
    if args.lab_up:
        load_at_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        data = bench_lab_up(args.workers, args.reps)
        data["command"] = " ".join(["python3 bench/lab_rootfs.py"] + sys.argv[1:])
        data["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        data["machine"] = machine() | {"loadavg_at_start": load_at_start}
        write_lab_report(data, args.report_dir)
        print(json.dumps(data, indent=2))
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
                         "hosts": {h["name"]: h["timings"] for h in report["hosts"]},
                         "phases": {h["name"]: phases(report["timings"], h["timings"]) for h in report["hosts"]}})
    finally:
        lab_down(prefix=prefix)
        shutil.rmtree(work, ignore_errors=True)
    totals = [r["total_s"] for r in runs]
    return {
        "command": f"python3 bench/lab_rootfs.py --lab-up --workers {workers} --reps {reps}",
        "workers": workers, "burn_s": burn_s,
        "median_total_to_all_idle_s": statistics.median(totals),
        "median_rep": sorted(range(len(runs)), key=lambda i: totals[i])[len(runs) // 2],
        "runs": runs,
    }


def phases(lab, host):
    """[[phase, start_s, end_s]] of one host, seconds since lab up started, from lab up's timings.

    create (namespaces, veth) and mount (the host root) run in a pool that starts after the rootfs
    lookup (``rootfs_s``); cloud-init runs from ``boot_start_s`` for ``cloud_init_s``; a worker is
    "to idle" from the end of its boot (cloud-init done; sshd runs since its init stage) until sinfo shows it idle (``idle_s``)."""
    out = []
    t = lab.get("rootfs_s", 0.0)
    for name, key in (("create", "host_s"), ("mount", "root_s")):
        if key in host:
            out.append([name, round(t, 2), round(t + host[key], 2)])
            t += host[key]
    if "boot_start_s" in host and "cloud_init_s" in host:
        out.append(["cloud-init", host["boot_start_s"], round(host["boot_start_s"] + host["cloud_init_s"], 2)])
    if "boot_done_s" in host and "idle_s" in host:
        out.append(["to idle", host["boot_done_s"], host["idle_s"]])
    return out


def machine():
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_end": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def write_lab_report(data, directory):
    """lab.json, lab-timeline.png and lab.md (the same path for a run and for --replot)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lab.json").write_text(json.dumps(data, indent=2) + "\n")
    pngs = lab_plots(data, directory)
    m = data["machine"]
    rows = []
    for i, run in enumerate(data["runs"]):
        t = run["timings"]
        rows.append(f"| {i + 1} | {t.get('rootfs_s', 0):.2f} | {t.get('hosts_s', 0):.2f} | {t.get('validate_s', 0):.2f}"
                    f" | {t.get('registry_s', '-')} | {t.get('booted_s', 0):.2f} | {run['total_s']:.2f} |")
    rep = data["median_rep"]
    run = data["runs"][rep]
    host_rows = []
    for host, ph in run["phases"].items():
        cells = {name: f"{end - start:.2f}" for name, start, end in ph}
        host_rows.append(f"| {host} | " + " | ".join(cells.get(n, "-") for n in ("create", "mount", "cloud-init",
                                                                                  "to idle"))
                         + f" | {run['hosts'][host].get('idle_s', '-')} |")
    figures = "\n\n".join(f"![{name[:-4]}]({name})" for name in pngs) or "(no figure: matplotlib is missing)"
    text = f"""# Lab boot-to-idle benchmark

Generated by `bench/lab_rootfs.py --lab-up` (do not edit by hand; run it again). Raw numbers:
[lab.json](lab.json).

Command: `{data['command']}` (as root), run on {data['date']}.

What is timed: `pibake lab up` of a manager and {data['workers']} worker(s) from images burnt once before
(`burn_lab_images`, {data['burn_s']:.1f} s, not counted) and the cached lab rootfs, until every worker is
idle in sinfo; then `lab down`. {len(data['runs'])} repetitions; median total
**{data['median_total_to_all_idle_s']:.1f} s**. No goal is set for this figure.

| rep | rootfs lookup s | hosts (create + mount) s | seed validation s | registry answers at s | all booted at s | all idle at s |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Per host, rep {rep + 1} (the median one), phase durations in seconds:

| host | create | mount | cloud-init | to idle | idle at s |
|---|---|---|---|---|---|
{chr(10).join(host_rows)}

{figures}

The timeline is drawn from lab up's own timings (`bench/lab_rootfs.py --replot`): create (network
namespace, veth, UTS/mount/PID namespaces) and mount (the host's root over the shared rootfs) run in a pool
of up to 8 threads that starts after the rootfs lookup, so their start is that of the pool; cloud-init is
the host's first boot (`pibake.lab.boot.boot_host`: cloud-init's stages inside the host); "to idle" is
from the end of the boot (cloud-init done; sshd runs since its init stage) until sinfo on the manager shows the worker idle (enrolment,
slurm.conf, slurmctld restart, slurmd start).
The gaps: before the first boot every host's seed is validated (the "seed validation" column); the
manager boots first and the workers when its registry answers, as a person powering on Pis would.
Real Pis boot far slower (firmware, kernel, SD card): this is the lab's floor, not a Pi's.

## Machine

- CPU: {m['cpu']}, {m['nproc']} cores; memory {m['memory_gib']} GiB; load average {m['loadavg_at_start']} at the
  start, {m['loadavg_at_end']} at the end
- kernel {m['kernel']}, Python {m['python']}
"""
    (directory / "lab.md").write_text(text)


if __name__ == "__main__":
    main()
