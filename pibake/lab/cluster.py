"""The lab cluster: burned images booted as Pi-like hosts on one Linux machine.

``lab_up`` turns a folder of burned images (``DIR/<hostname>.img``, made by ``pibake burn --output``)
into running lab hosts:

1. one lab bridge and, per image, a namespace host (``pibake.lab.hosts.LabHost``) with the IP from
   the image's own ``network-config``, inside the lab's namespaces only (the bridge and the veth ends
   have no address on this machine, not even IPv6 link-local ones; there is no gateway and no NAT:
   nothing the hosts send leaves the bridge);
2. per host a real root: an overlay of the cached Debian rootfs, with the image's whole FAT boot
   partition copied to /boot/firmware (``rootfs.make_host_root``);
3. every seed, read back from its image (``bake.bootpart.read_seed``), checked against the host's
   own cloud-init schema before anything boots (a bad seed: nothing boots, the error names host
   and key);
4. boot = cloud-init's four stages (``boot.boot_host``): the manager first (its registry and
   slurmctld come up from its own cloud-init), then the workers, which enrol through their agent;
   ``manager_delay`` boots the workers first instead (their agents retry);
5. sshd started in every host once cloud-init's init stage is done, before its config and final stages
   (on a Pi, systemd starts the enabled ssh.service then: the agent enrols a node that answers ssh);
6. wait until every worker is ``idle`` in ``sinfo`` on the manager.

Every name starts with the lab's prefix (default ``pblab``), so ``lab_down`` removes a crashed
lab's leftovers by name (``hosts.cleanup_leftovers``). The lab's state (hosts, PIDs, timings) is
kept in ``/run/pibake-lab/<prefix>.json``; host state lives under ``/tmp/pibake-lab-<prefix>/``.

    report = lab_up("cluster", images_dir="images")      # or: lab_up("cluster") burns them itself
    lab_status()["hosts"]                                 # per host: running, cloud-init, slurm, enrolled
    lab_run("red00", ["srun", "-N3", "hostname"]).stdout
    lab_down()
"""

import concurrent.futures
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from pibake.bake.bootpart import read_seed
from pibake.bake.burn import burn
from pibake.bake.synthetic import build_pi_image
from pibake.cluster import load_cluster
from pibake.errors import LabClusterError, PibakeError, SeedError
from pibake.fields import valid_hostname
from pibake.files import atomic_write
from pibake.lab.boot import (  # one environment for commands in a lab host
    HOST_ENV,
    boot_host,
    reboot_host,
    validate_seed,
    write_host_file,
)
from pibake.lab.hosts import (
    LabHost,
    LabNetwork,
    _check_prefix,
    _link_names,
    _netns_names,
    cleanup_leftovers,
    default_base_dir,
    kill_all,
    pids_in_netns,
    run_ip,
)
from pibake.lab.rootfs import (
    DEFAULT_RELEASE,
    check_release,
    ensure_rootfs,
    make_host_root,
    rootfs_stamp,
)
from pibake.layout import AGENT_CONFIG
from pibake.plan import recorded_plan
from pibake.registry.slurmctl import DEFAULT_CONF, marker_path, parse_sinfo, reconfigure_pending
from pibake.run import run, which
from pibake.secrets import admin_password, secrets_dir

LOG = logging.getLogger(__name__)

DEFAULT_PREFIX = "pblab"
STATE_DIR = Path("/run/pibake-lab")
IMAGE_SUFFIX = ".img"
# Names of lab work folders next to the hosts' folders: never valid hostnames (underscore).
ROOTS_DIR = "_roots"
IMAGES_DIR = "_images"


# --------------------------------------------------------------------------- pure helpers


def seed_host(hostname, seed, manager):
    """{name, ip, role} of the host a seed read back from an image is for.

    The IP is the first address of ``network-config``'s wired interface, the role comes from the
    agent config in ``user-data`` (``manager`` for the cluster's manager name when absent).
    """
    try:
        net = yaml.safe_load(seed.network_config or "") or {}
    except yaml.YAMLError:
        net = {}
    net = net.get("network", net) if isinstance(net, dict) else {}
    ip = None
    for nic in (net.get("ethernets") or {}).values() if isinstance(net, dict) else ():
        addresses = (nic or {}).get("addresses") or []
        if addresses:
            try:
                ip = str(ipaddress.ip_interface(str(addresses[0])).ip)
            except ValueError:
                ip = None
            break
    role = None
    try:
        user = yaml.safe_load(seed.user_data or "") or {}
    except yaml.YAMLError:
        user = {}
    for entry in (user.get("write_files") or []) if isinstance(user, dict) else ():
        if isinstance(entry, dict) and entry.get("path") == AGENT_CONFIG:
            try:
                role = json.loads(entry.get("content") or "{}").get("role")
            except (ValueError, AttributeError):
                role = None
    if role is None:
        role = "manager" if hostname == manager else "worker"
    return {"name": hostname, "ip": ip, "role": role}


