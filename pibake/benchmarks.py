"""``pibake verify --bench``: what the cluster can do, measured on the cluster itself.

* srun launch latency: ``srun -N1 true`` and ``srun -N<all> true`` repeated, timed on the manager (p50/p95);
* sbatch throughput: a burst of tiny jobs (``sbatch --wrap true``), jobs/s until the last one finished;
* CPU per node: sha256 over a fixed amount of zero bytes, run through ``srun -w <node>`` (MB/s);
* disk write per node: ``dd ... conv=fdatasync`` of a bounded size into the node's own /var/tmp (MB/s);
* network node to node: ``iperf3`` between neighbours in a ring when installed, else skipped (Mbit/s).

Timing loops run on the manager/node itself (shell + ``date +%s%N``), so ssh round trips are not counted.
``run_bench`` returns a JSON-able dict; ``write_plots`` draws PNGs with matplotlib (Agg backend).
"""

import json
import logging

LOG = logging.getLogger(__name__)

LATENCY_SCRIPT = (
    'n=$1; k=$2; i=0\n'
    'while [ "$i" -lt "$k" ]; do i=$((i+1)); s=$(date +%s%N)\n'
    '  if srun --immediate=20 -N"$n" true >/dev/null 2>&1; then e=$(date +%s%N); echo "ok $((e-s))"; '
    'else echo fail; fi\n'
    'done\n'
)
SBATCH_SCRIPT = (
    'm=$1; s=$(date +%s%N); ids=""; i=0\n'
    'while [ "$i" -lt "$m" ]; do i=$((i+1))\n'
    '  id=$(sbatch --parsable -o /dev/null -e /dev/null --wrap true) || { echo "fail sbatch"; exit 1; }\n'
    '  ids="$ids,${id%%;*}"\n'
    'done\n'
    'ids=${ids#,}; t=0\n'
    'while [ -n "$(squeue -h -j "$ids" -t PENDING,RUNNING,COMPLETING,CONFIGURING -o %i 2>/dev/null)" ]; do\n'
    '  sleep 0.1; t=$((t+1)); [ "$t" -gt 1200 ] && { echo "fail timeout"; exit 1; }\n'
    'done\n'
    'e=$(date +%s%N); echo "ok $((e-s))"\n'
)
CPU_SCRIPT = ('s=$(date +%s%N); head -c $(($1*1048576)) /dev/zero | sha256sum >/dev/null; e=$(date +%s%N); '
              'echo "ok $((e-s))"')
DISK_SCRIPT = (
    'd=$(mktemp -d /var/tmp/pibake-bench.XXXXXX) || exit 1; s=$(date +%s%N)\n'
    'dd if=/dev/zero of="$d/write" bs=1M count="$1" conv=fdatasync 2>/dev/null; rc=$?; e=$(date +%s%N)\n'
    'rm -rf "$d"; [ "$rc" -eq 0 ] && echo "ok $((e-s))" || echo "fail dd exited $rc"\n'
)


def percentile(values, q):
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    values = sorted(values)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def parse_timings(text):
    """Lines 'ok <ns>' / 'fail ...' -> (seconds list, failures)."""
    secs, fails = [], 0
    for line in (text or "").splitlines():
        parts = line.split()
        if parts[:1] == ["ok"] and len(parts) > 1 and parts[1].isdigit():
            secs.append(int(parts[1]) / 1e9)
        elif parts[:1] == ["fail"]:
            fails += 1
    return secs, fails


