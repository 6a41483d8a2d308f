"""Must show (issue 11, item 6): the manager reaches its nodes with the cluster's own ssh identity. `pibake init`
makes it, the manager's seed installs it for the registry, the workers' seeds authorize it for the cluster user
(from the manager's IP only), and `POST /api/v1/verify` on the booted lab manager -- a REST job run by the real
registry, over real OpenSSH to the workers' real sshd -- passes its `reachable` check with it, and fails it
without it. Also: the private key is gone from the manager's boot partition after first boot, and the key is
useless from any other address.

Hosts boot their burned images with cloud-init (`pibake lab up --from-images`, as tests/e2e/test_lab.py).
Subnet 10.77.66.0/24, names ``pk<pid>-*``: traffic stays inside namespaces this test creates.
"""

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.fixtures_plugin import booted_lab, burned_cluster, needs_lab, pibake
import yaml


NET = "10.77.66"
WORKERS = ["red01", "red02"]
KEY = "/var/lib/pibake/cluster/secrets/manager-ssh.key"

_REQUEST = """
import json, sys, requests
method, url, ca, password, body = json.loads(sys.stdin.read())
r = requests.request(method, url, verify=ca, timeout=30, auth=("admin", password), json=body)
print(json.dumps([r.status_code, r.json()]))
"""


pytestmark = [pytest.mark.e2e, needs_lab("debootstrap")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _, cdir, images = burned_cluster(tmp_path_factory.mktemp("ident"), NET, workers=2, comment="person@e2e")
    with booted_lab(cdir, images, "pk") as (prefix, _, _):
        yield cdir, prefix


def shell(lab, host, *argv, check=True):
    cdir, prefix = lab
    return pibake(cdir, "lab", "shell", host, "--prefix", prefix, "--", *argv, check=check, timeout=120)


def api(lab, method, path, body=None):
    """(status, JSON) of a request to the lab manager's registry, sent from inside its network namespace."""
    from pibake.secrets import admin_password, secrets_dir

    cdir, prefix = lab
    request = [method, f"https://{NET}.10:8443/api/v1{path}", str(secrets_dir(cdir) / "ca.crt"),
               admin_password(cdir), body]
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{prefix}-red00", "--", sys.executable, "-c", _REQUEST],
                          input=json.dumps(request), capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout)


def rest_job(lab, kind, body, timeout=300):
    status, job = api(lab, "POST", f"/{kind}", body)
    assert status == 202, job
    end = time.monotonic() + timeout
    while job["state"] not in ("done", "failed"):
        assert time.monotonic() < end, job
        time.sleep(0.5)
        status, job = api(lab, "GET", f"/jobs/{job['id']}")
        assert status == 200, job
    return job


def checks(job):
    assert job["state"] == "done", job
    return {c["name"]: c for c in job["result"]["checks"]}


def test_the_seeds_put_the_identity_on_the_manager_and_authorize_it_on_the_workers(lab):
    cdir, _prefix = lab
    assert shell(lab, "red00", "stat", "-c", "%a %U", KEY).stdout.split() == ["400", "root"]
    assert shell(lab, "red00", "cat", KEY).stdout.encode() == (cdir / "secrets" / "manager-ssh.key").read_bytes()
    # first boot scrubbed the private key off the (FAT, readable by anyone holding the card) boot partition
    user_data = shell(lab, "red00", "cat", "/boot/firmware/user-data").stdout
    assert "secrets removed by pibake-scrub-seed" in user_data
    files = [f["path"] for f in yaml.safe_load(user_data)["write_files"]]
    assert KEY not in files and KEY + ".pub" in files  # the public key may stay
    assert "OPENSSH PRIVATE KEY" not in user_data and "LS0tLS1CRUdJTiBPUEVOU1NIIFBSSVZBVEUgS0VZ" not in user_data
    public = (cdir / "secrets" / "manager-ssh.key.pub").read_text().strip()
    line = f'from="{NET}.10",restrict {public}'
    for worker in WORKERS:
        keys = shell(lab, worker, "cat", "/home/pi/.ssh/authorized_keys").stdout.splitlines()
        assert line in keys, (worker, keys)
    # the manager itself does not authorize it
    assert public not in shell(lab, "red00", "cat", "/home/pi/.ssh/authorized_keys").stdout


