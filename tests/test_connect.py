"""pibake.connect, the one connector of deploy, verify, bench and recover: commands run as ClusterShell workers
(here local ones, the same engine and events as ssh's) and every end is an Output; a connector reports a
host, it does not raise. The ssh side is checked against the real ssh in tests/test_ssh.py and end to end by
the lab's deploy and verify tests. Every test runs with both ways of starting a process (``process_start``)."""

import os
import signal
import time

import pytest

from pibake.connect import Connectors, Job, LocalConnector

# every test twice: the process started by pibake.connect_workers, and by ClusterShell itself (the fallback)
pytestmark = pytest.mark.usefixtures("process_start")


def local(hosts=("red00",)):
    return Connectors(LocalConnector(), local_hosts=hosts)


def test_exit_code_output_and_stdin():
    out = LocalConnector().run("red00", ["sh", "-c", "cat; echo oops >&2; exit 3"], input="hello\n")
    assert (out.host, out.rc, out.stdout, out.stderr, out.ok) == ("red00", 3, "hello\n", "oops\n", False)
    assert out.reason() == "oops"


def test_a_missing_program_and_a_timeout_are_outputs():
    missing = LocalConnector().run("red00", ["pibake-no-such-program"])
    assert missing.rc == 127 and missing.reason().endswith("pibake-no-such-program: not found")
    slow = LocalConnector().run("red00", ["sleep", "5"], timeout=0.2)
    assert (slow.rc, slow.reason()) == (124, "no answer within 0.2 s")


def test_arguments_reach_the_program_unsplit():
    out = LocalConnector().run("red00", ["printf", "%s|", "a b", "$HOME", "it's", "%hosts"])
    assert out.stdout == "a b|$HOME|it's|%hosts|\n"  # %hosts: a ClusterShell placeholder, here a word


def test_run_many_gives_each_host_its_own_command_and_input():
    outs = local(("red01", "red02")).run_many(["red01", "red02"], lambda h: ["sh", "-c", f"echo {h}; cat"],
                                              input=lambda h: f"to {h}\n")
    assert {h: o.stdout for h, o in outs.items()} == {"red01": "red01\nto red01\n", "red02": "red02\nto red02\n"}


def _max_overlap(outputs):
    """The most commands that were running at one moment (from the start/end stamps each printed)."""
    events = []
    for out in outputs:
        start, end = (float(x) for x in out.stdout.split())
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_run_each_runs_several_jobs_on_one_host_at_most_fanout_at_once():
    stamp = 'date +%s.%N; sleep 0.3; date +%s.%N'
    jobs = {i: Job("red00", ["sh", "-c", stamp]) for i in range(4)}
    for fanout in (1, 2):
        outs = local().run_each(jobs, fanout=fanout)
        assert sorted(outs) == [0, 1, 2, 3] and all(o.ok for o in outs.values())
        assert _max_overlap(outs.values()) == fanout


def test_an_output_carries_the_wall_clock_around_its_command(process_start):
    before = time.time()
    out = LocalConnector().run("red00", ["date", "+%s.%N"])
    after = time.time()
    assert before <= out.started <= out.ended <= after and float(out.stdout) <= out.ended
    if process_start == "spawn":  # ClusterShell's own start stamps ``started`` after the process runs
        assert out.started <= float(out.stdout)


def test_no_jobs_no_work():
    assert local().run_each({}) == {} and local().run_many([], ["true"]) == {}


def test_a_started_process_has_default_signals_and_no_inherited_descriptors(process_start):
    """pibake.connect_workers starts the process with close_fds and the default signal dispositions: a Python
    parent ignores SIGPIPE, its ssh or shell must not (``yes | head -1`` would spin), and a descriptor this
    process left inheritable does not leak into it."""
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        out = LocalConnector().run("red00", ["sh", "-c", "grep SigIgn /proc/self/status; ls /proc/self/fd"])
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    assert out.ok, out.stderr
    ignored = int(out.stdout.split()[1], 16)
    fds = {int(f) for f in out.stdout.split()[2:]}
    if process_start == "spawn":
        assert not ignored & (1 << (signal.SIGPIPE - 1))
        assert leaked_w not in fds
    assert fds >= {0, 1, 2}