def worker_names(manager, manager_ip, network, count):
    """Hostnames and IPs for ``count`` workers after the manager: red00/10.1.1.10 -> red01/.11, ..."""
    m = re.match(r"^(.*?)(\d*)$", manager)
    stem, digits = m.group(1), m.group(2)
    width = max(len(digits), 2)
    start = int(digits) + 1 if digits else 1
    net = ipaddress.ip_network(network)
    first_ip = ipaddress.ip_address(manager_ip) + 1
    names, ips = [], []
    for i in range(count):
        ip = first_ip + i
        if ip not in net or ip == net.broadcast_address:
            raise LabClusterError(f"{count} workers after {manager_ip} do not fit in {network}: use fewer --workers")
        names.append(f"{stem}{start + i:0{width}d}")
        ips.append(str(ip))
    return names, ips


def boot_order(hosts, manager_delay):
    """The boot groups: [[manager], [workers...]] normally; workers first when ``manager_delay`` > 0."""
    managers = [h for h in hosts if h["role"] == "manager"]
    others = [h for h in hosts if h["role"] != "manager"]
    groups = [managers, others] if not manager_delay else [others, managers]
    return [g for g in groups if g]


def enter_argv(pid):
    """The argv prefix that runs a command in every namespace of the lab host whose PID 1 is ``pid``."""
    return [which("nsenter") or "nsenter", "-t", str(pid), "-a", "--wd=/", "--"]


def host_argv(host, argv, env=None):
    """The argv that runs ``argv`` inside a lab host's own root (``host``: a state entry)."""
    env = {**HOST_ENV, **(env or {})}
    return [*enter_argv(host["pid"]), "chroot", host["root"], "/usr/bin/env", "-i",
            *[f"{k}={v}" for k, v in env.items()], *[str(a) for a in argv]]


# --------------------------------------------------------------------------- state


def state_path(prefix=DEFAULT_PREFIX, state_dir=None):
    _check_prefix(prefix)  # also keeps the state file name inside the state folder
    return Path(state_dir or STATE_DIR) / f"{prefix}.json"


