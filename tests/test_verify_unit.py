"""verify's check logic on recorded outputs (munge 0.5.15, Slurm 22.05, Debian 12), without a cluster.

The munge outputs below were recorded with two real munged daemons sharing a key, one of them started under
libfaketime (FAKETIME=+600s): a credential it encodes is "Rewound" for the other, and the other's credential is
"Expired" for it. "Invalid credential" came from two daemons with different keys.
"""

import json

import pytest

from pibake import verify as v
from pibake.benchmarks import parse_iperf3, parse_timings, percentile
from pibake.connect import Connectors, Output, SshConnector
from tests.fixtures_plugin import new_cluster

UNMUNGE_OK = """STATUS:          Success (0)
ENCODE_HOST:     localhost (127.0.0.1)
ENCODE_TIME:     2026-11-25 15:31:46 +0000 (1795620706)
DECODE_TIME:     2026-11-25 15:31:46 +0000 (1795620706)
TTL:             300
CIPHER:          aes128 (4)
MAC:             sha256 (5)
ZIP:             none (0)
UID:             root (0)
GID:             root (0)
LENGTH:          0

"""
UNMUNGE_REWOUND = UNMUNGE_OK.replace("Success (0)", "Rewound credential (16)")
UNMUNGE_EXPIRED = UNMUNGE_OK.replace("Success (0)", "Expired credential (15)")
UNMUNGE_INVALID_ERR = "unmunge: Error: Invalid credential\n"
UNMUNGE_NO_DAEMON_ERR = ('unmunge: Error: Failed to access "/run/munge/munge.socket.2": No such file or directory '
                         '(Did you start munged?)\n')
SINFO = "w1|idle|none\nw2|idle|none\nw3|down*|Not responding\nw2|idle|none\n"
FACTS = ("hostname=w1\ntime=1795620706.123456789\n"
         "conf=5d41402abc4b2a76b9719d911017c592aa5d41402abc4b2a76b9719d911017c5 /var/spool/slurmd/conf-cache/slurm.conf\n"
         "cred=MUNGE:AwQFAABC9RF6z588SFYwBpGB49lQSYZmNV:\n")


def test_parse_unmunge_recorded_outputs():
    assert v.parse_unmunge(0, UNMUNGE_OK, "") == (True, "Success")
    assert v.parse_unmunge(16, UNMUNGE_REWOUND, "") == (False, "Rewound credential")
    assert v.parse_unmunge(15, UNMUNGE_EXPIRED, "") == (False, "Expired credential")
    assert v.parse_unmunge(14, "", UNMUNGE_INVALID_ERR) == (False, "Invalid credential")
    ok, msg = v.parse_unmunge(6, "", UNMUNGE_NO_DAEMON_ERR)
    assert not ok and "Did you start munged?" in msg
    assert v.parse_unmunge(255, "", "") == (False, "unmunge exited with 255")


def test_parse_verify_facts_and_sinfo_reasons():
    facts = v.parse_verify_facts(FACTS + "garbage line\n")
    assert facts["hostname"] == "w1" and facts["time"] == pytest.approx(1795620706.123456789)
    assert facts["conf"] == ("5d41402abc4b2a76b9719d911017c592aa5d41402abc4b2a76b9719d911017c5",
                             "/var/spool/slurmd/conf-cache/slurm.conf")
    assert facts["cred"].startswith("MUNGE:")
    assert v.parse_verify_facts("munge_error=munge: Error: Failed to access\n") == {
        "munge_error": "munge: Error: Failed to access"}
    assert v.parse_sinfo_reasons(SINFO) == {"w1": ("idle", ""), "w2": ("idle", ""), "w3": ("down*", "Not responding")}


def test_idle_check_names_the_others_with_state_and_reason():
    r = v.check_idle(["w1", "w2", "w3", "w4"], v.parse_sinfo_reasons(SINFO), None)
    assert r.status == "fail"
    assert r.details == ["w3: down* (Not responding)", "w4: not in sinfo (slurm.conf does not list it)"]
    assert "scontrol update" in r.action
    assert v.check_idle(["w1", "w2"], v.parse_sinfo_reasons(SINFO), None).status == "ok"
    r = v.check_idle(["w1"], {}, "slurm_load_partitions: Unable to contact slurm controller")
    assert r.status == "fail" and "slurmctld" in r.action


def test_idle_check_names_the_switch_that_can_recover_a_down_node():
    r = v.check_idle(["w1", "w3"], v.parse_sinfo_reasons(SINFO), None, plugs={"w3": "pi3", "w1": "pi1"})
    assert r.details == ["w3: down* (Not responding); switch pi3 powers it: `pibake recover w3` power-cycles it "
                         "if it hangs"]


