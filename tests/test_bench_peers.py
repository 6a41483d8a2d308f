"""bench/peers: the inventories bench/deploy --peers gives Ansible and pyinfra hold the hosts pibake deploys,
and the playbook orders the manager's slurm.conf before the workers' slurmd (the peers themselves run in
bench/deploy --peers, not in the suite: they are a benchmark's contenders, not pibake's code)."""

import runpy
import sys
from pathlib import Path

import yaml

PEERS = Path(__file__).resolve().parents[1] / "bench" / "peers"
sys.path.insert(0, str(PEERS))
from inventory import write_inventories  # noqa: E402


def test_inventories_hold_the_same_hosts_for_both_peers(tmp_path):
    key = tmp_path / "id_ed25519"
    ansible, pyinfra = write_inventories(tmp_path / "inv", ("mgr", "10.77.215.10"),
                                         [("b01", "10.77.215.12"), ("b02", "10.77.215.13")], ssh_key=key,
                                         ssh_config=tmp_path / "ssh_config", munge_key=tmp_path / "munge.key")
    inv = yaml.safe_load(ansible.read_text())["all"]
    assert inv["children"]["manager"]["hosts"] == {"mgr": {"ansible_host": "10.77.215.10"}}
    assert inv["children"]["workers"]["hosts"] == {"b01": {"ansible_host": "10.77.215.12"},
                                                   "b02": {"ansible_host": "10.77.215.13"}}
    assert inv["vars"]["ansible_ssh_common_args"] == f"-F {tmp_path / 'ssh_config'}"
    assert inv["vars"]["munge_key_file"] == str(tmp_path / "munge.key")
    groups = runpy.run_path(str(pyinfra))  # pyinfra reads its inventory by running the file
    assert [name for name, _ in groups["workers"]] == ["b01", "b02"]
    name, data = groups["manager"][0]
    assert (name, data["ssh_hostname"], data["ssh_key"], data["ssh_user"]) == ("mgr", "10.77.215.10", str(key), "root")
    assert data["ssh_strict_host_key_checking"] == "accept-new" and data["ssh_allow_agent"] is False


def test_manager_only_inventory_has_an_empty_workers_group(tmp_path):
    ansible, pyinfra = write_inventories(tmp_path, ("mgr", "10.77.215.10"), [], ssh_key="k", ssh_config="c",
                                         munge_key="m")
    assert yaml.safe_load(ansible.read_text())["all"]["children"]["workers"]["hosts"] == {}
    assert runpy.run_path(str(pyinfra))["workers"] == []


def test_playbook_sets_up_the_manager_before_the_workers_start_slurmd():
    plays = yaml.safe_load((PEERS / "ansible" / "site.yml").read_text())
    assert [p["hosts"] for p in plays] == ["workers", "manager", "workers", "manager"]
    manager_tasks = [t["name"] for t in plays[1]["tasks"]]
    worker_tasks = [t["name"] for t in plays[2]["tasks"]]
    assert manager_tasks.index("slurm.conf") < manager_tasks.index("slurmctld answers")
    assert "slurmd running" in worker_tasks and "munge key" in worker_tasks
    key = next(t for t in plays[2]["tasks"] if t["name"] == "munge key")["ansible.builtin.copy"]
    assert key["mode"] == "0400" and key["owner"] == "munge"
