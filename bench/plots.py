"""PNG figures for the bench/ reports, drawn from the reports' JSON (matplotlib, Agg backend).

Used by bench/burn, bench/deploy, bench/registry and bench/lab_rootfs.py at the end of a run and by their ``--replot``
option (figures and page again from docs/report/<name>.json, without measuring anything).
Every function returns the file names it wrote into ``out_dir`` ([] when matplotlib is missing).
"""

import sys
from pathlib import Path

MIB = 1024 * 1024
BLUE, ORANGE, GREY, RED = "#4a7ab5", "#e08a2c", "#9a9a9a", "#c0392b"


def _plt():
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("bench: matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def _save(plt, fig, out_dir, name, names):
    fig.tight_layout()
    fig.savefig(Path(out_dir) / name)
    plt.close(fig)
    names.append(name)


def burn_plots(report, out_dir):
    """burn-time.png: median seconds per tool, min-max whiskers, every run as a dot;
    burn-bytes.png: bytes written vs skipped (pibake measured; dd writes every byte by design)."""
    plt = _plt()
    if plt is None:
        return []
    names = []
    tools = list(report["seconds"])
    med = [report["median_seconds"][t] for t in tools]
    lo = [m - min(report["seconds"][t]) for t, m in zip(tools, med)]
    hi = [max(report["seconds"][t]) - m for t, m in zip(tools, med)]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.bar(range(len(tools)), med, yerr=[lo, hi], capsize=6, color=BLUE, alpha=0.8, label="median (min-max)")
    for i, t in enumerate(tools):
        ax.scatter([i] * len(report["seconds"][t]), report["seconds"][t], color="black", s=10, zorder=3,
                   label="each run" if i == 0 else None)
    ax.set_xticks(range(len(tools)), tools)
    ax.set_ylabel("seconds")
    ax.set_title(f"{report['image']['size'] // MIB} MiB image to a fresh file, {report['reps']} runs per tool")
    ax.legend(fontsize=8)
    _save(plt, fig, out_dir, "burn-time.png", names)

    p = report["pibake"]
    labels = ["pibake (sparse + verify)", "dd bs=4M conv=fsync"]
    written = [p["bytes_written"] / MIB, p["bytes_total"] / MIB]
    skipped = [p["bytes_skipped"] / MIB, 0]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    ax.barh(labels, written, color=BLUE, label="written")
    ax.barh(labels, skipped, left=written, color=GREY, label="skipped (unused blocks)")
    for y, (w, s) in enumerate(zip(written, skipped)):
        ax.text(w / 2, y, f"{w:.0f} MiB", va="center", ha="center", color="white", fontsize=9)
        if s:
            ax.text(w + s / 2, y, f"{s:.0f} MiB", va="center", ha="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("bytes written to the target")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
    _save(plt, fig, out_dir, "burn-bytes.png", names)
    return names


def deploy_plots(data, out_dir, name="deploy-tn.png"):
    """deploy-tn.png: T(N) of one parallel deploy and of the sequential loop over N (log-log),
    with the goal line 1.5 x T(1)."""
    plt = _plt()
    rows = data["results"]
    if plt is None or not rows:
        return []
    names = []
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(ns, [r["t_s"] for r in rows], "o-", color=BLUE, label="T(N): one parallel deploy")
    ax.plot(ns, [r["rerun_s"] for r in rows], "s:", color=GREY, label="re-run (nothing to change)")
    seq = data.get("sequential")
    if seq and seq.get("cumulative_s"):
        cum = seq["cumulative_s"]
        ax.plot(range(1, len(cum) + 1), cum, "-", color=ORANGE, label="T_seq(N): one host after another")
    goal = data.get("goal") or {}
    if rows[0]["n"] == 1:
        limit = goal.get("limit", 1.5)
        ax.axhline(limit * rows[0]["t_s"], color=RED, ls="--", label=f"goal: {limit} x T(1)")
    _deploy_axes(ax, ns, "pibake deploy onto N lab hosts")
    _save(plt, fig, out_dir, name, names)
    return names


def _deploy_axes(ax, ns, title):
    """T(N) axes of the deploy figures: log-log, a tick per measured N."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N hosts")
    ax.set_ylabel("seconds until all idle (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def deploy_peer_plots(data, out_dir):
    """deploy-peers.png: T(N) of pibake, ansible-playbook and pyinfra doing the same deploy (log-log)."""
    plt = _plt()
    peers = data.get("peers") or {}
    if plt is None or not peers:
        return []
    names = []
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    series = {"pibake deploy": [(r["n"], r["t_s"]) for r in data.get("results", [])]}
    series.update({{"ansible": "ansible-playbook -f N"}.get(t, f"{t} --parallel N"): [(r["n"], r["t_s"]) for r in runs]
                   for t, runs in peers.items()})
    ns = sorted({n for pts in series.values() for n, _ in pts})
    for (label, pts), (color, mark) in zip(series.items(), ((BLUE, "o-"), (ORANGE, "s-"), (GREY, "^-"))):
        if pts:
            ax.plot([n for n, _ in pts], [t for _, t in pts], mark, color=color, label=label)
    _deploy_axes(ax, ns, "the same deploy onto N lab hosts, same run")
    _save(plt, fig, out_dir, "deploy-peers.png", names)
    return names


LAB_COLORS = {"create": GREY, "mount": ORANGE, "cloud-init": BLUE, "to idle": "#5aa469"}


def lab_plots(data, out_dir):
    """lab-timeline.png: per host of the median rep, its phases (create, mount, cloud-init, to idle) as
    bars on one time axis (seconds since lab up started; ``phases`` = [[name, start_s, end_s], ...])."""
    plt = _plt()
    if plt is None or not data.get("runs"):
        return []
    names = []
    rep = data.get("median_rep", 0)
    run = data["runs"][rep]
    hosts = list(run["phases"])
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(hosts) + 1.8), dpi=100)
    seen = set()
    for y, host in enumerate(hosts):
        for name, start, end in run["phases"][host]:
            ax.barh(y, end - start, left=start, color=LAB_COLORS.get(name, RED),
                    label=None if name in seen else name)
            seen.add(name)
    ax.set_yticks(range(len(hosts)), hosts)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since lab up started")
    ax.set_title(f"pibake lab up, rep {rep + 1} of {len(data['runs'])} (the median one): "
                 f"all idle at {run['total_s']:.1f} s")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    ax.grid(True, axis="x", alpha=0.3)
    _save(plt, fig, out_dir, "lab-timeline.png", names)
    return names


REGISTRY_COLORS = (BLUE, ORANGE, "#5aa469", GREY, "#8e6bbf")


def _enrol_runs(data):
    return [r for r in data.get("runs", []) if r["kind"] == "enrol" and r.get("latencies_ms")]


def _run_label(data, run):
    """``50 concurrent`` for the main server settings, ``50 concurrent, 2x8 threads`` for another."""
    label = f"{run['concurrency']} concurrent"
    if run.get("threads", data["server"]["threads"]) != data["server"]["threads"]:
        label += f", {run['workers']}x{run['threads']} threads"
    return label


def registry_plots(data, out_dir):
    """registry-latency.png: enrolment latency CDF per concurrency (log x), p50/p95/p99 of the goal run
    marked, the p99 target as a dashed line; registry-timeline.png: completions per 100 ms and each
    request's latency at its start time for the two highest concurrencies; registry-generation.png:
    slurm.conf generation time against the node count with the 100 ms goal."""
    plt = _plt()
    runs = _enrol_runs(data)
    if plt is None or not runs:
        return []
    names = []
    goal_ms = data["goals"]["p99_ms"]
    goal_c = runs[0]["concurrency"]

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    for color, run in zip(REGISTRY_COLORS, runs):
        lat = sorted(run["latencies_ms"])
        n = len(lat)
        ax.step(lat, [(i + 1) / n for i in range(n)], where="post", color=color,
                ls="-" if run is runs[0] or run.get("threads") == runs[0].get("threads") else ":",
                label=f"{_run_label(data, run)}: p50 {run['p50_ms']:.0f}, p99 {run['p99_ms']:.0f} ms")
        if run is runs[0]:
            for q, marker in ((50, "o"), (95, "s"), (99, "D")):
                ax.plot([run[f"p{q}_ms"]], [q / 100], marker, color=color, ms=6)
            ax.text(0.98, 0.04, f"{goal_c} concurrent (markers): p50 {run['p50_ms']:.0f} ms (o), "
                    f"p95 {run['p95_ms']:.0f} ms (s), p99 {run['p99_ms']:.0f} ms (D)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=8, color=color,
                    bbox={"facecolor": "white", "edgecolor": GREY, "alpha": 0.9})
    ax.axvline(goal_ms, color=RED, ls="--", label=f"target p99 < {goal_ms:.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("enrolment latency, ms (log)")
    ax.set_ylabel("fraction of enrolments")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{runs[0]['requests']} enrolments over TLS, fresh registry per run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(plt, fig, out_dir, "registry-latency.png", names)

    main = [r for r in runs if r.get("threads", data["server"]["threads"]) == data["server"]["threads"]]
    shown = sorted(main, key=lambda r: -r["concurrency"])[:2]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.2), dpi=100, sharex=True)
    for color, run in zip(REGISTRY_COLORS, shown):
        ends = sorted(s + lat / 1000 for s, lat in zip(run["starts_s"], run["latencies_ms"]))
        bins = int(ends[-1] / 0.1) + 1
        counts = [0] * bins
        for end in ends:
            counts[int(end / 0.1)] += 1
        top.step([i * 0.1 for i in range(bins)], [c * 10 for c in counts], where="post", color=color,
                 label=f"{run['concurrency']} concurrent ({run['throughput_per_s']:.0f}/s overall)")
        bottom.scatter(run["starts_s"], run["latencies_ms"], s=3, color=color, alpha=0.6,
                       label=f"{run['concurrency']} concurrent")
    bottom.axhline(goal_ms, color=RED, ls="--", label=f"{goal_ms:.0f} ms")
    top.set_ylabel("enrolments/s (per 100 ms)")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("latency, ms")
    bottom.set_xlabel("seconds since the run started")
    bottom.legend(fontsize=8, markerscale=3)
    bottom.grid(True, alpha=0.3)
    top.set_title("throughput and latency over the run (nodes enrolled grows from 0 to "
                  f"{shown[0]['requests']})")
    _save(plt, fig, out_dir, "registry-timeline.png", names)

    gen = data.get("generation") or []
    if gen:
        fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
        ax.plot([g["nodes"] for g in gen], [g["median_ms"] for g in gen], "o-", color=BLUE,
                label="generate_slurm_conf, median of 5")
        ax.axhline(data["goals"]["generation_ms"], color=RED, ls="--",
                   label=f"goal < {data['goals']['generation_ms']:.0f} ms at 1000 nodes")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("enrolled nodes (log)")
        ax.set_ylabel("ms (log)")
        ax.set_title("slurm.conf generation time against the node count (Pi 3/4/5 mix)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _save(plt, fig, out_dir, "registry-generation.png", names)
    return names


TARGET_PHASES = (("power-on to kernel", "kernel", GREY), ("kernel to systemd", "systemd", "#8e6bbf"),
                 ("systemd to login prompt", "login_prompt", BLUE), ("to cloud-init done", "cloud_init_done",
                                                                      ORANGE),
                 ("to enrolled", "enrolled", "#5aa469"), ("to idle in sinfo", "idle", RED))


def target_plots(data, out_dir):
    """target-timeline.png: per rep, the emulated worker's phases as consecutive bars (seconds since power-on)."""
    plt = _plt()
    if plt is None or not data.get("runs"):
        return []
    names = []
    runs = data["runs"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(runs) + 2.4), dpi=100)
    seen = set()
    for y, run in enumerate(runs):
        start = 0.0
        for label, key, color in TARGET_PHASES:
            end = run["phases"].get(key)
            if end is None:
                continue
            ax.barh(y, end - start, left=start, color=color, label=None if label in seen else label)
            seen.add(label)
            start = end
    ax.set_yticks(range(len(runs)), [f"rep {i + 1}" for i in range(len(runs))])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since power-on (qemu-system-aarch64, TCG: emulated, not a Pi's speed)")
    ax.set_title("emulated arm64 worker: power-on to idle in sinfo")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    ax.grid(True, axis="x", alpha=0.3)
    _save(plt, fig, out_dir, "target-timeline.png", names)
    return names
