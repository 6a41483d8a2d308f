"""Must show (issue 6), on lab hosts with real Slurm, munge, OpenSSH and the registry: `pibake verify` exits 0
on a healthy 3-worker cluster; a node whose clock is 10 minutes off is named (clock-skew and munge); a
stopped host and a burned card that never enrolled are named. Tests run in file order on one cluster."""

import json

from tests.e2e.verify_fixtures import verify_lab  # noqa: F401  (fixture)
from tests.e2e.verify_fixtures import WORKERS, doc_blocks, keys_of


def by_name(report):
    return {c["name"]: c for c in report["checks"]}


def test_verify_passes_on_a_healthy_cluster(verify_lab):
    code, report, err = verify_lab.verify()
    checks = by_name(report)
    assert code == 0, f"{err}\n{report}"
    assert report["ok"] is True
    assert list(checks) == ["registry", "expected-nodes", "reachable", "sinfo-idle", "srun", "munge", "clock-skew",
                            "slurm-conf"]
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert [n["hostname"] for n in report["nodes"]] == list(WORKERS)
    assert {n["via"] for n in report["nodes"]} == {"ssh"}
    assert checks["srun"]["summary"] == "srun -N3 hostname returned every node name"
    assert sorted(checks["clock-skew"]["data"]["skew_s"]) == list(WORKERS)
    # configless slurmd 22.05 keeps the fetched file in its spool's conf-cache
    paths = set(checks["slurm-conf"]["data"]["node_paths"].values())
    assert paths <= {"/var/spool/slurmd/conf-cache/slurm.conf", "/run/slurm/conf/slurm.conf"}, paths


def test_human_output_and_report_files(verify_lab, tmp_path):
    out_dir = tmp_path / "report"
    code, out, err = verify_lab.cli("verify", "--user", "root", "-i", str(verify_lab.key), "--known-hosts",
                                    str(verify_lab.known_hosts), "--report", str(out_dir))
    assert code == 0, err
    assert out == ""  # human output goes to stderr
    assert "ok   clock-skew" in err and "verify: all checks passed" in err
    assert (out_dir / "report.json").exists() and "All checks passed" in (out_dir / "report.md").read_text()
    latest = verify_lab.c.cluster_dir / "reports" / "latest"
    assert latest.resolve() == out_dir.resolve()


def test_every_command_of_docs_verify_md_runs(verify_lab):
    blocks = doc_blocks("verify.md")
    assert list(blocks) == ["verify-run", "verify-json", "verify-report", "verify-bench"]
    for name in ("verify-run", "verify-json", "verify-report"):
        _script, commands, sample = blocks[name]
        for argv, expected in commands:
            assert argv[0] == "pibake"
            code, out, err = verify_lab.cli(*argv[1:], *verify_lab.ssh_args, cwd=str(verify_lab.tmp))
            assert code == expected, f"{name}: {argv} exited {code}: {err}"
        if sample is not None:
            assert keys_of(sample) == keys_of(json.loads(out)), name
    assert json.loads((verify_lab.tmp / "reports" / "today" / "report.json").read_text())["ok"] is True


