"""pibake's own seeds through a real first boot: cloud-init 22.4's four stages in a lab host (own mount, UTS,
PID and network namespaces, overlay root; see pibake.lab.boot), no systemd as PID 1 (so pibake-start takes
its background path). The host's network namespace is empty: the agent, which starts and keeps retrying the
registry, sends nothing anywhere.
"""

import dataclasses
import subprocess

import pytest
import yaml

from pibake.bake.seed import render_seed
from pibake.model import PlannedNode
from tests.bake.seed_fixtures import ssh_key
from tests.fixtures_plugin import needs_lab, new_cluster

pytestmark = [needs_lab("debootstrap", "unshare", "nsenter", "chroot")]

NET = "10.77.251"


@pytest.fixture(scope="module")
def lab_cluster(tmp_path_factory):
    """A real cluster directory (real CA, pinned join token, munge key) made by pibake.cluster.init_cluster."""
    from pibake.cluster import load_cluster
    from pibake.secrets import manager_bundle, seed_secrets

    cdir = tmp_path_factory.mktemp("bootcluster") / "cluster"
    new_cluster(cdir, manager_ip=f"{NET}.10", network=f"{NET}.0/24", name="boot", ssh_keys=(ssh_key(),),
                timezone="Europe/Berlin", home=cdir.parent)
    cluster = load_cluster(cdir)
    secrets = seed_secrets(cdir)
    bundle = manager_bundle(cdir)
    token = secrets.join_token
    admin = bundle["secrets/admin-password"].decode().strip()
    return dataclasses.make_dataclass("LabCluster", ["cluster", "secrets", "bundle", "token", "admin"])(
        cluster, secrets, bundle, token, admin)


class Booted:
    def __init__(self, sandbox, root, result):
        self.sandbox, self.root, self.result = sandbox, root, result

    def sh(self, *argv, check=True):
        from pibake.lab.boot import host_command

        proc = subprocess.run(host_command(self.root, argv, enter=self.sandbox.enter), capture_output=True,
                              text=True, timeout=120)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def read(self, path):
        from pibake.lab.boot import read_host_file

        return read_host_file(self.root, path, enter=self.sandbox.enter)

    def wait_for_file_text(self, path, text, tries=300):
        import time

        for _ in range(tries):  # the agent runs detached; wait for it (not a timing assertion)
            if text in self.read(path):
                return True
            time.sleep(0.1)
        return False


def _boot(lab_rootfs, tmp_path_factory, name, seed, before_boot=None):
    from pibake.lab.boot import boot_host
    from pibake.lab.rootfs import make_host_root, remove_host_root
    from tests.lab.sandbox import Sandbox

    state = tmp_path_factory.mktemp(name)
    sandbox = Sandbox(name)
    try:
        root = make_host_root(lab_rootfs, state / "host", enter=sandbox.enter)
        if before_boot:
            before_boot(sandbox, root)
        result = boot_host(root, seed, enter=sandbox.enter, host=name)
        yield Booted(sandbox, root, result)
    finally:
        sandbox.destroy()
        remove_host_root(state / "host")


@pytest.fixture(scope="module")
def worker(lab_rootfs, tmp_path_factory, lab_cluster):
    seed = render_seed(lab_cluster.cluster, PlannedNode("red01", f"{NET}.11", "worker"), lab_cluster.secrets)
    yield from _boot(lab_rootfs, tmp_path_factory, "pbseedw", seed)


def test_worker_first_boot_is_clean(worker):
    result = worker.result
    assert result.ok, (result.errors, result.output_tail[-3000:])
    assert result.hostname == "red01"


def test_worker_got_its_files_and_user(worker):
    assert f"{NET}.10\tred00" in worker.read("/etc/hosts")
    assert worker.sh("stat", "-c", "%a %U", "/etc/pibake/agent.json").stdout.split() == ["600", "root"]
    assert worker.sh("stat", "-c", "%a", "/usr/local/lib/pibake/agent.py").stdout.strip() == "755"
    assert "NTP=" + f"{NET}.10" in worker.read("/etc/systemd/timesyncd.conf.d/pibake.conf")
    assert "Type=oneshot" in worker.read("/etc/systemd/system/pibake-agent.service")
    keys = worker.read("/home/pi/.ssh/authorized_keys")
    assert ssh_key() in keys
    shadow = worker.sh("getent", "shadow", "pi").stdout
    assert shadow.split(":")[1].startswith("!")  # password locked
    assert worker.read("/etc/timezone").strip() == "Europe/Berlin"