def load_state(prefix=DEFAULT_PREFIX, state_dir=None):
    """The lab's recorded state (a dict), or None when no lab with ``prefix`` was brought up."""
    try:
        return json.loads(state_path(prefix, state_dir).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise LabClusterError(f"{state_path(prefix, state_dir)} is damaged: run `pibake lab down`") from None


def _save_state(state, state_dir=None):
    path = state_path(state["prefix"], state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(state, indent=2, sort_keys=True), 0o600)


def _require_state(prefix, state_dir):
    state = load_state(prefix, state_dir)
    if state is None:
        raise LabClusterError(f"no lab is running (prefix {prefix}): start one with `pibake lab up`")
    return state


def _host(state, name):
    for host in state["hosts"]:
        if host["name"] == name:
            return host
    names = ", ".join(h["name"] for h in state["hosts"]) or "none"
    raise LabClusterError(f"the lab has no host {name!r} (hosts: {names})")


def _alive(host):
    pid = host.get("pid")
    if not pid or not os.path.exists(f"/proc/{pid}"):
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == host.get("netns_id")
    except OSError:
        return False


# --------------------------------------------------------------------------- images


def lab_images(images_dir, manager, *, manager_outside=False):
    """[(hostname, image path)] of ``DIR/<hostname>.img``, the manager first, then by name.

    ``manager_outside``: the manager is not a lab host (an emulated Pi on the lab bridge), so its image
    is not needed here."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise LabClusterError(f"--from-images {images_dir}: no such folder (make images with "
                              "pibake burn --output 'DIR/{hostname}.img')")

    found = []
    for path in sorted(folder.glob(f"*{IMAGE_SUFFIX}")):
        name = path.name[: -len(IMAGE_SUFFIX)]
        if not valid_hostname(name):
            raise LabClusterError(f"{path}: the file name must be <hostname>.img with a valid hostname")
        found.append((name, path))
    if not found:
        raise LabClusterError(f"--from-images {images_dir}: no <hostname>.img files in it")
    if manager not in [n for n, _ in found] and not manager_outside:
        raise LabClusterError(f"--from-images {images_dir}: no image for the manager {manager} ({manager}.img)")
    found.sort(key=lambda item: (item[0] != manager, item[0]))
    return found


def burn_lab_images(cluster_dir, out_dir, *, workers=3, progress=None):
    """Burn the manager and ``workers`` workers of the cluster's plan onto a synthetic Pi-like image
    (``bake.synthetic.build_pi_image``): ``out_dir/<hostname>.img``. Returns the folder."""
    note = progress or (lambda message: None)
    cluster = load_cluster(cluster_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir.parent / "synthetic-raspios.img"
    note("building a synthetic Pi-like base image (nothing is downloaded)")
    build_pi_image(base, size="160M", boot_size="64M", family="raspios")
    planned = [n for n in recorded_plan(cluster_dir) if n.role == "worker"]
    if len(planned) >= workers:
        names, ips = [n.hostname for n in planned[:workers]], [n.ip for n in planned[:workers]]
    else:
        names, ips = worker_names(cluster.manager, cluster.manager_ip, cluster.network, workers)
    template = str(out_dir / "{hostname}.img")
    note(f"burning {cluster.manager} (manager) and {', '.join(names)} to {out_dir}")
    burn(cluster_dir, hostnames=cluster.manager, ips=cluster.manager_ip, role="manager", output=template,
         image=str(base))
    if names:
        burn(cluster_dir, hostnames=",".join(names), ips=",".join(ips), role="worker", output=template,
             image=str(base))
    base.unlink(missing_ok=True)
    return out_dir


# --------------------------------------------------------------------------- up


def _base_dir(prefix):
    return default_base_dir(prefix)


def _running_hosts(state):
    return [h["name"] for h in (state or {}).get("hosts", []) if _alive(h)]


def lab_up(cluster_dir, *, images_dir=None, workers=3, manager_delay=0.0, prefix=DEFAULT_PREFIX, wait=True,
           timeout=600.0, rootfs=None, release=None, state_dir=None, progress=None, manager_outside=False,
           sim_bus=None, sensor_settings=None):
    """Bring a lab cluster up from burned images and return its report (a dict, see ``lab up --json``).

    ``images_dir``: ``DIR/<hostname>.img`` from ``pibake burn --output``; None: burn the manager and
    ``workers`` workers onto a synthetic Pi-like image first. ``manager_delay`` (seconds): boot the
    workers first and the manager that long after them. ``wait``: wait (up to ``timeout`` s) until
    every worker is idle in sinfo. ``progress(message)`` gets one-line progress notes. ``release``: the
    Debian release of the hosts' root (``trixie`` by default, or ``bookworm``; see ``rootfs.RELEASES``),
    ignored when ``rootfs`` names a built root.
    ``manager_outside``: boot only the workers' images; the manager is elsewhere on the lab bridge (an
    emulated Pi, ``pibake.lab.targetrun``), so nothing waits for its registry or its sinfo.
    ``sim_bus``: a register image (JSON, e.g. tests/fixtures/sensors/bme280-lab.json) that sensor hosts read
    instead of an I2C bus; ``sensor_settings``: more sensor-agent settings for them (e.g. ``{"interval_s": 5}``).
    Both reach a sensor host before it boots as the drop-in /etc/pibake/sensor.d/50-lab.json (``sensor_dropin``).

    A seed that fails cloud-init's schema stops everything before any host boots (``SeedError`` naming
    the host and the key) and the lab is removed again. A lab that boots but does not become idle is
    left running for inspection (``LabClusterError`` says how to look and how to remove it).
    """
    note = progress or (lambda message: None)
    _check_prefix(prefix)
    release = check_release(release or DEFAULT_RELEASE)
    if os.geteuid() != 0:
        raise LabClusterError("the lab needs root (network, mount, UTS and PID namespaces)")
    cluster_dir = Path(cluster_dir).resolve()
    cluster = load_cluster(cluster_dir)
    previous = load_state(prefix, state_dir)
    running = _running_hosts(previous)
    if running:
        raise LabClusterError(f"a lab is already running (prefix {prefix}: {', '.join(running)}): "
                              "run `pibake lab down` first")
    report = cleanup_leftovers(prefix)  # a crashed lab's namespaces, links and folders
    if report["netns"] or report["links"]:
        note(f"removed leftovers of an earlier lab: {', '.join(report['netns'] + report['links'])}")
    state_path(prefix, state_dir).unlink(missing_ok=True)

    started = time.monotonic()
    timings = {}
    base = _base_dir(prefix)
    if manager_outside and images_dir is None:
        raise LabClusterError("a lab whose manager is outside it boots only images it is given: pass images_dir")
    if images_dir is not None:
        lab_images(images_dir, cluster.manager, manager_outside=manager_outside)  # refuse a bad folder before anything is made
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        if images_dir is None:
            t0 = time.monotonic()
            images_dir = burn_lab_images(cluster_dir, base / IMAGES_DIR, workers=workers, progress=note)
            timings["burn_s"] = round(time.monotonic() - t0, 2)
        hosts = _hosts_from_images(lab_images(images_dir, cluster.manager, manager_outside=manager_outside),
                                   cluster)
        t0 = time.monotonic()
        rootfs = Path(rootfs) if rootfs else ensure_rootfs(release=release, progress=note)
        timings["rootfs_s"] = round(time.monotonic() - t0, 2)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise

    state = {
        "prefix": prefix, "cluster_dir": str(cluster_dir), "cluster": cluster.name, "network": cluster.network,
        "manager": cluster.manager, "manager_ip": cluster.manager_ip, "registry_port": cluster.registry_port,
        "rootfs": str(rootfs), "release": (rootfs_stamp(rootfs) or {}).get("release", release),
        "images_dir": str(Path(images_dir).resolve()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hosts": [],
    }
    network = None
    lab_hosts = []
    try:
        network = LabNetwork.create(prefix, cluster.network)
        no_machine_address(network.bridge)
        t0 = time.monotonic()
        note(f"creating {len(hosts)} hosts on {cluster.network} (bridge {network.bridge}, no address on this machine)")
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
            made = list(pool.map(lambda h: _make_host(h, network, rootfs, base, started), hosts))
        for host, (lab_host, record) in zip(hosts, made):
            lab_hosts.append(lab_host)
            state["hosts"].append(record)
        timings["hosts_s"] = round(time.monotonic() - t0, 2)
        _save_state(state, state_dir)

        # every seed is checked before any host boots
        t0 = time.monotonic()
        problems = []
        for host, record in zip(hosts, state["hosts"]):
            try:
                validate_seed(record["root"], host["seed"], enter=enter_argv(record["pid"]), host=host["name"])
            except SeedError as err:
                problems.append(str(err))
        if problems:
            raise SeedError("; ".join(problems) + " (nothing was booted)")
        timings["validate_s"] = round(time.monotonic() - t0, 2)
        for record in state["hosts"]:
            if record["role"] == "sensor" and (sim_bus or sensor_settings):
                sensor_dropin(record, sim_bus=sim_bus, settings=sensor_settings)
    except BaseException:
        for lab_host in lab_hosts:
            lab_host.destroy()
        if network is not None:
            network.destroy()
        cleanup_leftovers(prefix)
        state_path(prefix, state_dir).unlink(missing_ok=True)
        raise

    by_name = {h["name"]: h for h in hosts}
    groups = boot_order(state["hosts"], manager_delay)
    for i, group in enumerate(groups):
        if i and manager_delay:
            note(f"waiting {manager_delay:g} s before booting the manager (--manager-delay)")
            time.sleep(manager_delay)
        note("booting " + ", ".join(f"{r['name']} ({r['role']})" for r in group) + " (cloud-init)")
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(group)) as pool:
                list(pool.map(lambda r: _boot(r, by_name[r["name"]]["seed"], started), group))
        except PibakeError as err:
            raise LabClusterError(f"booting failed: {err} (the lab stays up for inspection: "
                                  f"pibake lab status; pibake lab down)") from err
        finally:
            _save_state(state, state_dir)
        if i == 0 and len(groups) > 1 and not manager_delay and all(r["boot"]["ok"] for r in group):
            # as a person would: power the workers on once the manager is up (its registry answers);
            # not waiting is safe too (the agents retry), only slower
            note("waiting for the manager's registry to answer")
            timings["registry_s"] = _wait_registry(state, started, timeout=120)
    failed = [r for r in state["hosts"] if not r["boot"]["ok"]]
    if failed:
        raise LabClusterError("; ".join(f"{r['name']}: cloud-init did not finish cleanly: "
                                        f"{'; '.join(r['boot']['errors'][:2]) or r['boot']['status']}"
                                        for r in failed)
                              + f" (the lab stays up: pibake lab shell {failed[0]['name']}; pibake lab down)")
    timings["booted_s"] = round(time.monotonic() - started, 2)

    if wait:
        note("waiting for every worker to be idle in sinfo")
        _wait_idle(state, started, timeout)
        timings["all_idle_s"] = round(time.monotonic() - started, 2)
    timings["total_s"] = round(time.monotonic() - started, 2)
    state["timings"] = timings
    _save_state(state, state_dir)
    return _up_report(state)


def _hosts_from_images(images, cluster):
    """[{name, ip, role, image, seed}] from the seeds read back from the images; refuses missing seeds,
    addresses outside the cluster's network and two images with one address."""
    hosts = []
    for name, image in images:
        seed = read_seed(image)
        if seed is None:
            raise SeedError(f"{name}: {image} has no cloud-init seed on its boot partition (burn it with pibake)")
        entry = seed_host(name, seed, cluster.manager)
        if not entry["ip"]:
            raise SeedError(f"{name}: the seed's network-config on {image} gives no address")
        if ipaddress.ip_address(entry["ip"]) not in ipaddress.ip_network(cluster.network):
            raise LabClusterError(f"{name}: {entry['ip']} is outside the cluster's network {cluster.network}")
        entry.update(image=str(Path(image).resolve()), seed=seed)
        hosts.append(entry)
    ips = [h["ip"] for h in hosts]
    dup = sorted({ip for ip in ips if ips.count(ip) > 1})
    if dup:
        raise LabClusterError(f"two images use the same address {dup[0]}: burn them again with distinct IPs")
    return hosts