def test_bench_writes_the_report_the_registry_page_shows(verify_lab):
    """docs/verify.md's verify-bench block, run with --json added to read its result."""
    (argv, _code), = doc_blocks("verify.md")["verify-bench"][1]
    assert argv == ["pibake", "verify", "--bench"]
    code, report, err = verify_lab.verify(*argv[2:])
    assert code == 0, f"{err}\n{report.get('bench')}"
    bench = report["bench"]
    assert bench["ok"] is True and bench["nodes"] == list(WORKERS)
    one, every = bench["srun_latency"]
    assert (one["nodes"], every["nodes"]) == (1, 3) and one["runs"] == every["runs"] == 10
    assert one["failures"] == every["failures"] == 0 and 0 < one["p50_s"] <= one["p95_s"]
    assert bench["sbatch"]["jobs"] == 20 and bench["sbatch"]["jobs_per_s"] > 0
    for node in WORKERS:
        assert bench["cpu_sha256"][node]["mb_per_s"] > 0 and bench["disk_write"][node]["mb_per_s"] > 0
    assert bench["network"]["status"] == "ok"  # iperf3 is installed in the lab (shared root)
    assert [(p["from"], p["to"]) for p in bench["network"]["pairs"]] == [("w2", "w1"), ("w3", "w2"), ("w1", "w3")]
    assert all(p["mbit_per_s"] > 0 for p in bench["network"]["pairs"])
    out = verify_lab.c.cluster_dir / "reports" / "latest"
    assert report["report_dir"] and out.resolve() == type(out)(report["report_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["cpu.png", "disk.png", "network.png", "report.json",
                                                     "report.md", "srun_latency.png"]
    assert json.loads((out / "report.json").read_text())["bench"]["plots"] == bench["plots"]
    md = (out / "report.md").read_text()
    assert "## Benchmarks" in md and "jobs/s" in md
    from pibake.registry.web import latest_report
    page = latest_report(verify_lab.c.cluster_dir)
    assert page["ok"] is True and page["plots"] == bench["plots"] and page["bench_rows"]


def test_a_clock_ten_minutes_off_is_named(verify_lab):
    verify_lab.skew_clock("w2", "+600s")
    try:
        code, report, _err = verify_lab.verify()
    finally:
        verify_lab.restore_clock("w2")
    checks = by_name(report)
    assert code == 1 and report["ok"] is False
    skew = checks["clock-skew"]
    assert skew["status"] == "fail"
    assert skew["summary"].startswith("w2's clock is 60") and "s ahead of the manager (mgr): munge rejects its " \
        "credentials (limit 300 s); check time sync (timesyncd/chrony) on w2" in skew["summary"]
    assert 590 < skew["data"]["skew_s"]["w2"] < 610
    assert abs(skew["data"]["skew_s"]["w1"]) < 30 and abs(skew["data"]["skew_s"]["w3"]) < 30
    # munge itself rejects the skewed node's credentials, both ways
    munge = checks["munge"]
    assert munge["status"] == "fail"
    assert munge["details"] == ["w2: the manager's credential does not decode there: Expired credential",
                                "w2: its credential does not decode on the manager: Rewound credential"]
    assert "clock-skew" in munge["action"]
    # and so does slurmd on w2 (it authenticates srun's launch request with its skewed munged)
    # (the whole step may abort, so the other nodes can be missing from its output too)
    assert checks["srun"]["status"] == "fail" and "w2" in checks["srun"]["data"]["missing"]
    for name in ("registry", "reachable", "slurm-conf"):
        assert checks[name]["status"] == "ok", checks[name]
    # clock fixed: munge and the clocks agree again at once (the job step that failed on w2 leaves it
    # "completing*" in sinfo until slurmctld's next ping, which verify would rightly report meanwhile)
    _code, report, _err = verify_lab.verify()
    assert by_name(report)["munge"]["status"] == "ok" and by_name(report)["clock-skew"]["status"] == "ok"


def test_a_stopped_host_and_a_card_that_never_enrolled_are_named(verify_lab):
    from pibake.bake import manifest

    c = verify_lab.c
    burn = manifest.start(c.cluster_dir, hostname="w9", ip=c.ip(19), role="worker", target="w9.img",
                          target_kind="file")
    manifest.finish(c.cluster_dir, burn, "complete")
    c.hosts["w3"].destroy()  # powered off
    code, report, _err = verify_lab.verify()
    checks = by_name(report)
    assert code == 1
    assert checks["reachable"]["status"] == "fail" and checks["reachable"]["data"]["unreachable"] == ["w3"]
    assert checks["reachable"]["details"][0].startswith("w3: unreachable over ssh: ")
    assert "check that w3 is powered on" in checks["reachable"]["action"]
    assert checks["srun"]["status"] == "fail" and "w3" in checks["srun"]["data"]["missing"]
    assert "w3: not tried (unreachable)" in checks["srun"]["details"]
    assert checks["expected-nodes"]["status"] == "fail"
    assert checks["expected-nodes"]["details"][0].startswith("w9: card burned (") and \
        checks["expected-nodes"]["details"][0].endswith(") but it never enrolled")
    assert checks["munge"]["status"] == "ok" and checks["clock-skew"]["status"] == "ok"  # w1, w2 still fine
