"""Must show (issue 6): deploy and verify through the registry's REST API give the same JSON as the CLI
(times and durations aside). Real registry under gunicorn+TLS, OpenSSH, munge and Slurm on lab hosts: the
manager red00 runs the registry (whose jobs run deploy/verify in its own process), red01-red02 run only
sshd until `pibake deploy` makes them workers (tests/e2e/deploy_fixtures.py). Tests run in file order."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.deploy_fixtures import deploy_lab, deploy_lab_missing, module_lab
from tests.e2e.verify_fixtures import doc_blocks, keys_of, normalized

WORKERS = (("red01", 11), ("red02", 12), ("red03", 13))
NAMES = [n for n, _ in WORKERS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    reason = deploy_lab_missing()
    if reason:
        pytest.skip(reason)
    with module_lab(request, deploy_lab(tmp_path_factory.mktemp("rest"), 100 + os.getpid() % 40, WORKERS,
                                        family="pj", manager="red00")) as lab:
        yield lab


def cli_deploy(lab):
    proc = subprocess.run([sys.executable, "-m", "pibake", "--cluster", str(lab.cluster_dir), "deploy", "--hosts",
                           ",".join(NAMES), "--json", "--ssh-option=-F", f"--ssh-option={lab.ssh_config}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stderr}\n{lab.diagnostics()}"
    return json.loads(proc.stdout)


def verify_args(lab):
    return ["--user", "root", "-i", str(lab.key), "--known-hosts", str(lab.ssh_dir / "known_hosts")]


def cli_verify_on_manager(lab):
    proc = lab.mgr.run([sys.executable, "-m", "pibake", "--cluster", str(lab.cluster_dir), "verify", "--json",
                        *verify_args(lab)], check=False, timeout=300)
    return proc.returncode, json.loads(proc.stdout)


def rest_job(lab, kind, body, timeout=600):
    """POST /api/v1/<kind> then poll GET /api/v1/jobs/<id> until done; returns (202 body, final job, states seen)."""
    status, job = lab.api("POST", f"/{kind}", body=body)
    assert status == 202, job
    seen = [job["state"]]
    end = time.monotonic() + timeout
    while True:
        status, current = lab.api("GET", f"/jobs/{job['id']}")
        assert status == 200, current
        if current["state"] != seen[-1]:
            seen.append(current["state"])
        if current["state"] in ("done", "failed"):
            return job, current, seen
        assert time.monotonic() < end, current
        time.sleep(0.5)


def deploy_normalized(report):
    data = normalized(report)
    data.pop("started_at", None)
    for host in data["hosts"]:
        host.pop("timings", None)
    return data


def test_rest_deploy_gives_the_same_json_as_the_cli(lab):
    first = cli_deploy(lab)
    assert first["ok"] and first["summary"]["changed"] == 3
    again = cli_deploy(lab)  # converged: nothing changes, so a REST run must say exactly the same
    assert again["summary"] == {"hosts": 3, "changed": 0, "unchanged": 3, "failed": 0}
    body = {"hosts": ",".join(NAMES), "options": {"ssh_options": ["-F", str(lab.ssh_config)]}}
    started, job, seen = rest_job(lab, "deploy", body)
    assert started["kind"] == "deploy" and started["state"] in ("queued", "running")
    assert job["state"] == "done", job
    assert seen[-1] == "done" and job["progress"]["fraction"] == 1.0
    assert job["started"] and job["finished"] and job["error"] is None
    assert deploy_normalized(job["result"]) == deploy_normalized(again)


def test_rest_verify_gives_the_same_json_as_the_cli(lab):
    code, cli = cli_verify_on_manager(lab)
    assert code == 0, [c for c in cli["checks"] if c["status"] != "ok"]
    body = {"bench": False, "options": {"user": "root", "identity": str(lab.key),
                                        "known_hosts": str(lab.ssh_dir / "known_hosts")}}
    _started, job, _seen = rest_job(lab, "verify", body)
    assert job["state"] == "done", job
    rest = job["result"]
    assert rest["ok"] is True and [n["hostname"] for n in rest["nodes"]] == NAMES
    assert normalized(rest) == normalized(cli)
    assert set(rest) == set(cli)  # the same document, not a subset


def run_doc_block(lab, name, options):
    """docs/rest.md's block ``name`` as one sh script in the cluster directory on the manager host, with the
    example's ssh options replaced by ``options``; returns its stdout."""
    script, _commands, _sample = doc_blocks("rest.md", parse=False)[name]
    script = script.replace('"options": {"user": "pi"}', f'"options": {json.dumps(options)}')
    proc = lab.mgr.run(["sh", "-e", "-c", script], cwd=str(lab.cluster_dir), check=False, timeout=600)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}: {proc.stderr}"
    return proc.stdout


def test_every_command_of_docs_rest_md_runs(lab):
    assert list(doc_blocks("rest.md", parse=False)) == ["rest-health", "rest-verify", "rest-deploy", "rest-jobs"]
    _script, _commands, sample = doc_blocks("rest.md", parse=False)["rest-health"]
    health = json.loads(run_doc_block(lab, "rest-health", {}))
    assert health["status"] == "ok" and keys_of(health) == keys_of(sample)
    assert run_doc_block(lab, "rest-verify", {"user": "root", "identity": str(lab.key),
                                              "known_hosts": str(lab.ssh_dir / "known_hosts")}) == "true\n"
    out = run_doc_block(lab, "rest-deploy", {"ssh_options": ["-F", str(lab.ssh_config)]})
    assert json.loads(out) == {"changed": 0, "failed": 0, "hosts": 3, "unchanged": 3}
    lines = run_doc_block(lab, "rest-jobs", {}).splitlines()
    assert [ln.split()[1:] for ln in lines[:2]] == [["deploy", "done"], ["verify", "done"]]


def test_rest_deploy_of_a_stopped_host_reports_it_like_the_cli(lab):
    lab.stop_host("red02")
    body = {"hosts": ",".join(NAMES), "options": {"ssh_options": ["-F", str(lab.ssh_config)],
                                                  "connect_timeout": 3}}
    _started, job, _seen = rest_job(lab, "deploy", body)
    assert job["state"] == "done"  # the job ran; the deploy it ran failed on one host (the CLI's exit 1)
    result = job["result"]
    assert result["ok"] is False and result["summary"]["failed"] == 1
    failed = [h for h in result["hosts"] if h["status"] == "failed"]
    assert [h["host"] for h in failed] == ["red02"] and failed[0]["step"] == "connect"
    _started, job, _seen = rest_job(lab, "verify", {"options": {"user": "root", "identity": str(lab.key),
                                                                "known_hosts": str(lab.ssh_dir / "known_hosts")}})
    checks = {c["name"]: c for c in job["result"]["checks"]}
    assert job["result"]["ok"] is False and checks["reachable"]["data"]["unreachable"] == ["red02"]
