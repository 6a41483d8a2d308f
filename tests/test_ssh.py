"""One description of how pibake calls OpenSSH (pibake.ssh.SshOptions), used by verify's connector, deploy's
ClusterShell task and the lab's ssh to emulated Pis. The checks run the real ssh with ``-G`` (it prints the
configuration it would use and connects nowhere), so what is compared is what ssh itself understood."""

import dataclasses

import pytest
from ClusterShell.Task import task_self

from pibake.connect import Connectors, SshConnector
from pibake.lab.targetrun import ssh_argv
from pibake.run import run
from pibake.ssh import SshOptions
from tests.conftest import needs_program

pytestmark = needs_program("ssh")


def resolved(argv):
    """ssh's own configuration for ``argv`` (an ssh command line; ``-G`` is added after the options)."""
    i = argv.index("--") if "--" in argv else len(argv)
    return config_of(run([argv[0], "-G", *argv[1:i]], timeout=10).stdout)


def config_of(text):
    """``ssh -G`` output -> {keyword: first value} (identityfile and a few others repeat)."""
    conf = {}
    for line in text.splitlines():
        if " " in line:
            key, value = line.split(None, 1)
            conf.setdefault(key, value)
    return conf


def test_the_options_say_what_each_setting_asks_for(tmp_path):
    key = tmp_path / "key"
    key.write_text("")  # ssh -G lists an identity only when the file exists
    ssh = SshOptions(user="pi", identity=str(key), known_hosts="/kh", connect_timeout=3, host_key_check="accept-new",
                     log_level="ERROR", extra=("-p", "2222"))
    argv = ssh.argv("10.1.1.11", "echo 'a b'")
    assert argv[-3:] == ["10.1.1.11", "--", "echo 'a b'"] and argv[-5:-3] == ["-l", "pi"]
    assert argv[1:3] == ["-p", "2222"]  # the user's own options first: ssh keeps the first value it reads
    conf = resolved(argv)
    assert (conf["user"], conf["port"], conf["batchmode"], conf["connecttimeout"]) == ("pi", "2222", "yes", "3")
    assert (conf["stricthostkeychecking"], conf["userknownhostsfile"], conf["identitiesonly"]) == \
        ("accept-new", "/kh", "yes")
    assert (conf["forwardagent"], conf["forwardx11"], conf["loglevel"]) == ("no", "no", "ERROR")
    assert (conf["controlmaster"], conf.get("controlpath")) == ("false", None)  # one session per host: no master
    assert conf["identityfile"] == str(key)


def test_the_users_options_win_over_pibakes_defaults():
    conf = resolved(SshOptions(connect_timeout=3, extra=("-o", "ConnectTimeout=7", "-o", "BatchMode=no"))
                    .argv("h", "true"))
    assert (conf["connecttimeout"], conf["batchmode"]) == ("7", "no")


def test_an_unset_setting_is_left_to_ssh():
    argv = SshOptions().argv("h", "true")
    assert not any(a.startswith(("StrictHostKeyChecking", "UserKnownHostsFile", "LogLevel", "Control"))
                   for a in argv)
    assert "-l" not in argv and "-i" not in argv


def test_the_config_command_names_the_host_last():
    assert SshOptions(user="pi").config_argv("red01")[-2:] == ["-G", "red01"]


def test_verify_and_the_lab_take_their_ssh_from_it():
    conn = SshConnector(user="pi", identity="/k", known_hosts="/kh", connect_timeout=3, addresses={"red01": "10.1.1.11"})
    assert conn.argv("red01", ["sh", "-c", "echo $(hostname)"]) == SshOptions(
        user="pi", identity="/k", known_hosts="/kh", connect_timeout=3, host_key_check="accept-new",
        log_level="ERROR").argv("10.1.1.11", "sh -c 'echo $(hostname)'")
    lab = ssh_argv(1234, "/key", "pi", "10.77.0.20", "true")
    assert lab[:5] == [lab[0], "-t", "1234", "--net", "--"]
    conf = resolved(lab[5:])
    assert (conf["stricthostkeychecking"], conf["userknownhostsfile"], conf["user"]) == ("false", "/dev/null", "pi")


def _started_config(connector, host, address, start):
    """The configuration ssh got when ``connector`` started it on a ClusterShell task (``-G`` among its
    options makes the real ssh print it instead of connecting). ``start``: "spawn" (pibake.connect_workers
    starts the ssh) or "clustershell" (its fallback: ClusterShell builds the ssh command line from the task
    settings and starts it)."""
    if start == "spawn":
        with_g = SshConnector(options=dataclasses.replace(connector.ssh, extra=(*connector.ssh.extra, "-G")),
                              addresses=connector.addresses)
        out = Connectors(with_g).run(host, ["true"], timeout=20)
        assert out.rc == 0, out.stderr
        return config_of(out.stdout)
    task = task_self()
    saved = {key: task.info(key) for key in ("fanout", *connector.ssh.clustershell_info())}
    try:
        connector.prepare(task, 4)
        task.set_info("ssh_options", task.info("ssh_options") + " -G")
        worker = connector.start(task, host, "true", handler=None, timeout=20)
        task.resume()
        return config_of(bytes(worker.node_buffer(address)).decode())
    finally:
        for key, value in saved.items():
            task.set_info(key, value)


@pytest.mark.parametrize("user", [None, "pi"])
def test_deploys_clustershell_task_starts_the_same_ssh(tmp_path, user, process_start):
    """deploy's connector (its own SshOptions) starts the same ssh as SshOptions' own argv gives, whether it
    starts the process itself or ClusterShell builds the command line from the task."""
    ssh = SshOptions(user=user, connect_timeout=4, extra=("-o", "Port=2202"))
    conf = _started_config(SshConnector(options=ssh), "red01", "red01", process_start)
    assert conf and conf == resolved(ssh.argv("red01", "true"))


def test_verifys_connector_starts_the_same_ssh_at_the_recorded_address(process_start):
    conn = SshConnector(user="pi", identity="/k", known_hosts="/kh", connect_timeout=3, addresses={"red01": "10.1.1.11"})
    conf = _started_config(conn, "red01", "10.1.1.11", process_start)
    assert conf and conf == resolved(conn.argv("red01", ["true"]))
    assert (conf["hostname"], conf["stricthostkeychecking"], conf["user"]) == ("10.1.1.11", "accept-new", "pi")
