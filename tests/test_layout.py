"""The node contract (pibake/layout.py) is what the seeds and deploy put on a node: the same packages per role
and the same files at the same paths with the same modes."""

import json

import pytest
import yaml

from pibake import layout
from pibake.deploy import node as deploy_node
from pibake.deploy.manager import manager_plan
from pibake.model import MqttSettings
from tests.bake.seed_fixtures import NODES, SECRETS, cluster_for, render

ROLES = ("manager", "worker", "sensor")


def seed_config(role, mqtt, apt_cache=False):
    cluster = cluster_for(mqtt=MqttSettings(enabled=mqtt), apt_cache=apt_cache)
    return cluster, yaml.safe_load(render(role, cluster=cluster).user_data)


def seed_files(config):
    return {entry["path"]: entry for entry in config["write_files"]}


@pytest.mark.parametrize("apt_cache", [False, True])
@pytest.mark.parametrize("mqtt", [False, True])
@pytest.mark.parametrize("role", ROLES)
def test_the_seed_installs_the_layouts_packages(role, mqtt, apt_cache):
    cluster, config = seed_config(role, mqtt, apt_cache)
    assert tuple(config["packages"]) == layout.role_packages(role, mqtt=mqtt, apt_cache=apt_cache)
    assert ("python3-paho-mqtt" in config["packages"]) is mqtt
    assert ("mosquitto" in config["packages"]) is (mqtt and role == "manager")
    assert ("apt-cacher-ng" in config["packages"]) is (apt_cache and role == "manager")
    files = seed_files(config)
    assert ({layout.APT_PROXY_DETECT, layout.APT_PROXY_CONF} <= set(files)) is (apt_cache and role != "manager")


@pytest.mark.parametrize("mqtt", [False, True])
def test_deploy_installs_what_the_worker_seed_installs(mqtt):
    cluster, config = seed_config("worker", mqtt)
    assert deploy_node.role_packages(cluster, "worker") == tuple(config["packages"])
    assert deploy_node.missing_packages("worker", {}) == list(layout.ROLE_PACKAGES["worker"])


@pytest.mark.parametrize("apt_cache", [False, True])
def test_deploy_ships_the_worker_seeds_files_at_the_same_paths_and_modes(apt_cache):
    """A systemd worker set up by deploy has the seed's node files: same paths, same modes, and (where
    neither carries per-boot secrets) the same content."""
    cluster, config = seed_config("worker", mqtt=True, apt_cache=apt_cache)
    seed = seed_files(config)
    facts = {"systemd": True}
    shipped = deploy_node.wanted_files(cluster, NODES["worker"].hostname, "worker", facts, b"agent", b"ca")
    assert set(shipped) <= set(seed), set(shipped) - set(seed)
    for path, (content, mode) in shipped.items():
        assert int(seed[path]["permissions"], 8) == mode, path
    same = (layout.TIMESYNCD_DROPIN, layout.SENSOR_CONFIG, layout.SENSOR_UNIT)
    for path in same + ((layout.APT_PROXY_DETECT, layout.APT_PROXY_CONF) if apt_cache else ()):
        assert shipped[path][0].decode() == seed[path]["content"], path
    assert set(deploy_node.WORKER_FACT_FILES) >= set(shipped)
    assert shipped[layout.CA_PATH][0] == b"ca" and seed[layout.CA_PATH]["content"] == SECRETS.ca_cert_pem
    seed_agent = json.loads(seed[layout.AGENT_CONFIG]["content"])
    deploy_agent = json.loads(shipped[layout.AGENT_CONFIG][0])
    for key in ("registry_url", "ca_cert", "credential_file", "hostname", "role", "manager", "manager_ip"):
        assert deploy_agent[key] == seed_agent[key], key


def test_the_manager_plan_is_the_manager_seeds_own():
    """deploy sets a manager up from its rendered seed, so the packages are the layout's by construction."""
    cluster, _ = seed_config("manager", mqtt=True)
    seed = render("manager", cluster=cluster)
    plan = manager_plan(seed.user_data, "pibake-0.1.0-py3-none-any.whl", b"")
    assert tuple(plan.packages) == layout.role_packages("manager", mqtt=True)


def test_secret_directories_are_private():
    assert dict(layout.NODE_DIRS)[layout.ETC_DIR] == 0o700
    for path in (layout.AGENT_CONFIG, layout.CA_PATH, layout.TOKEN_FILE, layout.CREDENTIAL_FILE):
        assert path.startswith(layout.ETC_DIR + "/")


def test_the_lab_and_target_roots_hold_what_the_seeds_install():
    """The lab's shared root and the emulated target pre-install the seeds' packages (nothing can be fetched
    there): a package added to a role in pibake/layout.py must be added to them too, or first boot fails."""
    from pibake.lab import rootfs, target

    lab = set(rootfs.LAB_PACKAGES)
    on_target = set(target.BASE_PACKAGES + target.ROLE_PACKAGES + target.LOCAL_REPO_PACKAGES)
    for role in ROLES:
        assert set(layout.role_packages(role, mqtt=True)) - lab == set(), role
    for role in ("manager", "worker"):  # the emulated target boots these two
        assert set(layout.role_packages(role)) - on_target == set(), role