def _make_host(host, network, rootfs, base, started):
    t0 = time.monotonic()
    lab_host = LabHost.create(host["name"], host["ip"], network=network, base_dir=base)
    try:
        no_machine_address(lab_host.veth)
        record = {
            "name": host["name"], "ip": host["ip"], "role": host["role"], "image": host["image"],
            "pid": lab_host.pid, "netns": lab_host.netns, "netns_id": os.readlink(f"/proc/{lab_host.pid}/ns/net"),
            "mac": lab_host.mac, "timings": {"host_s": round(time.monotonic() - t0, 2)},
        }
        t1 = time.monotonic()
        root = make_host_root(rootfs, base / ROOTS_DIR / host["name"], enter=enter_argv(lab_host.pid),
                              boot_image=host["image"], timeout=300)
        record["root"] = str(root)
        record["timings"]["root_s"] = round(time.monotonic() - t1, 2)
        record["boot"] = {"ok": False, "status": "not booted", "errors": []}
    except BaseException:
        lab_host.destroy()
        raise
    return lab_host, record


SENSOR_SIM_BUS = "/etc/pibake/sim-bus.json"
SENSOR_DROPIN = "/etc/pibake/sensor.d/50-lab.json"


def sensor_dropin(record, *, sim_bus=None, settings=None):
    """Before a sensor host boots: copy the register image ``sim_bus`` into it and write the sensor agent's
    drop-in (/etc/pibake/sensor.d/, read after the seed's /etc/pibake/sensor.json) selecting it, plus
    ``settings``. The seed itself stays exactly what a Pi gets."""
    dropin = dict(settings or {})
    enter = enter_argv(record["pid"])
    if sim_bus:
        try:
            image = Path(sim_bus).read_text(encoding="utf-8")
            json.loads(image)
        except (OSError, ValueError) as exc:
            raise LabClusterError(f"sim_bus {sim_bus}: not a readable register image ({exc})") from None
        write_host_file(record["root"], SENSOR_SIM_BUS, image, enter=enter, timeout=60)
        dropin["sim_bus"] = SENSOR_SIM_BUS
    write_host_file(record["root"], SENSOR_DROPIN, json.dumps(dropin, indent=2) + "\n", enter=enter, timeout=60,
                    mode="0600")


