"""After a slurmctld restart the registry sends `scontrol reconfigure` only once slurmctld has been up for the
grace with no further restart: one reconfigure for a burst of restarts, never right behind a restart (real
slurmctld, its own log).

Why (bench/deploy, N=32, Slurm 22.05.8): a slurmd that starts while slurmctld restarts for other enrolments
fetches its config but cannot register until the new slurmctld is up (it retries every second); a reconfigure
RPC sent right after the restart reached such slurmds first and they crashed (SIGSEGV in
write_configs_to_conf_cache), 7-8 of 32 per deploy."""

import re

from pibake.registry.service import RegistryService
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
    assert _events(box.log()) == ["start", "reconfigure"]
    assert "reconfigured_after_restart" not in reg.applier.counters
