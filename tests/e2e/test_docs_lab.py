"""The manual's blocks that need a running cluster, run as written against ONE lab (issue 7: every command
shown in the manual is executed by a test). tests/test_docs.py marks them "lab"; this module runs them in
order: the lab quick start (init, burn to images, `lab up`, status, shell, srun), the lab page, `lab`,
`agent`, the ssh checks of the Pi quick start and of troubleshooting, `verify` (CLI, JSON and Python),
`deploy`, the REST job from Python, `registry serve` and `accept`/`remove`, and last `lab down`.

What is substituted, explicitly (``substitute``): the lab's network 10.77.<160-199> for the examples'
10.1.1.0/24 and 10.77.7.0/24; the lab's three workers for the Pi quick start's four (``red[01-04]``,
``10.1.1.[11-14]``, ``srun -N4``); ``--prefix <this run's prefix>`` on every `pibake lab` command; no
``sudo`` in front of pibake (the test is root). Every `lab up` in the manual is the same boot (checked:
the same options but ``--json``/``--cluster``), so the lab boots once; every `lab down` is run last.

Where each line runs:

- *here*: init, burn to image files, and `pibake lab ...` (which works on the lab's own namespaces);
- *in the lab's network*, as a laptop on the cluster network would (``client_argv``): verify, deploy, ssh,
  curl, the Python blocks, `registry serve`: a private mount namespace binds the test's own ~/.ssh over
  /root/.ssh (ssh reads the passwd home) and a hosts file naming the lab's hosts over /etc/hosts, then
  ``nsenter --net=/run/netns/<prefix>-red01``. NETWORK RULE: nothing leaves the namespaces this test
  created; the bridge has no address on this machine, so a wrong address simply fails.
- *on a lab host* (`pibake lab shell HOST -- ...`): the agent, which writes /etc and starts services.

`registry serve` runs on a second cluster directory (``serve/``, cluster.yaml ``registry:`` with its
slurm.conf in the test folder, ``slurm_apply: none``, ``slurm_state: false``) so it never touches this
machine's /etc/slurm or Slurm; a node enrolled over REST waits there as pending for `registry accept`.
"""

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures_plugin import lab_prefix, make_ssh_key
from tests.test_docs import (BLOCKS, DOCS, doc_blocks, keys_of, page_block, split_line, synthetic_image,
                              touches_network)

pytestmark = [pytest.mark.e2e]

OCTET = 160 + os.getpid() % 40
NET = f"10.77.{OCTET}"
WORKERS = ["red01", "red02", "red03"]
# (example text, lab text), applied in this order to every line before it runs
SUBSTITUTIONS = [
    ("10.1.1.[11-14]", f"{NET}.[11-13]"),  # the Pi quick start's four workers -> the lab's three
    ("red[01-04]", "red[01-03]"),
    ("srun -N4 ", "srun -N3 "),
    ("10.1.1.", f"{NET}."),
    ("10.77.7.", f"{NET}."),
]
LAB_SUB_RE = re.compile(r"\bpibake((?: --cluster \S+)?) lab (up|status|shell|down)\b")
RAN = []  # (page, block) run by this module, in order


def lab_blocks():
    """{(page, name)} of every block tests/test_docs.py leaves to this module."""
    return {(page, name) for page, blocks in BLOCKS.items() for name, mode in blocks.items() if mode == "lab"}


def substitute(line, prefix):
    for old, new in SUBSTITUTIONS:
        line = line.replace(old, new)
    line = re.sub(r"^sudo (pibake )", r"\1", line)
    return LAB_SUB_RE.sub(lambda m: f"pibake{m.group(1)} lab {m.group(2)} --prefix {prefix}", line)