def _boot(record, seed, started):
    record["timings"]["boot_start_s"] = round(time.monotonic() - started, 2)
    # sshd starts after cloud-init's init stage, as ssh.service does on a Pi: the agent (final stage) enrols a
    # node that already answers ssh, so the manager's switch loops never see an enrolled node without ssh
    result = boot_host(record["root"], seed, enter=enter_argv(record["pid"]), host=record["name"], validate=False,
                       after_init=lambda: record.update(sshd=_start_sshd(record)))
    record["timings"]["cloud_init_s"] = result.seconds
    record["boot"] = {"ok": result.ok, "status": result.status.get("status"), "errors": result.errors,
                      "hostname": result.hostname}
    record["timings"]["boot_done_s"] = round(time.monotonic() - started, 2)
    LOG.info("%s booted: %s", record["name"], record["boot"])
    return record


def _wait_registry(state, started, timeout):
    """Seconds since ``started`` when the registry answered /health (None when it did not in time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _registry_get(state, "/health", auth=False)[0] == 200:
            return round(time.monotonic() - started, 2)
        time.sleep(0.25)
    LOG.warning("the registry did not answer within %s s; booting the workers anyway (their agents retry)", timeout)
    return None


def no_machine_address(link):
    """Take IPv6 off a lab link on this machine's side (the bridge, a host's veth end): the kernel gives
    every link a link-local fe80:: address, through which lab hosts could reach this machine's services.
    The hosts keep theirs (they reach each other only)."""
    path = Path("/proc/sys/net/ipv6/conf") / link / "disable_ipv6"
    if path.exists():
        path.write_text("1\n")


def _start_sshd(record):
    """Start sshd as systemd would at boot (ssh.service is enabled on the image); 'running' or why not."""
    check = run(host_argv(record, ["sh", "-c", "test -x /usr/sbin/sshd && ls /etc/ssh/ssh_host_*_key"]),
                check=False, timeout=60)
    if check.returncode != 0:
        return "not installed or no host keys"
    if run(host_argv(record, ["pgrep", "-x", "sshd"]), check=False, timeout=60).returncode == 0:
        return "running"
    proc = run(host_argv(record, ["/usr/sbin/sshd"]), check=False, timeout=60)
    if proc.returncode != 0:
        LOG.warning("%s: sshd did not start: %s", record["name"], proc.stderr.strip())
        return f"failed: {proc.stderr.strip()[-200:]}"
    return "running"


def _wait_idle(state, started, timeout):
    manager = next((h for h in state["hosts"] if h["role"] == "manager"), None)
    workers = [h for h in state["hosts"] if h["role"] == "worker"]
    if manager is None or not workers:
        return
    end = time.monotonic() + timeout
    states = {}
    while time.monotonic() < end:
        states = slurm_states(manager)
        for h in workers:
            if states.get(h["name"]) == "idle" and "idle_s" not in h["timings"]:
                h["timings"]["idle_s"] = round(time.monotonic() - started, 2)
        if all(states.get(h["name"]) == "idle" for h in workers) and not _reconfigure_pending(manager):
            return
        time.sleep(0.5)
    missing = ", ".join(f"{h['name']} ({states.get(h['name'], 'not in sinfo')})" for h in workers
                        if states.get(h["name"]) != "idle")
    raise LabClusterError(f"not idle after {timeout:g} s: {missing}. The lab stays up: look with "
                          f"`pibake lab status` and `pibake lab shell {manager['name']}`; remove it with "
                          "`pibake lab down`")


def _reconfigure_pending(manager):
    """True while the manager's registry has a restart's `scontrol reconfigure` still to send: after it the
    idle nodes show `unknown` until they register again, so the lab is not up yet."""
    marks = [str(marker_path(DEFAULT_CONF, what)) for what in ("restarted", "reconfigured")]
    proc = run(host_argv(manager, ["stat", "-c", "%.9Y %n", *marks]), check=False, timeout=30)
    mtimes = dict(reversed(line.split(" ", 1)) for line in proc.stdout.splitlines() if " " in line)
    return reconfigure_pending(*(float(mtimes.get(m, 0.0)) for m in marks))


def slurm_states(manager):
    """{node: state} from sinfo in the manager host ({} while slurmctld does not answer)."""
    proc = run(host_argv(manager, ["sinfo", "-N", "-h", "-o", "%N %T"]), check=False, timeout=30)
    return parse_sinfo(proc.stdout) if proc.returncode == 0 else {}


def _up_report(state):
    return {
        "prefix": state["prefix"], "cluster": state["cluster"], "network": state["network"],
        "release": state.get("release"), "timings": state.get("timings", {}),
        "hosts": [{k: h.get(k) for k in ("name", "ip", "role", "image", "boot", "sshd", "timings")}
                  for h in state["hosts"]],
    }


# --------------------------------------------------------------------------- use


def lab_run(name, argv, *, prefix=DEFAULT_PREFIX, state_dir=None, timeout=120, check=False, input=None):
    """Run ``argv`` inside lab host ``name``'s own root; a ``subprocess.CompletedProcess``."""
    host = _host(_require_state(prefix, state_dir), name)
    if not _alive(host):
        raise LabClusterError(f"lab host {name} is not running: `pibake lab power {name} on`, or "
                              "`pibake lab down`, then `pibake lab up`")
    return run(host_argv(host, argv), check=check, timeout=timeout, input=input)