def parse_iperf3(text):
    """Mbit/s received from ``iperf3 -J`` output, or None."""
    try:
        data = json.loads(text)
        return data["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError, TypeError):
        return None


def _latency(target, n, repeats):
    out = target.manager_run(["sh", "-c", LATENCY_SCRIPT, "sh", str(n), str(repeats)], timeout=60 + 30 * repeats)
    secs, fails = parse_timings(out.stdout)
    return {"nodes": n, "runs": len(secs), "failures": fails + (0 if out.ok else 1),
            "p50_s": _r(percentile(secs, 50)), "p95_s": _r(percentile(secs, 95)), "samples_s": [_r(s) for s in secs]}


def _r(x, nd=4):
    return None if x is None else round(x, nd)


def run_bench(target, nodes, *, progress=None, repeats=10, jobs=20, cpu_mb=256, disk_mb=64, iperf_seconds=1):
    """Run the benchmarks on ``nodes`` (reachable workers) through ``target`` (a verify.Target)."""
    say = progress or (lambda message: None)
    nodes = list(nodes)
    result = {"ok": True, "nodes": nodes,
              "parameters": {"repeats": repeats, "jobs": jobs, "cpu_mb": cpu_mb, "disk_mb": disk_mb,
                             "iperf_seconds": iperf_seconds}}
    if not nodes:
        result.update(ok=False, error="no reachable nodes to benchmark")
        return result
    say("bench: srun launch latency")
    result["srun_latency"] = [_latency(target, 1, repeats), _latency(target, len(nodes), repeats)]
    say("bench: sbatch throughput")
    out = target.manager_run(["sh", "-c", SBATCH_SCRIPT, "sh", str(jobs)], timeout=180)
    secs, _ = parse_timings(out.stdout)
    result["sbatch"] = {"jobs": jobs, "elapsed_s": _r(secs[0]) if secs else None,
                        "jobs_per_s": _r(jobs / secs[0], 2) if secs and secs[0] > 0 else None,
                        "error": None if secs else (out.stdout.strip() or out.reason())}
    say("bench: CPU per node")
    cpu = {}
    for n in nodes:
        out = target.manager_run(["srun", "--immediate=20", "-N1", "-w", n, "sh", "-c", CPU_SCRIPT, "sh",
                                  str(cpu_mb)], timeout=300)
        secs, _ = parse_timings(out.stdout)
        cpu[n] = {"elapsed_s": _r(secs[0]) if secs else None,
                  "mb_per_s": _r(cpu_mb / secs[0], 1) if secs and secs[0] > 0 else None,
                  "error": None if secs else out.reason()}
    result["cpu_sha256"] = cpu
    say("bench: disk write per node")
    outs = {n: target.connectors.run(n, ["sh", "-c", DISK_SCRIPT, "sh", str(disk_mb)], timeout=300) for n in nodes}
    disk = {}
    for n, out in outs.items():
        secs, _ = parse_timings(out.stdout)
        disk[n] = {"elapsed_s": _r(secs[0]) if secs else None,
                   "mb_per_s": _r(disk_mb / secs[0], 1) if secs and secs[0] > 0 else None,
                   "error": None if secs else (out.stdout.strip() or out.reason())}
    result["disk_write"] = disk
    say("bench: network")
    result["network"] = _network(target, nodes, iperf_seconds)
    failed = [n for n in nodes if cpu[n]["mb_per_s"] is None or disk[n]["mb_per_s"] is None]
    if failed or result["sbatch"]["jobs_per_s"] is None or any(x["runs"] == 0 for x in result["srun_latency"]):
        result["ok"] = False
        result["error"] = "some measurements failed" + (f" on {', '.join(failed)}" if failed else "")
    return result


def _network(target, nodes, seconds):
    if len(nodes) < 2:
        return {"status": "skip", "reason": "needs two nodes", "pairs": []}
    have = target.connectors.run_many(nodes, ["sh", "-c", "command -v iperf3"], timeout=20)
    missing = [n for n, o in have.items() if not o.ok]
    if missing:
        return {"status": "skip", "reason": f"iperf3 is not installed on {', '.join(missing)} "
                "(apt-get install iperf3)", "pairs": []}
    addresses = getattr(target.connectors.remote, "addresses", {}) or {}
    pairs = []
    for i, server in enumerate(nodes):
        client = nodes[(i + 1) % len(nodes)]
        if client == server:
            continue
        start = target.connectors.run(server, ["iperf3", "-s", "-1", "-D", "-p", "5201"], timeout=20)
        if not start.ok:
            pairs.append({"from": client, "to": server, "mbit_per_s": None, "error": start.reason()})
            continue
        out = target.connectors.run(client, ["iperf3", "-c", addresses.get(server, server), "-p", "5201",
                                             "-t", str(seconds), "-J"], timeout=seconds + 30)
        mbit = parse_iperf3(out.stdout)
        pairs.append({"from": client, "to": server, "mbit_per_s": _r(mbit, 1),
                      "error": None if mbit is not None else out.reason()})
        if len(nodes) == 2:
            break
    return {"status": "ok", "pairs": pairs}


def bench_markdown(bench):
    lines = ["## Benchmarks", ""]
    if bench.get("error"):
        lines += [f"Problem: {bench['error']}", ""]
    if "srun_latency" in bench:
        lines += ["| srun | runs | p50 (s) | p95 (s) |", "|---|---|---|---|"]
        for lat in bench["srun_latency"]:
            lines.append(f"| -N{lat['nodes']} true | {lat['runs']} | {lat['p50_s']} | {lat['p95_s']} |")
        sb = bench["sbatch"]
        lines += ["", f"sbatch: {sb['jobs']} tiny jobs in {sb['elapsed_s']} s = **{sb['jobs_per_s']} jobs/s**", "",
                  "| node | CPU sha256 (MB/s) | disk write fdatasync (MB/s) |", "|---|---|---|"]
        for n in bench["nodes"]:
            lines.append(f"| {n} | {bench['cpu_sha256'][n]['mb_per_s']} | {bench['disk_write'][n]['mb_per_s']} |")
        net = bench["network"]
        lines.append("")
        if net["status"] == "skip":
            lines.append(f"network: skipped ({net['reason']})")
        else:
            lines += ["| from | to | iperf3 (Mbit/s) |", "|---|---|---|"]
            lines += [f"| {p['from']} | {p['to']} | {p['mbit_per_s']} |" for p in net["pairs"]]
    if bench.get("plots_error"):
        lines += ["", bench["plots_error"]]
    for name in bench.get("plots", []):
        lines += ["", f"![{name}]({name})"]
    return lines


def write_plots(bench, out_dir):
    """PNG plots of the measurements into ``out_dir``; returns their file names."""
    if "srun_latency" not in bench:
        return []
    try:
        import matplotlib  # start-up: matplotlib loads only to draw the plots
    except ImportError:
        LOG.warning("matplotlib is not installed: the report has no plots (pip install matplotlib)")
        bench["plots_error"] = "no plots: matplotlib is not installed on the machine that ran verify"
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: matplotlib loads only to draw the plots

    names = []

    def bar(filename, title, labels, values, ylabel):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        ax.bar(labels, [v or 0 for v in values], color="#4a7ab5")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        names.append(filename)

    lat = bench["srun_latency"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for i, x in enumerate(lat):
        ax.scatter([i] * len(x["samples_s"]), x["samples_s"], alpha=0.5, color="#4a7ab5")
        if x["p50_s"] is not None:
            ax.hlines([x["p50_s"], x["p95_s"]], i - 0.3, i + 0.3, colors=["black", "red"])
    ax.set_xticks(range(len(lat)), [f"srun -N{x['nodes']} true" for x in lat])
    ax.set_ylabel("seconds (black p50, red p95)")
    ax.set_title("srun launch latency")
    fig.tight_layout()
    fig.savefig(out_dir / "srun_latency.png")
    plt.close(fig)
    names.append("srun_latency.png")
    nodes = bench["nodes"]
    bar("cpu.png", "CPU: sha256 of zeros per node", nodes, [bench["cpu_sha256"][n]["mb_per_s"] for n in nodes],
        "MB/s")
    bar("disk.png", "disk write with fdatasync per node", nodes,
        [bench["disk_write"][n]["mb_per_s"] for n in nodes], "MB/s")
    if bench["network"]["status"] == "ok" and bench["network"]["pairs"]:
        pairs = bench["network"]["pairs"]
        bar("network.png", "iperf3 node to node", [f"{p['from']}->{p['to']}" for p in pairs],
            [p["mbit_per_s"] for p in pairs], "Mbit/s")
    return names


def summary_rows(bench):
    """(label, value) rows for the registry page's table."""
    rows = []
    for lat in bench.get("srun_latency", []):
        rows.append((f"srun -N{lat['nodes']} true p50 / p95", f"{lat['p50_s']} s / {lat['p95_s']} s"))
    if "sbatch" in bench:
        rows.append(("sbatch throughput", f"{bench['sbatch']['jobs_per_s']} jobs/s"))
    for n in bench.get("nodes", []):
        if n in bench.get("cpu_sha256", {}):
            rows.append((f"{n} CPU / disk", f"{bench['cpu_sha256'][n]['mb_per_s']} MB/s / "
                                            f"{bench['disk_write'][n]['mb_per_s']} MB/s"))
    net = bench.get("network", {})
    if net.get("status") == "skip":
        rows.append(("network", f"skipped: {net['reason']}"))
    for p in net.get("pairs", []):
        rows.append((f"network {p['from']} -> {p['to']}", f"{p['mbit_per_s']} Mbit/s"))
    return rows