def test_worker_card_no_longer_holds_the_join_token(worker, lab_cluster):
    user_data = worker.read("/boot/firmware/user-data")
    assert user_data.startswith("#cloud-config\n")
    assert lab_cluster.token not in user_data
    paths = [f["path"] for f in yaml.safe_load(user_data)["write_files"]]
    assert "/etc/pibake/agent.json" not in paths and "/usr/local/lib/pibake/agent.py" in paths
    proc = worker.sh("cloud-init", "schema", "--config-file", "/boot/firmware/user-data", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_agent_was_started_in_the_background(worker):
    assert "running pibake-agent in the background" in worker.result.output_tail
    assert worker.wait_for_file_text("/var/log/pibake/pibake-agent.log", "red00"), \
        worker.read("/var/log/pibake/pibake-agent.log")
    procs = subprocess.run([*worker.sandbox.enter, "ps", "-eo", "args"], capture_output=True, text=True).stdout
    agent_lines = [line for line in procs.splitlines() if "/usr/local/lib/pibake/agent.py" in line]
    # still retrying (the registry is not there), or already gave up and said so in its log
    assert agent_lines or "registry" in worker.read("/var/log/pibake/pibake-agent.log")


# --------------------------------------------------------------------------- the manager, with a wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel burn puts on the manager's card (pibake.bake.burn.manager_wheel: built once per source change)."""
    from pibake.bake.burn import manager_wheel
    from pibake.errors import PibakeError

    try:
        return manager_wheel()
    except PibakeError as err:  # the tests run from the checkout, so building the wheel must work: a bug
        pytest.fail(f"no pibake wheel: {err}")


@pytest.fixture(scope="module")
def manager(lab_rootfs, tmp_path_factory, wheel, lab_cluster):
    seed = render_seed(lab_cluster.cluster, PlannedNode("red00", f"{NET}.10", "manager"), lab_cluster.secrets,
                       manager_bundle=lab_cluster.bundle)

    def put_wheel(sandbox, root):
        subprocess.run([*sandbox.enter, "mkdir", "-p", f"{root}/boot/firmware/pibake"], check=True)
        subprocess.run([*sandbox.enter, "cp", str(wheel), f"{root}/boot/firmware/pibake/"], check=True)

    yield from _boot(lab_rootfs, tmp_path_factory, "pbseedm", seed, before_boot=put_wheel)


def test_manager_first_boot_installs_pibake_and_keeps_secrets_private(manager, lab_cluster):
    result = manager.result
    assert result.ok, (result.errors, result.output_tail[-3000:])
    assert "pibake-install: installed /boot/firmware/pibake/pibake-" in result.output_tail
    version = manager.sh("/opt/pibake/bin/python", "-c", "import pibake.bake.seed, pibake; print(pibake.__version__)")
    assert version.stdout.strip()
    modes = manager.sh("stat", "-c", "%n %a", "/var/lib/pibake/cluster", "/var/lib/pibake/cluster/secrets",
                       "/var/lib/pibake/cluster/secrets/munge.key", "/var/lib/pibake/cluster/secrets/ca.crt",
                       "/var/lib/pibake/cluster/cluster.yaml").stdout.split("\n")
    assert modes[:5] == ["/var/lib/pibake/cluster 700", "/var/lib/pibake/cluster/secrets 700",
                         "/var/lib/pibake/cluster/secrets/munge.key 400",
                         "/var/lib/pibake/cluster/secrets/ca.crt 444", "/var/lib/pibake/cluster/cluster.yaml 600"]
    munge = manager.sh("base64", "-w0", "/var/lib/pibake/cluster/secrets/munge.key").stdout
    import base64

    assert base64.b64decode(munge) == lab_cluster.bundle["secrets/munge.key"]
    assert "allow 10.77.251.0/24" in manager.read("/etc/chrony/conf.d/pibake.conf")


def test_manager_card_no_longer_holds_secrets(manager, lab_cluster):
    import base64

    user_data = manager.read("/boot/firmware/user-data")
    bundle = lab_cluster.bundle
    for secret in (lab_cluster.token, base64.b64encode(bundle["secrets/munge.key"]).decode()[:60],
                   base64.b64encode(bundle["secrets/admin-password"]).decode(), lab_cluster.admin,
                   base64.b64encode(bundle["secrets/registry.key"]).decode()[:60]):
        assert secret not in user_data
    proc = manager.sh("cloud-init", "schema", "--config-file", "/boot/firmware/user-data", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_manager_started_registry_and_agent(manager):
    out = manager.result.output_tail
    assert "running pibake-registry in the background" in out
    assert "running pibake-agent in the background" in out
    import time

    listening = ""
    for _ in range(300):  # the registry (from the venv) comes up detached; wait for it (not a timing assertion)
        listening = subprocess.run([*manager.sandbox.enter, "ss", "-Hltn", "sport", "=", ":8443"],
                                   capture_output=True, text=True, timeout=60).stdout
        if ":8443" in listening:
            break
        time.sleep(0.1)
    assert ":8443" in listening, manager.read("/var/log/pibake/pibake-registry.log")[-2000:]
    assert manager.wait_for_file_text("/var/log/pibake/pibake-agent.log", "https://red00:8443"), \
        manager.read("/var/log/pibake/pibake-agent.log")