def shell_argv(name, argv=None, *, prefix=DEFAULT_PREFIX, state_dir=None, term=None):
    """The argv of a shell (or of ``argv``) inside lab host ``name``: nsenter into all its namespaces,
    chroot into its root, a clean environment."""
    host = _host(_require_state(prefix, state_dir), name)
    if not _alive(host):
        raise LabClusterError(f"lab host {name} is not running: `pibake lab power {name} on`, or "
                              "`pibake lab down`, then `pibake lab up`")
    env = {"TERM": term or os.environ.get("TERM", "dumb"), "PS1": f"root@{name}(lab):\\w# "}
    return host_argv(host, list(argv) if argv else ["/bin/bash", "--norc", "-i"], env=env)


def lab_shell_command(name, argv, *, prefix=DEFAULT_PREFIX, state_dir=None):
    """Run ``argv`` inside lab host ``name`` on this terminal (nothing captured, no time limit); its exit code."""
    return run(shell_argv(name, argv, prefix=prefix, state_dir=state_dir), capture=False, timeout=None,
               check=False).returncode


def _registry_get(state, path, *, auth=True, timeout=30):
    """(HTTP status, JSON body) of GET /api/v1<path> on the lab's registry, TLS verified against the
    cluster's CA, asked from inside the manager's network namespace by ``pibake.lab.registry_probe`` (0 when
    it does not answer). The admin password goes through stdin, never an argv."""
    manager = next((h for h in state["hosts"] if h["role"] == "manager"), None)
    if manager is None or not _alive(manager):
        return 0, None
    cluster_dir = Path(state["cluster_dir"])
    spec = {"base": f"https://{state['manager_ip']}:{state['registry_port']}", "path": path,
            "ca": str(secrets_dir(cluster_dir) / "ca.crt"), "password": admin_password(cluster_dir) if auth else None,
            "timeout": min(10, timeout)}
    argv = [which("nsenter") or "nsenter", "-t", str(manager["pid"]), "--net", "--",
            sys.executable, "-m", "pibake.lab.registry_probe"]
    # cwd /: `python -m` puts the working directory first on sys.path, where a folder named pibake would shadow
    proc = run(argv, input=json.dumps(spec), check=False, timeout=timeout, cwd="/")
    try:
        status, data = json.loads(proc.stdout)
    except ValueError:
        return 0, None
    return status, data


