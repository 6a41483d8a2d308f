"""The manager's steps, taken from its own cloud-init seed (the same data a burned manager card boots with):
a ManagerPlan of packages, files and runcmd lines, and the shell text of its install and agent steps."""

import base64
import shlex
from dataclasses import dataclass, field

import yaml

from pibake.bake import manager_wheels
from pibake.bake.burn import manager_wheel
from pibake.bake.seed import SCRIPTS, WHEEL_GLOB, render_checked
from pibake.deploy.node import REMOTE_PATH
from pibake.errors import DeployError, PibakeError
from pibake.model import PlannedNode

MANAGER_WHEEL_DIR = "/var/lib/pibake/wheel"  # where deploy ships the wheel (a burned card has it on /boot/firmware)


@dataclass
class ManagerPlan:
    """What deploy does on a manager whose registry does not answer: the manager seed's own steps (pure data).

    ``packages``: the seed's package list; ``bootcmd``: argv lists run before the files (the 0700 cluster
    directory); ``files``: {path: (bytes, mode)} from the seed's write_files plus the wheel; ``setup``: the
    runcmd entries (argv lists, or shell strings) before the registry's start (hosts entry, chrony, sshd, pibake-install); ``install``: the
    pibake-install line among them; ``registry``/``agent``: the runcmd lines that start the registry and the
    agent; ``after``: the lines after the agent's start (the sensor agent's unit), run once the agent is done;
    ``wheel``: where the wheel goes on the manager."""

    packages: list
    bootcmd: list
    files: dict
    setup: list
    install: list
    registry: list
    agent: list
    wheel: str
    after: list = field(default_factory=list)


def _seed_file_bytes(entry):
    if entry.get("encoding") in ("b64", "base64"):
        return base64.b64decode(entry["content"])
    if entry.get("encoding") not in (None, "text/plain"):
        raise ValueError(f"write_files {entry['path']}: encoding {entry['encoding']} is not handled")
    return str(entry.get("content", "")).encode("utf-8")


def manager_plan(user_data, wheel_name, wheel_bytes, deps=None):
    """The manager's ManagerPlan from its rendered user-data (``#cloud-config`` text) and the wheel (pure).

    Every step comes from the seed: its ``packages``, ``bootcmd``, ``write_files`` and ``runcmd``. Left out:
    the runcmd line that scrubs the seed file on the boot partition (deploy puts no seed there). Changed:
    ``pibake-install`` gets the wheel deploy ships (``MANAGER_WHEEL_DIR/<wheel_name>``) instead of the boot
    partition's glob. ``deps``: {file name: bytes} of python-kasa's wheels and their requirements file
    (``manager_wheels.manager_deps``), shipped to ``MANAGER_WHEEL_DIR/deps`` where pibake-install finds them
    beside the wheel, as on a card. Raises ValueError when the seed does not have the shape this relies on."""
    config = yaml.safe_load(user_data)
    if not isinstance(config, dict):
        raise ValueError("the manager's user-data is not a cloud-config mapping")
    wheel = f"{MANAGER_WHEEL_DIR}/{wheel_name}"
    files = {}
    for entry in config.get("write_files") or ():
        if entry.get("owner", "root:root") != "root:root":
            raise ValueError(f"write_files {entry['path']}: owner {entry['owner']} is not handled")
        files[entry["path"]] = (_seed_file_bytes(entry), int(str(entry.get("permissions", "0644")), 8))
    files[wheel] = (wheel_bytes, 0o644)
    for name, data in (deps or {}).items():
        files[f"{MANAGER_WHEEL_DIR}/{manager_wheels.DEPS_DIR}/{name}"] = (data, 0o644)
    start, scrub, install_script = SCRIPTS["start"][0], SCRIPTS["scrub"][0], SCRIPTS["install_pibake"][0]
    setup, install, registry, agent, after = [], None, None, None, []
    for line in config.get("runcmd") or ():
        entry = line if isinstance(line, str) else [str(a) for a in line]  # a string runs as a shell line
        argv = shlex.split(entry) if isinstance(entry, str) else entry
        if not argv or argv[0] == scrub:
            continue
        if argv[0] == start and argv[1:2] == ["pibake-registry.service"]:
            registry = entry
        elif argv[0] == start and argv[1:2] == ["pibake-agent.service"]:
            agent = entry
        elif agent is not None and argv[0] == start:  # a unit started after the agent (the sensor agent)
            after.append(entry)
        elif registry is not None:
            raise ValueError(f"runcmd: {argv[0]} after the registry's start is not handled")
        else:
            if argv[0] == install_script and not isinstance(entry, str):
                entry = [wheel if a == WHEEL_GLOB else a for a in entry]
                install = entry
            setup.append(entry)
    if install is None or registry is None or agent is None:
        raise ValueError("the manager's runcmd lacks pibake-install, the registry's start or the agent's start")
    bootcmd = [c if isinstance(c, str) else [str(a) for a in c] for c in config.get("bootcmd") or ()]
    return ManagerPlan(packages=[str(p) for p in config.get("packages") or ()], bootcmd=bootcmd, files=files,
                       setup=setup, install=install, registry=registry, agent=agent, wheel=wheel, after=after)