def test_expected_nodes_names_burned_cards_that_never_enrolled_and_incomplete_burns():
    burned = {
        "red00": {"role": "manager", "status": "complete"},
        "red01": {"role": "worker", "status": "complete", "finished": "2026-11-25T10:00:00Z"},
        "red02": {"role": "worker", "status": "complete", "finished": "2026-11-25T10:05:00Z"},
        "red03": {"role": "worker", "status": "incomplete", "reason": "the burn never finished (card pulled)"},
    }
    planned = {"red01": "worker", "red04": "worker"}
    enrolled = {"red01": {"status": "ready"}, "red05": {"status": "pending"}}
    r = v.check_expected(burned, planned, enrolled, "red00")
    assert r.status == "fail"
    assert r.details == [
        "red02: card burned (2026-11-25T10:05:00Z) but it never enrolled",
        "red03: its latest burn is incomplete (the burn never finished (card pulled))",
        "red04: planned (plan.yaml) but never burned, deployed or enrolled",
        "red05: enrolled but pending approval",
    ]
    assert "power red02 on" in r.action and "pibake burn --hostname red03" in r.action
    assert "pibake registry accept red05" in r.action
    assert r.data["expected"] == ["red01", "red02", "red03", "red04"]
    ok = v.check_expected({}, {}, {"w1": {"status": "ready"}}, "mgr")
    assert ok.status == "ok" and "no burn manifest or plan" in ok.summary
    assert v.check_expected(burned, planned, None, "red00").status == "skip"


def test_skew_diagnosis_in_plain_language():
    offsets = {"mgr": (0.01, 0.001), "w1": (0.2, 0.01), "w2": (612.4, 0.01), "w3": (-45.0, 0.01)}
    r = v.check_skew("mgr", offsets, ["w1", "w2", "w3"])
    assert r.status == "fail"
    assert r.summary == ("w2's clock is 612 s ahead of the manager (mgr): munge rejects its credentials "
                         "(limit 300 s); check time sync (timesyncd/chrony) on w2")
    assert "w3's clock is 45 s behind the manager (mgr): within munge's 300 s but drifting" in r.details[1]
    assert r.data["skew_s"] == {"w1": 0.19, "w2": 612.39, "w3": -45.01}
    good = v.check_skew("mgr", {"mgr": (0, 0), "w1": (0.5, 0.1)}, ["w1"])
    assert good.status == "ok" and "w1" not in good.summary
    assert v.check_skew("mgr", {}, ["w1"]).status == "skip"
    assert "behind" in v.describe_skew("w9", "mgr", -301)


def test_munge_check_both_directions_and_what_to_do():
    mf = {"cred": "MUNGE:x"}
    ok = v.check_munge("mgr", mf, {"w1": (True, "Success")}, {"w1": (True, "Success")}, ["w1"])
    assert ok.status == "ok"
    skewed = v.check_munge("mgr", mf, {"w1": (True, "Success"), "w2": (False, "Expired credential")},
                           {"w1": (True, "Success"), "w2": (False, "Rewound credential")}, ["w1", "w2"])
    assert skewed.status == "fail" and skewed.details == [
        "w2: the manager's credential does not decode there: Expired credential",
        "w2: its credential does not decode on the manager: Rewound credential"]
    assert "clock-skew" in skewed.action
    key = v.check_munge("mgr", mf, {"w1": (False, "Invalid credential")}, {"w1": (False, "Invalid credential")},
                        ["w1"])
    assert "munge key differs" in key.action
    dead = v.check_munge("mgr", mf, {"w1": (True, "Success")}, {}, ["w1"])
    assert dead.details == ["w1: cannot make a credential there (munged not running?)"]
    assert v.check_munge("mgr", {"munge_error": "munge: Error: x"}, {}, {}, ["w1"]).status == "fail"
    # no node reached: the cross-host check did not happen, so it must not read as passed
    assert v.check_munge("mgr", mf, {}, {}, []).status == "skip"


def test_conf_check_compares_hashes():
    mf = {"conf": ("aaa", "/etc/slurm/slurm.conf")}
    nodes = {"w1": {"conf": ("aaa", "/var/spool/slurmd/conf-cache/slurm.conf")},
             "w2": {"conf": ("bbb", "/var/spool/slurmd/conf-cache/slurm.conf")}, "w3": {}}
    r = v.check_conf("mgr", mf, nodes, ["w1", "w2", "w3"])
    assert r.status == "fail"
    assert r.details[0] == "w2: /var/spool/slurmd/conf-cache/slurm.conf differs from the manager's /etc/slurm/slurm.conf"
    assert r.details[1].startswith("w3: slurmd has no slurm.conf")
    assert "scontrol reconfigure" in r.action
    assert v.check_conf("mgr", mf, {"w1": nodes["w1"]}, ["w1"]).status == "ok"
    assert v.check_conf("mgr", {}, nodes, ["w1"]).status == "fail"