def registry_nodes(state, timeout=30):
    """The registry's node list (GET /api/v1/nodes with the admin credential), None when it does not answer."""
    status, data = _registry_get(state, "/nodes", timeout=timeout)
    return data if status == 200 and isinstance(data, list) else None


def _cloud_init_status(host):
    proc = run(host_argv(host, ["cloud-init", "status", "--format", "json"]), check=False, timeout=60)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return {"status": "unknown", "errors": [proc.stderr.strip()[-200:]]}
    errors = list(data.get("errors") or [])
    for stage in ("init-local", "init", "modules-config", "modules-final"):
        value = data.get(stage)
        if isinstance(value, dict):
            errors.extend(e for e in value.get("errors") or [] if e not in errors)
    return {"status": data.get("status"), "errors": errors}


def lab_status(*, prefix=DEFAULT_PREFIX, state_dir=None):
    """Per host: name, ip, role, running, cloud-init status (done/errors), slurm state, enrolled."""
    state = _require_state(prefix, state_dir)
    manager = next((h for h in state["hosts"] if h["role"] == "manager"), None)
    slurm = slurm_states(manager) if manager and _alive(manager) else {}
    nodes = registry_nodes(state)
    enrolled = {n.get("hostname"): n.get("status") for n in nodes or []}
    out = []
    for host in state["hosts"]:
        alive = _alive(host)
        entry = {"name": host["name"], "ip": host["ip"], "role": host["role"], "running": alive,
                 "cloud_init": _cloud_init_status(host) if alive else None,
                 "slurm": slurm.get(host["name"]),
                 "enrolled": None if nodes is None else host["name"] in enrolled,
                 "registry_status": enrolled.get(host["name"]),
                 "sshd": _sshd_running(host) if alive else False}
        out.append(entry)
    return {"prefix": state["prefix"], "cluster": state["cluster"], "network": state["network"],
            "registry": "answering" if nodes is not None else "not answering", "hosts": out}


def _sshd_running(host):
    return run(host_argv(host, ["pgrep", "-x", "sshd"]), check=False, timeout=30).returncode == 0


# --------------------------------------------------------------------------- power


def _veth(state, host):
    """The machine's end of a host's link (``<prefix>-<last octet>``, as ``LabHost.create`` names it)."""
    return f"{state['prefix']}-{host['ip'].rsplit('.', 1)[1]}"


def _host_pids(host):
    return pids_in_netns(f"/run/netns/{host['netns']}")


def lab_freeze(name, *, prefix=DEFAULT_PREFIX, state_dir=None):
    """Hang lab host ``name`` as a Pi hangs (a stuck SD card, a kernel waiting forever): every process in it
    is stopped (SIGSTOP), so nothing answers, while its network link stays up (connections are accepted by
    the kernel and then never answered). Only a power cycle (``lab_power``) brings it back. Returns
    {"host", "stopped": number of processes}."""
    state = _require_state(prefix, state_dir)
    host = _host(state, name)
    if not _alive(host):
        raise LabClusterError(f"lab host {name} is powered off: nothing to freeze")
    pids = [p for p in _host_pids(host) if p != host["pid"]]  # PID 1 stays: power off kills through it
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    LOG.info("lab host %s frozen: %d processes stopped", name, len(pids))
    return {"host": name, "stopped": len(pids)}


def lab_power(name, action, *, prefix=DEFAULT_PREFIX, state_dir=None, progress=None, timeout=300.0):
    """Cut or restore the power of lab host ``name`` (``action``: "off" or "on"), as a smart plug does.

    off: every process of the host dies at once (its PID namespace goes, and with it the host's mounts and
    its /run) and its network link goes down; its card stays: the overlay's upper layer (the root file
    system) and its boot partition are kept.
    on: the link comes up, a new PID 1, the same root mounted again, and the boot a Pi does after a power
    cut: cloud-init's four stages on what the card holds (``boot.reboot_host``), sshd, and the units pibake's
    seed installed and enabled (``pibake-*.service``: the agent, on the manager also the registry), started
    the way ``pibake-start`` starts them without systemd. The agent then authenticates with its node
    credential and starts munge and slurmd, which register again.
    Returns {"host", "power", "seconds", ...}; "on" also the boot's "cloud_init" status and "units"; a boot
    whose cloud-init did not finish cleanly raises LabClusterError (the host stays on for inspection).
    """
    if action not in ("on", "off"):
        raise LabClusterError(f"power action must be on or off, not {action!r}")
    note = progress or (lambda message: None)
    state = _require_state(prefix, state_dir)
    host = _host(state, name)
    started = time.monotonic()
    if action == "off":
        report = _power_off(state, host, note)
    else:
        report = _power_on(state, host, note, timeout)
    host["power"] = action
    _save_state(state, state_dir)
    boot = report.get("cloud_init") or {"ok": True}
    if not boot["ok"]:  # as lab_up: a boot that did not finish cleanly is an error, the host stays up to look at
        raise LabClusterError(f"{name}: power is on, but cloud-init did not finish cleanly: "
                              f"{'; '.join(boot['errors'][:2]) or boot['status']} (look with `pibake lab shell {name}`)")
    return {"host": name, "power": action, "seconds": round(time.monotonic() - started, 2), **report}


