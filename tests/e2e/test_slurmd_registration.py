"""The agent reports a worker ready only once its slurmd has registered with slurmctld, and starts slurmd again
when it died before that (real munge, slurmctld, configless slurmd in lab hosts).

Found with bench/deploy at N=32: slurmds that started while the registry restarted slurmctld for other
enrolments died (Slurm 22.05.8 SIGSEGV in write_configs_to_conf_cache when the post-restart reconfigure beat
their registration), while the agent had already said "ready"; deploy then waited 20 s and ran the agent once
more. Here the death is made certain: the first slurmd the agent starts is killed right after its start
returns, before the agent can report ready (what the segfault did in the lab, without needing the race)."""

import json

from tests.e2e.conftest import AGENT, DEBIAN_PYTHON

# Runs on the worker under Debian's python3: the real agent, whose first slurmd start is followed by its death.
KILL_FIRST_SLURMD = r"""
import importlib.util, signal, sys
spec = importlib.util.spec_from_file_location("pibake_agent", sys.argv[1])
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)
ensure = agent.Services.ensure
killed = []

def ensure_then_die(self, name, restart=False, options=""):
    state = ensure(self, name, restart, options)
    if name == "slurmd" and not killed:
        procs = agent.find_processes("slurmd")
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        agent.psutil.wait_procs(procs, timeout=10)
        killed.append(len(procs))
        print("test: killed the first slurmd", file=sys.stderr)
    return state

agent.Services.ensure = ensure_then_die
sys.exit(agent.main(sys.argv[2:]))
"""


def test_slurmd_that_dies_before_registering_is_started_again(lab_cluster):
    c = lab_cluster
    host = c.add_worker("w9", 39)
    proc = host.run([DEBIAN_PYTHON, "-I", "-c", KILL_FIRST_SLURMD, str(AGENT), "--config", "/etc/pibake/agent.json",
                     "--json"], check=False, timeout=240)
    assert "test: killed the first slurmd" in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr + c.diagnostics()
    result = json.loads(proc.stdout)
    assert result["status"] == "ready" and result["services"]["slurmd"] == "started"
    assert any("slurmd exited before it registered and was started again" in w for w in result["warnings"])
    # ready means: a slurmd runs on the node and slurmctld has it registered (no second agent run needed)
    assert host.run(["pgrep", "-x", "slurmd"], check=False).returncode == 0, c.diagnostics()
    assert c.wait_idle(["w9"])["w9"] == "idle"
    again = json.loads(host.run(c.agent_argv(), timeout=180).stdout)
    assert again["services"] == {"munge": "running", "slurmd": "running"} and again["changed"] == []
