"""After a slurmctld restart the registry sends `scontrol reconfigure` only once slurmctld has been up for the
grace with no further restart: one reconfigure for a burst of restarts, never right behind a restart (real
slurmctld, its own log).

Why (bench/deploy, N=32, Slurm 22.05.8): a slurmd that starts while slurmctld restarts for other enrolments
fetches its config but cannot register until the new slurmctld is up (it retries every second); a reconfigure
RPC sent right after the restart reached such slurmds first and they crashed (SIGSEGV in
write_configs_to_conf_cache), 7-8 of 32 per deploy."""

import re

import pytest

from pibake.registry.service import RegistryService
from pibake.registry.slurmctl import marker_path, reconfigure_pending
from tests.registry.conftest import enrolment


def _events(log_text):
    """The slurmctld log as a list of "start" / "reconfigure" events, in order."""
    events = []
    for line in log_text.splitlines():
        if re.search(r"slurmctld version \S+ started", line):
            events.append("start")
        elif "Processing Reconfiguration Request" in line:
            events.append("reconfigure")
    return events


def test_one_reconfigure_after_a_burst_of_restarts(cluster_dir, slurm_sandbox):
    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    # long enough that the three back-to-back enrolments below (about a second each) all fall inside it
    reg.applier.reconfigure_grace = 8.0
    for i, name in enumerate(("red01", "red02", "red03"), start=1):
        reg.enrol(enrolment(name, i, kind="vm"))  # each adds a node: a restart
        assert box.scontrol("show", "node", name).returncode == 0  # known to slurmctld when enrol returns
    assert reg.applier.counters.get("restarted") == 3
    reg.applier.flush()
    assert reg.applier.counters.get("reconfigured_after_restart") == 1, reg.applier.counters
    events = _events(box.log())
    # without the deferral: start, reconfigure, start, reconfigure, start, reconfigure
    assert events == ["start", "start", "start", "reconfigure"], events

    # the next restart schedules its own reconfigure
    reg.applier.reconfigure_grace = 0.5
    reg.enrol(enrolment("red04", 4, kind="vm"))
    reg.applier.flush()
    assert _events(box.log())[-2:] == ["start", "reconfigure"]
    assert reg.applier.counters.get("reconfigured_after_restart") == 2


def test_no_grace_reconfigures_at_once(cluster_dir, slurm_sandbox):
    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    reg.applier.reconfigure_grace = 0
    reg.enrol(enrolment("red01", 1, kind="vm"))
    reg.enrol(enrolment("red02", 2, kind="vm"))
    assert _events(box.log()) == ["start", "start", "reconfigure"]
    assert "reconfigured_after_restart" not in reg.applier.counters


def test_the_first_nodes_start_slurmctld_with_no_reconfigure(cluster_dir, slurm_sandbox):
    """Before the first nodes no slurmd can hold an older node list: a reconfigure would push nothing (and on
    Slurm 23.11+ restart slurmctld once more, turning idle nodes `unknown` for a moment: the CI run of
    c69eaee caught `pibake lab up` reporting idle workers that sinfo showed `unknown` right after)."""
    box = slurm_sandbox
    reg = RegistryService(cluster_dir, slurm_conf=str(box.conf), slurm_apply="direct", slurm_settings=box.settings,
                   apply_timeout=30)
    reg.applier.reconfigure_grace = 0.2
    assert reg.enrol(enrolment("red01", 1, kind="vm"))
    reg.applier.flush()
    assert _events(box.log()) == ["start"] and reg.applier.counters.get("restarted") == 1
    assert "reconfigured_after_restart" not in reg.applier.counters
    marks = [marker_path(box.conf, w) for w in ("restarted", "reconfigured")]
    assert not any(m.exists() for m in marks)
    reg.enrol(enrolment("red02", 2, kind="vm"))  # a restart: its reconfigure is pending until the grace ends
    assert reconfigure_pending(*(m.stat().st_mtime if m.exists() else 0.0 for m in marks))
    reg.applier.flush()
    assert not reconfigure_pending(*(m.stat().st_mtime for m in marks))
    assert _events(box.log()) == ["start", "start", "reconfigure"]


@pytest.mark.parametrize("restarted, reconfigured, pending", [
    (0.0, 0.0, False),  # never restarted
    (100.0, 0.0, True),  # restarted, never reconfigured
    (100.0, 99.5, True),  # restarted after the last reconfigure
    (100.0, 101.5, False),  # reconfigured after the restart
])
def test_a_reconfigure_is_pending_while_its_marker_is_older_than_the_restart(restarted, reconfigured, pending):
    assert reconfigure_pending(restarted, reconfigured) is pending