def shell_line(entry):
    """One runcmd/bootcmd entry as a shell command: a list is quoted word by word, a string is run by the
    shell as written (as cloud-init does)."""
    return entry if isinstance(entry, str) else shlex.join(entry)


def setup_script(plan, *, reinstall):
    """The shell text of the ``install`` step: the seed's runcmd lines before the registry, stopping at the
    first failure; the pibake-install line only when ``reinstall`` (pure)."""
    lines = ["set -e", f"export PATH={REMOTE_PATH}"]
    for argv in plan.setup:
        if argv == plan.install and not reinstall:
            continue
        lines.append(shell_line(argv) + " >/dev/null")
    return "\n".join(lines) + "\n"


def agent_script(agent_line, after=()):
    """The manager's ``agent`` step from the seed's ``pibake-start pibake-agent.service -- COMMAND`` line: COMMAND
    in the foreground with --json (as deploy runs the agent on a worker), then, when systemd is PID 1, the
    seed's line itself, so that the unit runs on every boot; then the seed's ``after`` lines (pure)."""
    if isinstance(agent_line, str) or "--" not in agent_line:
        raise ValueError("the seed's agent line must be a list: pibake-start UNIT -- COMMAND...")
    command = agent_line[agent_line.index("--") + 1:] + ["--json"]
    return (f"export PATH={REMOTE_PATH}\n{shlex.join(command)}\nrc=$?\n"
            f"if [ $rc -eq 0 ] && [ -d /run/systemd/system ]; then {shell_line(agent_line)} >/dev/null 2>&1; fi\n"
            + "".join(f"if [ $rc -eq 0 ]; then {shell_line(line)} >/dev/null 2>&1; fi\n" for line in after)
            + "exit $rc\n")


def manager_plan_for(cluster, cluster_dir, wheel=None):
    """The ManagerPlan of this cluster's manager: its seed rendered and linted exactly as `pibake burn` does
    (``render_checked``), plus the wheel (``manager_wheel``: ``wheel`` or the running pibake's own) and, for
    a cluster with Kasa switches, python-kasa's wheels (``manager_wheels.manager_deps``, as burn ships them)."""
    node = PlannedNode(hostname=cluster.manager, ip=cluster.manager_ip, role="manager")
    ((_node, seed, _report),) = render_checked(cluster, cluster_dir, [node], family=cluster.family)
    path = manager_wheel(wheel)
    try:
        deps = manager_wheels.manager_deps(cluster)
    except PibakeError as exc:
        raise DeployError(str(exc)) from None
    try:
        return manager_plan(seed.user_data, path.name, path.read_bytes(), deps)
    except (ValueError, KeyError) as exc:  # a seed template this version of deploy cannot follow: a bug
        raise DeployError(f"cannot take the manager's steps from its seed: {exc}") from None