def _power_off(state, host, note):
    if not _alive(host):
        raise LabClusterError(f"lab host {host['name']} is already off")
    pids = _host_pids(host)
    kill_all([host["pid"]] + [p for p in pids if p != host["pid"]])
    run_ip("link", "set", _veth(state, host), "down", check=False)
    note(f"{host['name']}: power off ({len(pids)} processes gone, link down)")
    return {"processes": len(pids)}


def _power_on(state, host, note, timeout):
    name = host["name"]
    if _alive(host):
        raise LabClusterError(f"lab host {name} is already on (`pibake lab power {name} off` first)")
    base = _base_dir(state["prefix"])
    run_ip("link", "set", _veth(state, host), "up")
    _init_proc, pid = LabHost.start_init(name, host["netns"], base / name)
    host.update(pid=pid, netns_id=os.readlink(f"/proc/{pid}/ns/net"))
    make_host_root(state["rootfs"], base / ROOTS_DIR / name, enter=enter_argv(pid), timeout=timeout)
    note(f"{name}: power on; booting (cloud-init)")
    result = reboot_host(host["root"], enter=enter_argv(pid), host=name, timeout=timeout,
                         after_init=lambda: host.update(sshd=_start_sshd(host)))  # as at first boot (_boot)
    host["boot"] = {"ok": result.ok, "status": result.status.get("status"), "errors": result.errors,
                    "hostname": result.hostname}
    units = []
    if result.ok:
        units = _start_boot_units(host)
    note(f"{name}: cloud-init {host['boot']['status']} in {result.seconds:.1f} s; started "
         + (", ".join(units) or "no units"))
    return {"cloud_init": host["boot"], "cloud_init_s": result.seconds, "sshd": host.get("sshd"), "units": units}


SEED_UNITS = "/etc/systemd/system/pibake-*.service"
PIBAKE_START = "/usr/local/lib/pibake/pibake-start"


def boot_units(unit_files):
    """[(unit, argv)] of the units systemd would start at boot: ``{unit name: unit file text}`` in, those
    with an ``[Install] WantedBy=multi-user.target`` and an ``ExecStart`` out. Pure."""
    found = []
    for unit, text in sorted(unit_files.items()):
        section, exec_start, wanted = None, None, False
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and line.startswith("ExecStart="):
                exec_start = shlex.split(line.split("=", 1)[1].lstrip("-@+!"))
            elif section == "Install" and line.startswith("WantedBy=") and "multi-user.target" in line:
                wanted = True
        if exec_start and wanted:
            found.append((unit, exec_start))
    return found


def _start_boot_units(host):
    """Start the units pibake's seed installed, as systemd starts enabled units at boot (on a Pi
    ``pibake-start`` enabled them at first boot; without systemd it runs them in the background)."""
    listing = run(host_argv(host, ["sh", "-c", f"for f in {SEED_UNITS}; do [ -f \"$f\" ] && echo \"$f\"; done"]),
                  check=False, timeout=60).stdout.split()
    files = {}
    for path in listing:
        files[Path(path).name] = run(host_argv(host, ["cat", path]), check=False, timeout=60).stdout
    started = []
    for unit, argv in boot_units(files):
        proc = run(host_argv(host, [PIBAKE_START, unit, "--", *argv]), check=False, timeout=60)
        if proc.returncode == 0:
            started.append(unit)
        else:
            LOG.warning("%s: %s did not start: %s", host["name"], unit, proc.stderr.strip()[-200:])
    return started


# --------------------------------------------------------------------------- down


def lab_down(*, prefix=DEFAULT_PREFIX, state_dir=None):
    """Remove the lab: every process, namespace, link and folder named after ``prefix`` (also after a
    crash, with or without a state file). Returns what was removed."""
    _check_prefix(prefix)
    state = load_state(prefix, state_dir) if state_path(prefix, state_dir).exists() else None
    report = cleanup_leftovers(prefix)
    for host in (state or {}).get("hosts", []):  # a host whose netns was already gone
        if _alive(host):
            try:
                os.kill(host["pid"], 9)
            except ProcessLookupError:
                pass
    base = _base_dir(prefix)
    if base.exists():
        shutil.rmtree(base, ignore_errors=True)
    state_path(prefix, state_dir).unlink(missing_ok=True)
    report["state"] = bool(state)
    return report


def lab_exists(prefix=DEFAULT_PREFIX):
    """Names of this machine's network namespaces and links that belong to the lab ``prefix``."""
    return [n for n in _netns_names() + _link_names() if n.startswith(f"{prefix}-")]
