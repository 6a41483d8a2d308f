"""Fixed inputs for seed tests: a cluster, fake (but well-formed) secrets, a fake manager bundle.

Nothing here is a real secret: the token, certificate and keys are fixed strings so golden files stay stable.
"""

import base64
import dataclasses

from pibake.model import Cluster, PlannedNode, SeedSecrets, Wifi


def ssh_key(kind="ssh-ed25519", comment="pi@laptop", body=b"k" * 32):
    blob = len(kind).to_bytes(4, "big") + kind.encode() + len(body).to_bytes(4, "big") + body
    line = f"{kind} {base64.b64encode(blob).decode()}"
    return f"{line} {comment}" if comment else line


FAKE_TOKEN = "K10" + "ab" * 32 + "::abc123." + "s3cr3t" * 5 + "xy"
FAKE_CA = "-----BEGIN CERTIFICATE-----\nMIIBfakeCAcertificateForTests\n-----END CERTIFICATE-----\n"
FAKE_MANAGER_KEY = ssh_key(comment="pibake-manager@lab", body=b"m" * 32)
SECRETS = SeedSecrets(join_token=FAKE_TOKEN, ca_cert_pem=FAKE_CA, manager_ssh_key=FAKE_MANAGER_KEY)
FAKE_MUNGE = bytes(range(256)) * 4  # binary, like a real munge key
FAKE_ADMIN = "adm1n-passw0rd-for-tests"
BUNDLE = {
    "cluster.yaml": b"name: lab\nmanager: red00\n",
    "secrets/ca.crt": FAKE_CA.encode(),
    "secrets/registry.crt": b"-----BEGIN CERTIFICATE-----\nMIIBregistry\n-----END CERTIFICATE-----\n",
    "secrets/registry.key": b"-----BEGIN PRIVATE KEY-----\nMIGHregistrykey\n-----END PRIVATE KEY-----\n",
    "secrets/join-token.json": ('{"token": "%s"}\n' % FAKE_TOKEN).encode(),
    "secrets/munge.key": FAKE_MUNGE,
    "secrets/admin-password": (FAKE_ADMIN + "\n").encode(),
    "secrets/manager-ssh.key": b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEfake\n"
                               b"-----END OPENSSH PRIVATE KEY-----\n",
    "secrets/manager-ssh.key.pub": (FAKE_MANAGER_KEY + "\n").encode(),
}
PSK = "0123456789abcdef" * 4

CLUSTER = Cluster(
    name="lab",
    manager="red00",
    manager_ip="10.1.1.10",
    network="10.1.1.0/24",
    gateway="10.1.1.1",
    dns=("10.1.1.1", "9.9.9.9"),
    user="pi",
    ssh_keys=(ssh_key(),),
    timezone="Europe/Berlin",
    locale="C.UTF-8",
    ntp_servers=("ntp.example.org",),
)
CLUSTER_WIFI = dataclasses.replace(CLUSTER, wifi=Wifi(country="DE", ssid="lab net", psk=PSK))
FAMILIES = {"raspios-trixie": "raspios", "ubuntu-24.04": "ubuntu"}
NODES = {
    "manager": PlannedNode("red00", "10.1.1.10", "manager"),
    "worker": PlannedNode("red01", "10.1.1.11", "worker"),
    "sensor": PlannedNode("red02", "10.1.1.12", "sensor"),
}


def cluster_for(family="raspios", wifi=False, **changes):
    base = CLUSTER_WIFI if wifi else CLUSTER
    return dataclasses.replace(base, family=family, **changes)


def render(role="worker", family="raspios", wifi=False, instance_id="pibake-00000000-test", cluster=None, node=None):
    from pibake.bake.seed import render_seed

    return render_seed(cluster or cluster_for(family, wifi), node or NODES[role], SECRETS, instance_id=instance_id,
                       manager_bundle=BUNDLE if (node or NODES[role]).role == "manager" else None)


# --------------------------------------------------------------------------- the real cloud-init

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

CLOUD_INIT = shutil.which("cloud-init")
DEBIAN_PYTHON = "/usr/bin/python3"  # cloud-init's own interpreter (its modules live in dist-packages)

_NETWORK_PROBE = r"""
import json, os, sys, tempfile, yaml
from cloudinit.net import network_state, netplan, networkd
cfg = yaml.safe_load(open(sys.argv[1]))
if "network" in cfg:  # what cloud-init's stages do with a NoCloud network-config
    cfg = cfg["network"]
state = network_state.parse_net_config_data(cfg, skip_broken=False)
out = {"interfaces": list(state.iter_interfaces()), "files": {}}
for name, mod in (("netplan", netplan), ("networkd", networkd)):
    target = tempfile.mkdtemp()
    mod.Renderer({}).render_network_state(state, target=target)
    for root, _, files in os.walk(target):
        for f in files:
            p = os.path.join(root, f)
            out["files"][name + ":" + os.path.relpath(p, target)] = open(p).read()
print(json.dumps(out, default=str))
"""


def cloud_init_schema(user_data, tmp_path):
    """Run the real `cloud-init schema --config-file`; return (exit code, output)."""
    path = tmp_path / "user-data-under-test"
    path.write_text(user_data)
    proc = subprocess.run([CLOUD_INIT, "schema", "--config-file", str(path)], capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def cloud_init_network(network_config, tmp_path):
    """Parse network-config with cloud-init's own v2 parser and renderers (netplan, networkd)."""
    path = tmp_path / "network-config-under-test"
    path.write_text(network_config)
    proc = subprocess.run([DEBIAN_PYTHON, "-c", _NETWORK_PROBE, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def has_cloud_init():
    return CLOUD_INIT is not None and subprocess.run([DEBIAN_PYTHON, "-c", "import cloudinit"],
                                                     capture_output=True).returncode == 0