def test_reachable_and_srun_name_the_missing_nodes():
    outs = {"w1": Output("w1", 0, "x"), "w2": Output("w2", 255, "", "ssh: connect to host 10.77.0.12 port 22: "
                                                                      "No route to host\n")}
    r = v.check_reachable(["w1", "w2"], outs, {"w1": "ssh", "w2": "ssh"})
    assert r.status == "fail" and r.data["unreachable"] == ["w2"]
    assert r.details == ["w2: unreachable over ssh: ssh: connect to host 10.77.0.12 port 22: No route to host"]
    s = v.check_srun(["w1", "w2"], Output("mgr", 1, "w1\n", "srun: error: Task launch failed on node w2\n"))
    assert s.status == "fail" and s.data["missing"] == ["w2"] and "Task launch failed" in s.summary
    assert v.check_srun(["w1", "w2"], Output("mgr", 0, "w2\nw1\n")).status == "ok"
    part = v.check_srun(["w1"], Output("mgr", 0, "w1\n"), {"w2": "unreachable"})
    assert part.status == "fail" and part.details == ["w2: not tried (unreachable)"] and part.data["missing"] == ["w2"]


def test_report_json_ok_only_without_failures():
    checks = [v.CheckResult("a", "ok", "fine"), v.CheckResult("b", "skip", "n/a")]
    rep = v.VerifyReport("c", "mgr", [], checks, "s", "f", 1.23456)
    assert rep.ok and rep.to_json()["duration_s"] == 1.235
    rep.checks.append(v.CheckResult("c", "fail", "bad", action="fix it"))
    data = rep.to_json()
    assert not data["ok"] and data["checks"][2] == {"name": "c", "status": "fail", "summary": "bad",
                                                     "details": [], "action": "fix it", "data": {}}
    json.dumps(data)
    assert "FAILED" in v.render_markdown(data) and "what to do: fix it" in v.render_markdown(data)


def test_ssh_argv_is_batch_mode_with_timeout_and_quoting():
    ssh = SshConnector(user="pi", identity="/k", known_hosts="/kh", connect_timeout=3, addresses={"red01": "10.1.1.11"})
    argv = ssh.argv("red01", ["sh", "-c", "echo $(hostname)"])
    assert argv[-3:] == ["10.1.1.11", "--", "sh -c 'echo $(hostname)'"]
    assert "BatchMode=yes" in argv and "ConnectTimeout=3" in argv and ["-l", "pi"] == argv[-5:-3]
    assert "UserKnownHostsFile=/kh" in argv and "/k" in argv


def test_bench_parsers():
    assert parse_timings("ok 1500000000\nfail\nok 500000000\njunk\n") == ([1.5, 0.5], 1)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 95) == 5 and percentile([], 50) is None
    assert percentile(list(range(101)), 95) == 95
    assert parse_iperf3(json.dumps({"end": {"sum_received": {"bits_per_second": 9.4e8}}})) == 940.0
    assert parse_iperf3("iperf3: error - unable to connect") is None


class RecordedConnectors(Connectors):
    """Answers from recorded outputs (a dead manager here): verify's orchestration without a cluster. Only
    ``run_each`` is replaced; ``run`` and ``run_many`` are the real connector's."""

    def __init__(self, answers):
        super().__init__(remote=None)
        self.answers = answers
        self.calls = []

    def describe(self, host):
        return "ssh"

    def run_each(self, jobs, *, timeout=60, fanout=32):
        self.calls += [(job.host, job.argv[0]) for job in jobs.values()]
        return {key: self.answers(job.host, job.argv) for key, job in jobs.items()}


def test_verify_with_nothing_running_fails_each_check_with_a_reason(tmp_path):
    """A cluster whose registry is down (a closed port on loopback) and whose manager does not answer ssh."""
    import socket

    with socket.socket() as s:  # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path / "cluster"
    new_cluster(d, manager="red00", manager_ip="127.0.0.1", network="127.0.0.0/8", name="down",
                settings={"registry_port": port})
    conns = RecordedConnectors(lambda host, argv: Output(host, 255, "", "ssh: connect to host 127.0.0.1 port 22: "
                                                                          "Connection refused\n"))
    seen = []
    report = v.verify(d, connectors=conns, progress=lambda f, m: seen.append((f, m)))
    checks = {c.name: c for c in report.checks}
    assert not report.ok and list(checks) == list(v.CHECKS)
    assert checks["registry"].status == "fail"
    assert checks["registry"].summary == (f"the registry does not answer: https://127.0.0.1:{port}/api/v1/health: "
                                          "connection refused")
    assert checks["expected-nodes"].status == "skip"
    assert checks["sinfo-idle"].status == "fail" and "Connection refused" in checks["sinfo-idle"].summary
    assert checks["srun"].status == "skip" and checks["munge"].status == "fail"
    assert checks["munge"].summary.startswith("the manager red00 does not answer: ssh: connect to host")
    assert checks["clock-skew"].status == "skip" and checks["slurm-conf"].status == "fail"
    assert all(c.action for c in report.checks if c.status == "fail")
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][1] == "done"
    assert {h for h, _ in conns.calls} == {"red00"}  # no node known, none contacted
    data = report.to_json()
    assert data["ok"] is False and data["nodes"] == [] and data["bench"] is None


def test_cli_without_a_cluster_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(tmp_path / "none"), "verify", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("pibake: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