def addresses_outside_the_lab(line):
    """IPv4 addresses (or NodeSet-style ranges) in ``line`` that are not in the lab's network or loopback."""
    bad = []
    for text in re.findall(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.(?:\d{1,3}|\[[\d,-]+\])", line):
        base = text.rsplit(".", 1)[0] + ".1"
        ip = ipaddress.IPv4Address(base)
        if not (ip in ipaddress.IPv4Network(f"{NET}.0/24") or ip.is_loopback or text.startswith("0.0.0.")):
            bad.append(text)
    return bad


class DocsLab:
    """The test's HOME (ssh key, images, a `pibake` on PATH), the lab's prefix, and how lines are run."""

    def __init__(self, home, prefix):
        self.home = home
        self.prefix = prefix
        self.booted = None  # the normalised `lab up` line that booted the lab
        self.downs = []
        self.done = {}  # line -> (code, out, err): a line shown twice runs once
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PIBAKE_")}
        self.env.update(HOME=str(home), PATH=f"{home / 'bin'}:{os.environ['PATH']}", TZ="UTC", COLUMNS="80",
                        XDG_CACHE_HOME=str(home / ".cache"))

    # ---------------------------------------------------------------- where lines run
    def client_argv(self, argv):
        """``argv`` in the lab's network (red01's namespace), with this test's ~/.ssh and hosts file."""
        script = ('mount --bind "$HOME/.ssh" /root/.ssh && mount --bind "$HOME/hosts" /etc/hosts && '
                  f'exec nsenter --net=/run/netns/{self.prefix}-red01 -- "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv]

    def run(self, argv, *, client=False, cwd=None, input=None, timeout=600, env=None):
        argv = self.client_argv(argv) if client else argv
        proc = subprocess.run(argv, cwd=cwd or self.home, env=env or self.env, capture_output=True, text=True,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def on_host(self, host, command, **kw):
        return self.run(["bash", "-c", f"pibake lab shell {host} --prefix {self.prefix} -- {command}"], **kw)

    # ---------------------------------------------------------------- lines of the manual
    def line(self, page, name, raw, *, client=False, cwd=None, env=None):
        """Run one line of a block as written (after ``substitute``); (code, stdout, stderr)."""
        _, expected = split_line(raw)
        text = substitute(re.sub(r"\s+#\s*exits \d+\s*$", "", raw), self.prefix)
        text = re.sub(r"\s+# .*$", "", text)
        assert not addresses_outside_the_lab(text), f"{page} {name}: {text} names an address outside the lab"
        lab = LAB_SUB_RE.search(raw)
        if lab and lab.group(2) == "up":
            return self._up(page, name, text, cwd)
        if lab and lab.group(2) == "down":
            self.downs.append((page, name, normalise(text)))
            return 0, "", ""
        if lab is None and not re.match(r"pibake (--cluster \S+ )?(init|burn) ", text):
            client = True  # verify, deploy, ssh, curl, registry serve/accept: only inside the lab's network
        if not client:  # here: init, burn to files, `lab`; nothing that contacts a machine
            argv = shlex.split(text)
            assert argv[0] == "pibake" and (lab or not touches_network(argv[1:])), f"{page} {name}: {text}"
        key = (text, client, str(cwd), json.dumps(env and {k: env[k] for k in env if k.startswith("PIBAKE_")}))
        if key in self.done:
            return self.done[key]
        stdin = "hostname\nexit\n" if re.search(r"lab shell --prefix \S+ \S+$", text) else None
        code, out, err = self.run(["bash", "-c", text], client=client, cwd=cwd, input=stdin, env=env)
        assert code == expected, f"{page} {name}: `{text}` exited {code}, wanted {expected}\n{out[-2000:]}\n{err[-3000:]}"
        self.done[key] = (code, out, err)
        return code, out, err

    def _up(self, page, name, text, cwd):
        if self.booted is None:
            code, out, err = self.run(["bash", "-c", text], cwd=cwd, timeout=900)
            assert code == 0, f"{page} {name}: `{text}` exited {code}\n{err[-4000:]}"
            self.booted = normalise(text)
            return code, out, err
        assert normalise(text) == self.booted, f"{page} {name}: `{text}` is another boot than `{self.booted}`"
        return 0, "", ""

    def block(self, page, name, only=slice(None), **kw):
        """Run every line (or the ``only`` slice) of ``page``'s sh block ``name``; [(line, code, stdout, stderr)]."""
        assert BLOCKS[page][name] in ("lab", "run"), f"{page} {name} is neither a lab nor a run block"
        (lines,) = [lines for block, lines, _ in doc_blocks((DOCS / page).read_text()) if block == name]
        results = [(ln, *self.line(page, name, ln, **kw)) for ln in lines[only]]
        RAN.append((page, name))
        return results


def normalise(text):
    """A `lab up`/`lab down` line without what does not change the boot: --json, --cluster DIR, --prefix P."""
    text = re.sub(r" --json\b", "", text)
    text = re.sub(r" --cluster \S+", "", text)
    return re.sub(r" --prefix \S+", "", text).strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, lab_rootfs):  # lab_rootfs: skips (fails under CI) where no lab can run
    os.makedirs("/root/.ssh", mode=0o700, exist_ok=True)  # ssh's home for known_hosts (absent on a new machine)
    prefix = lab_prefix("pk")
    home = tmp_path_factory.mktemp("docs-lab")
    home.chmod(0o755)
    (home / ".ssh").mkdir(mode=0o700)
    make_ssh_key(home / ".ssh", "docs@lab")
    config = home / ".ssh" / "config"
    config.write_text("Host *\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 10\n")
    config.chmod(0o600)
    (home / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{NET}.{10 + i} red{i:02d}\n" for i in range(4)))
    (home / "bin").mkdir()
    wrapper = home / "bin" / "pibake"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m pibake \"$@\"\n")
    wrapper.chmod(0o755)
    synthetic_image(home / "pi.img")
    (home / "bylab").mkdir()
    shutil.copy(home / "pi.img", home / "bylab" / "raspios.img")
    docs_lab = DocsLab(home, prefix)
    try:
        yield docs_lab
    finally:
        subprocess.run([sys.executable, "-m", "pibake", "lab", "down", "--prefix", prefix], capture_output=True,
                       timeout=300)


# --------------------------------------------------------------------------- no root needed


def test_every_line_stays_inside_the_lab_and_this_module_runs_every_lab_block():
    """The guard: after substitution no line names an address outside the lab's network; lines that
    contact machines run only through ``client_argv`` (nsenter into the lab) or `pibake lab shell`."""
    names = set()
    for page, name in sorted(lab_blocks()):
        lines = [ln for block, lns, _ in doc_blocks((DOCS / page).read_text()) if block == name for ln in lns]
        assert lines or page_block(page, name)[0] in ("json", "python", "text"), f"{page} {name}: no lines"
        for raw in lines:
            text = substitute(raw, "pk1")
            assert not addresses_outside_the_lab(text), f"{page} {name}: {text}"
            assert "10.1.1." not in text and "192.168." not in text
            assert not re.search(r"\bpibake( --cluster \S+)? lab \w+", text) or "--prefix pk1" in text, text
        names.add(name)
    source = Path(__file__).read_text()
    missing = [n for n in sorted(names) if f'"{n}"' not in source]
    assert not missing, f"blocks marked lab that this module never runs: {missing}"
    assert addresses_outside_the_lab("ssh pi@10.1.1.10 sinfo") == ["10.1.1.10"]
    assert addresses_outside_the_lab(f"deploy --hosts '{NET}.[11-13]' --bind 127.0.0.1:8443") == []
    assert DocsLab(Path("/h"), "pk1").client_argv(["verify"])[-2:] == ["sh", "verify"]
    assert "nsenter --net=/run/netns/pk1-red01" in DocsLab(Path("/h"), "pk1").client_argv(["x"])[7]


# --------------------------------------------------------------------------- the story, in order


def test_quick_start_in_the_lab_boots_the_burned_images(lab):
    lab.block("quickstart-lab.md", "qs-lab-init")
    lab.block("quickstart-lab.md", "qs-lab-burn")
    assert sorted(p.name for p in (lab.home / "images").iterdir()) == ["red00.img"] + [f"{w}.img" for w in WORKERS]
    results = lab.block("quickstart-lab.md", "qs-lab-up")
    out = {line: (stdout, stderr) for line, _code, stdout, stderr in results}
    assert "all workers idle" in out["sudo pibake lab up --from-images images"][1]
    assert "idle" in out["sudo pibake lab shell red00 -- sinfo"][0]
    assert sorted(out["sudo pibake lab shell red00 -- srun -N3 hostname"][0].split()) == WORKERS
    assert "red01" in out["sudo pibake lab shell red01"][0].split()  # `hostname` typed into the shell


def test_the_lab_page_by_hand(lab):
    results = lab.block("lab.md", "lab-by-hand", cwd=lab.home / "bylab")
    assert (lab.home / "bylab" / "images" / "red03.img").is_file()
    srun = [r for r in results if "srun" in r[0]][0]
    assert sorted(srun[2].split()) == WORKERS


def test_commands_page_lab_block(lab):
    results = lab.block("commands.md", "cmd-lab")
    status = json.loads([r for r in results if "status --json" in r[0]][0][2])
    assert status["registry"] == "answering"
    assert {h["name"] for h in status["hosts"]} == {"red00", *WORKERS}
    assert "idle" in [r for r in results if "sinfo" in r[0]][0][2]


def test_troubleshooting_lab_block(lab):
    results = lab.block("troubleshooting.md", "ts-lab")
    status = json.loads(results[0][2])
    assert all(h["running"] for h in status["hosts"]), status
    assert "status: done" in results[1][2]


def test_the_agent_runs_again_on_a_worker_and_on_the_manager(lab):
    """agent.md's two lines (a worker's agent.py, the manager's installed pibake) and commands.md's
    `pibake agent run --config agent.json` (in /etc/pibake on the manager) change nothing and say ready."""
    (worker_line, manager_line) = [ln for b, lns, _ in doc_blocks((DOCS / "agent.md").read_text())
                                   if b == "agent-run" for ln in lns]
    for host, line in (("red01", worker_line), ("red00", manager_line)):
        code, out, err = lab.on_host(host, line)
        assert code == 0, f"agent.md agent-run on {host}: exit {code}\n{err}"
        result = json.loads(out)
        assert (result["status"], result["hostname"], result["changed"]) == ("ready", host, []), result
    RAN.append(("agent.md", "agent-run"))
    ((line,),) = [lns for b, lns, _ in doc_blocks((DOCS / "commands.md").read_text()) if b == "cmd-agent"]
    assert line.startswith("pibake agent run --config agent.json")
    code, out, err = lab.on_host("red00", f"sh -c 'cd /etc/pibake && /opt/{line.replace('pibake', 'pibake/bin/pibake', 1)}'")
    assert code == 0, err
    assert json.loads(out)["status"] == "ready"
    RAN.append(("commands.md", "cmd-agent"))


def test_the_agent_config_sample_is_what_the_seed_writes(lab):
    from pibake.bake.bootpart import read_seed

    _, body = page_block("agent.md", "agent-config")
    sample = json.loads(body)
    user_data = yaml.safe_load(read_seed(lab.home / "images" / "red01.img").user_data)
    (entry,) = [f for f in user_data["write_files"] if f["path"] == "/etc/pibake/agent.json"]
    real = json.loads(entry["content"])
    assert sorted(sample) == sorted(real)
    assert {k: sample[k] for k in ("registry_url", "ca_cert", "hostname", "role", "manager", "credential_file",
                                   "boot_dir")} == {k: real[k] for k in ("registry_url", "ca_cert", "hostname", "role",
                                                                        "manager", "credential_file", "boot_dir")}
    assert re.fullmatch(r"K10[0-9a-f]{64}::\w+\.\w+", real["join_token"])
    assert entry["permissions"] == "0600"
    RAN.append(("agent.md", "agent-config"))


def test_the_checks_over_ssh_of_the_pi_quick_start_and_troubleshooting(lab):
    results = lab.block("quickstart-pi.md", "qs-pi-check")
    nodes, sinfo, srun = (r[2] + r[3] for r in results)  # registry nodes prints its table on stderr
    assert all(re.search(rf"^{w}\s.*\bready\b.*\bidle\b", nodes, re.M) for w in WORKERS), nodes
    assert "idle" in sinfo and sorted(results[2][2].split()) == WORKERS
    nodes, accept = (r[2] + r[3] for r in lab.block("troubleshooting.md", "ts-nodes"))
    assert "red03" in nodes and "red03" in accept
    dates, munge = (r[2] for r in lab.block("troubleshooting.md", "ts-clock"))
    assert len(dates.splitlines()) == 2 and "UTC" in dates
    assert "STATUS:          Success (0)" in munge and f"ENCODE_HOST:     red00 ({NET}.10)" in munge


def test_verify_as_the_manual_shows_it(lab):
    lab.block("quickstart-pi.md", "qs-pi-verify")
    results = lab.block("commands.md", "cmd-verify")
    out = {line: (stdout, stderr) for line, _code, stdout, stderr in results}
    assert "verify: all checks passed" in out["pibake verify"][1]
    report = json.loads(out["pibake verify --json"][0])
    assert report["ok"] is True and [n["hostname"] for n in report["nodes"]] == WORKERS
    # the human output shown: the same checks in the same order, each line `STATUS NAME summary`
    _, text = page_block("verify.md", "verify-text-sample")
    shown = re.findall(r"^(?:ok|FAIL|skip) +(\S+) ", text, re.M)
    assert shown == [c["name"] for c in report["checks"]]
    assert re.findall(r"^ok +(\S+) ", out["pibake verify"][1], re.M) == shown
    assert text.rstrip().splitlines()[-1] == "verify: 3 check(s) failed"
    RAN.append(("verify.md", "verify-text-sample"))
    _, sample = page_block("verify.md", "verify-json-sample")
    assert keys_of(json.loads(sample)) == keys_of(report)
    RAN.append(("verify.md", "verify-json-sample"))
    today = json.loads((lab.home / "reports" / "today" / "report.json").read_text())
    assert today["ok"] is True and today["bench"]["ok"] is True
    # verify.md's Python block, with what it shows as expressions printed
    _, body = page_block("verify.md", "verify-python")
    script = lab.home / "verify_block.py"
    script.write_text(body + "\nimport json\nprint(json.dumps({'ok': report.ok, 'json': report.to_json()}))\n")
    code, stdout, err = lab.run([sys.executable, str(script)], client=True)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["ok"] is True and keys_of(result["json"]) == keys_of(report)
    RAN.append(("verify.md", "verify-python"))


def test_deploy_as_the_commands_page_shows_it(lab):
    by_name, by_ip = lab.block("commands.md", "cmd-deploy")
    assert "3 host(s)" in by_name[3] and "0 failed" in by_name[3]
    report = json.loads(by_ip[2])
    assert report["ok"] is True and sorted(h["hostname"] for h in report["hosts"]) == WORKERS
    assert all(h["slurm_state"] == "idle" for h in report["hosts"]), report


def test_a_verify_job_from_python_as_the_rest_page_shows_it(lab):
    _, body = page_block("rest.md", "rest-python")
    script = lab.home / "rest_block.py"
    script.write_text(body + "\nimport json\nprint(json.dumps(runner.wait(job['id'])))\n")
    code, stdout, err = lab.run([sys.executable, str(script)], client=True)
    assert code == 0, err
    printed, job = stdout.splitlines()[0], json.loads(stdout.splitlines()[-1])
    assert printed == "True"
    RAN.append(("rest.md", "rest-python"))
    _, sample = page_block("rest.md", "rest-job-sample")
    sample = json.loads(sample)
    assert sorted(sample) == sorted(job) and sorted(sample["progress"]) == sorted(job["progress"])
    assert set(sample["result"]) <= set(job["result"]) and job["state"] == sample["state"] == "done"
    assert job["kind"] == "verify" and job["result"]["ok"] is True
    RAN.append(("rest.md", "rest-job-sample"))


def _serve_cluster(lab):
    """A second cluster directory for `registry serve`: its slurm.conf in the test folder, applied never."""
    serve = lab.home / "serve"
    code, _, err = lab.run([sys.executable, "-m", "pibake", "--cluster", str(serve), "init", "--manager", "red00",
                            "--manager-ip", f"{NET}.10", "--network", f"{NET}.0/24"])
    assert code == 0, err
    path = serve / "cluster.yaml"
    data = yaml.safe_load(path.read_text())
    data["registry"] = {"slurm_conf": str(serve / "slurm.conf"), "slurm_apply": "none", "slurm_state": False}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return serve


def _curl(lab, env, address, *args):
    return lab.run(["curl", "-sS", "--max-time", "10", "--cacert", "serve/secrets/ca.crt", "--resolve",
                    f"red00:8443:{address}", *args], client=True, env=env)


def _serve(lab, env, line, address):
    """Start one `registry serve` line in the lab's network; wait until /health answers at ``address``."""
    text = substitute(line, lab.prefix)
    assert not addresses_outside_the_lab(text)
    proc = subprocess.Popen(lab.client_argv(["bash", "-c", text]), cwd=lab.home, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(lab.home / "serve.log", "ab"))
    end = time.monotonic() + 60
    while True:
        code, out, _ = _curl(lab, env, address, "https://red00:8443/api/v1/health")
        if code == 0 and json.loads(out)["status"] == "ok":
            return proc
        assert proc.poll() is None, f"`{text}` exited {proc.returncode}: {(lab.home / 'serve.log').read_text()[-3000:]}"
        assert time.monotonic() < end, f"`{text}`: /health never answered"
        time.sleep(0.3)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_registry_serve_then_accept_and_remove_a_pending_node(lab):
    from pibake.secrets import load_join_token

    serve = _serve_cluster(lab)
    env = dict(lab.env, PIBAKE_CLUSTER=str(serve))  # the serve cluster in place of ./cluster
    first, second = [ln for b, lns, _ in doc_blocks((DOCS / "commands.md").read_text())
                     if b == "cmd-registry-serve" for ln in lns]
    proc = _serve(lab, env, first, "127.0.0.1")
    assert _stop(proc) == 0, "registry serve must exit 0 on SIGTERM"
    proc = _serve(lab, env, second, f"{NET}.11")  # 0.0.0.0: also red01's own address
    try:
        assert json.loads((serve / "registry-serve.json").read_text())
        body = {"hostname": "red05", "mac": "02:00:00:00:00:05", "ips": [f"{NET}.15"], "role": "worker",
                "cpus": 4, "memory_mb": 3789, "model": "Raspberry Pi 4 Model B Rev 1.4",
                "slurmd_c": "NodeName=red05 CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 "
                            "RealMemory=3789"}
        code, out, err = _curl(lab, env, f"{NET}.11", "-H", f"Authorization: Bearer {load_join_token(serve).token}",
                               "-H", "Content-Type: application/json", "-d", json.dumps(body),
                               "https://red00:8443/api/v1/enrol")
        assert code == 0 and json.loads(out)["status"] == "pending", (out, err)
        (accept_line, accept_code, accept_out, _), = lab.block(
            "commands.md", "cmd-registry-accept", env=env, only=slice(0, 1))
        accepted = json.loads(accept_out)
        assert accepted["hostname"] == "red05" and accepted["status"] != "pending", accepted
        assert re.search(r"^NodeName=red05 ", (serve / "slurm.conf").read_text(), re.M)  # written, applied never
        (remove_line, remove_code, remove_out, _), = lab.block(
            "commands.md", "cmd-registry-accept", env=env, only=slice(1, 2))
        assert json.loads(remove_out)["hostname"] == "red05"
        assert "red05" not in (serve / "slurm.conf").read_text()
    finally:
        assert _stop(proc) == 0
    RAN.append(("commands.md", "cmd-registry-serve"))


def test_lab_down_as_the_manual_shows_it_removes_every_trace(lab):
    from pibake.lab.cluster import lab_exists

    lab.block("quickstart-lab.md", "qs-lab-down")
    assert lab.downs and all(norm == "pibake lab down" for _, _, norm in lab.downs), lab.downs
    code, _, err = lab.run(["bash", "-c", f"pibake lab down --prefix {lab.prefix}"])
    assert code == 0, err
    assert lab_exists(lab.prefix) == []
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(lab.prefix + "-")]
    assert lab.booted == "pibake lab up --from-images images"
    assert lab_blocks() <= set(RAN), f"not run: {sorted(lab_blocks() - set(RAN))}"
