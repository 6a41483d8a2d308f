"""`pibake deploy` setting up a manager installs and starts the two switch loops its seed has: the unit files
from templates/pibake-switch.service.j2 (the seed's write_files), started after the agent like on a burned
card, whatever cluster.yaml holds (a loop with nothing to do idles, so switches added later need no redeploy).
Pure: the ManagerPlan of pibake/deploy/manager.py from rendered seeds; tests/e2e/test_deploy_manager.py runs one."""

import shlex

import pytest

from pibake.bake.seed import SCRIPTS, SWITCH_LOOPS, render_template
from pibake.deploy.manager import agent_script, manager_plan
from pibake.layout import SYSTEMD_DIR
from pibake.model import MqttSettings, SwitchConfig
from tests.bake.seed_fixtures import cluster_for, render

PLUG = SwitchConfig(name="plug-red01", driver="kasa", address="10.1.1.201", node="red01", auto_cycle=True)
FAN = SwitchConfig(name="fan", driver="tasmota", address="10.1.1.202", thing="fan")


@pytest.mark.parametrize("case,changes", [
    ("no switches", {}),
    ("kasa auto_cycle", {"switches": (PLUG,)}),
    ("tasmota, mqtt", {"switches": (FAN,), "mqtt": MqttSettings(enabled=True)}),
])
def test_deploy_installs_enables_and_starts_both_switch_loops(case, changes):
    seed = render("manager", cluster=cluster_for(**changes))
    plan = manager_plan(seed.user_data, "pibake-0.1.0-py3-none-any.whl", b"PK")
    start = SCRIPTS["start"][0]
    script = agent_script(plan.agent, plan.after).splitlines()
    for loop, unit in SWITCH_LOOPS.items():
        name = f"pibake-switch-{loop}.service"
        content, mode = plan.files[f"{SYSTEMD_DIR}/{name}"]
        assert mode == 0o644, case
        assert content.decode() == render_template("pibake-switch.service.j2", switch_loop=loop,
                                                   cluster_dir="/var/lib/pibake/cluster", **unit), case
        assert f"ExecStart={' '.join(unit['command'])}\n" in content.decode()
        # pibake-start enables and starts the unit (systemd) or runs the command in the background (no systemd)
        line = [start, name, "--", *unit["command"]]
        assert line in plan.after, case
        assert f"if [ $rc -eq 0 ]; then {shlex.join(line)} >/dev/null 2>&1; fi" in script, case
    # after the agent (munge + slurmctld configured), the sensor agent first, then the loops, in the seed's order
    assert [entry[1] for entry in plan.after] == ["pibake-sensor.service", "pibake-switch-auto.service",
                                                  "pibake-switch-rules.service"]
    # the loops run /opt/pibake/bin/pibake: the install step (pibake-install) comes before them
    assert plan.install in plan.setup and SWITCH_LOOPS["auto"]["command"][0] == "/opt/pibake/bin/pibake"