def test_rest_verify_on_the_manager_reaches_every_node_with_it(lab):
    job = rest_job(lab, "verify", {})
    result = checks(job)
    assert result["reachable"]["status"] == "ok", result["reachable"]
    assert result["reachable"]["summary"] == "all 2 node(s) answer"
    assert [(n["hostname"], n["via"]) for n in job["result"]["nodes"]] == [(w, "ssh") for w in WORKERS]
    # what the logins made possible: munge both ways and the nodes' slurm.conf, checked on each node
    for name in ("sinfo-idle", "srun", "munge", "clock-skew", "slurm-conf"):
        assert result[name]["status"] == "ok", result[name]


def test_without_the_identity_the_same_job_fails_its_reachable_check(lab):
    shell(lab, "red00", "mv", KEY, KEY + ".away")
    try:
        job = rest_job(lab, "verify", {})
    finally:
        shell(lab, "red00", "mv", KEY + ".away", KEY)
    result = checks(job)
    assert result["reachable"]["status"] == "fail"
    assert result["reachable"]["data"]["unreachable"] == WORKERS
    assert all("Permission denied (publickey)" in d for d in result["reachable"]["details"]), result["reachable"]
    assert checks(rest_job(lab, "verify", {}))["reachable"]["status"] == "ok"  # key back: reachable again



def test_nothing_secret_in_the_registrys_log(lab):
    cdir, _prefix = lab
    log = shell(lab, "red00", "cat", "/var/log/pibake/pibake-registry.log").stdout
    assert "job" in log  # the jobs above were logged ...
    private = (cdir / "secrets" / "manager-ssh.key").read_text()
    body = "".join(private.splitlines()[1:-1])
    assert "PRIVATE KEY" not in log and body[:40] not in log and body[-40:] not in log  # ... the key never


def test_the_identity_works_from_the_manager_only(lab):
    cdir, prefix = lab
    key = cdir.parent / "manager-key"  # a copy readable by ssh here, as if it were stolen off the manager
    shutil.copyfile(cdir / "secrets" / "manager-ssh.key", key)
    key.chmod(0o600)
    ssh = ["ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10"]

    def login(from_host, to_ip):
        return subprocess.run(["nsenter", f"--net=/run/netns/{prefix}-{from_host}", "--", *map(str, ssh),
                               f"pi@{to_ip}", "hostname"], capture_output=True, text=True, timeout=60)
    from_manager = login("red00", f"{NET}.12")
    assert from_manager.returncode == 0 and from_manager.stdout.strip() == "red02", from_manager.stderr
    from_worker = login("red01", f"{NET}.12")
    assert from_worker.returncode == 255 and "Permission denied (publickey)" in from_worker.stderr


def test_rest_deploy_on_the_manager_logs_in_with_it_too(lab):
    """A deploy job with no login options: the manager's key, as the cluster user (pi, with the seed's sudo).
    By IP: the manager's cluster directory has no plan.yaml to map worker names to addresses."""
    ips = [f"{NET}.11", f"{NET}.12"]
    job = rest_job(lab, "deploy", {"hosts": f"{NET}.[11-12]"})
    assert job["state"] == "done", job
    result = job["result"]
    assert result["ok"] is True, result["hosts"]
    hosts = {h["host"]: h for h in result["hosts"]}
    assert sorted(hosts) == ips and [hosts[ip]["hostname"] for ip in ips] == WORKERS
    assert all(h["step"] == "idle" and h["slurm_state"] == "idle" for h in hosts.values()), hosts
    # the seed authorized the key exactly as deploy writes it: deploy found nothing to add
    assert not any(c.endswith("authorized_keys") for h in hosts.values() for c in h["changes"]), hosts
