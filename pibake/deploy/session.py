"""One deploy: the manager first (left alone when its registry answers, set up over ssh when nothing answers),
then the workers through their steps, then the wait until Slurm reports them idle. The manual: docs/deploy.md."""

import logging
import shutil
import tempfile
import time

from pibake.cluster import load_cluster
from pibake.deploy.hosts import manager_ssh_target, parse_hosts, planned_addresses, with_planned_addresses
from pibake.deploy.manager import manager_plan_for
from pibake.deploy.node import agent_source, manager_key_authorization
from pibake.deploy.results import DeployReport, final_status, manager_not_ready
from pibake.deploy.steps import HostState, Inputs
from pibake.errors import ConfigError, DeployError, RegistryClientError
from pibake.registry_client import NOTHING_LISTENS, RegistryClient
from pibake.secrets import seed_secrets
from pibake.ssh import SshOptions

LOG = logging.getLogger(__name__)

DEFAULT_PARALLEL = 32
DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_IDLE_TIMEOUT = 180
IDLE_POLL_S = 0.5  # each poll makes the registry run sinfo on the manager
AGENT_RETRY_AFTER_S = 20  # a node not idle this long after its agent ran gets one more agent run
MANAGER_REGISTRY_TIMEOUT = 90  # seconds from starting the manager's registry until /health must answer


def registry_down(why):
    """True when ``why`` (a RegistryClientError's ``reason`` from /health) means nothing listens at the
    registry's address (pure): then deploy sets the manager up. A TLS failure or an HTTP error means something
    runs there that is not this cluster's healthy registry: deploy does not touch it."""
    return why in NOTHING_LISTENS


def health_problem(registry):
    """None when the registry's /health answers, else the RegistryClientError that says why not."""
    try:
        registry.health()
    except RegistryClientError as exc:
        return exc
    return None


def slurm_states(registry):
    """{hostname: slurm_state} from ``GET /nodes`` (admin); None while the registry does not answer."""
    try:
        nodes = registry.nodes()
    except RegistryClientError as exc:
        if exc.status == 401:
            raise DeployError("the registry refused the admin password of this cluster directory "
                              "(secrets/admin-password): is it the same cluster?") from None
        return None
    return {n.get("hostname"): n.get("slurm_state") for n in nodes}


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def deploy(cluster_dir, hosts, *, manager=None, user=None, parallel=DEFAULT_PARALLEL,
           connect_timeout=DEFAULT_CONNECT_TIMEOUT, ssh_options=(), idle_timeout=DEFAULT_IDLE_TIMEOUT,
           wheel=None, progress=None):
    """Make ``hosts`` (names or IPs, NodeSet syntax, or a list) Slurm workers of the cluster in ``cluster_dir``;
    set up the manager over ssh first when its registry does not answer.

    ``manager``: how to reach the cluster's manager over ssh (its name or IP in cluster.yaml; default: the
    entry of ``hosts`` that is the manager, else cluster.yaml's manager name). ``hosts`` may contain the
    manager: its row then says what was done there (``unchanged`` when its registry answers).
    ``user``: ssh login (default: ssh's own choice, e.g. from ~/.ssh/config); a non-root user needs
    passwordless sudo. ``parallel``: at most this many ssh sessions at once. ``connect_timeout``: seconds
    (ssh's ConnectTimeout). ``ssh_options``: extra ssh arguments, e.g. ("-F", "lab_ssh_config").
    ``wheel``: the pibake wheel the manager installs (default: the running pibake's own,
    ``pibake.bake.burn.manager_wheel``; only needed when the manager is set up).
    ``progress``: called with a host's result dict (``HostResult.to_dict()``) whenever its step or status
    changes. Returns a ``DeployReport``; raises PibakeError only when nothing could be tried (bad host list,
    no cluster, expired join token, no wheel for a manager that needs one).
    """
    from pibake.deploy.runner import Runner  # start-up: ClusterShell's task engine loads only when a deploy runs

    started_wall, t0 = _now_iso(), time.monotonic()
    cluster = load_cluster(cluster_dir)
    targets = parse_hosts(hosts)
    if manager is not None and manager not in (cluster.manager, cluster.manager_ip):
        raise ConfigError(f"--manager {manager}: this cluster's manager is {cluster.manager} "
                          f"({cluster.manager_ip}) in cluster.yaml; its registry certificate and join token "
                          "belong to it")
    try:
        parallel = int(parallel)
        connect_timeout = int(connect_timeout)
    except (TypeError, ValueError):
        raise DeployError("--parallel and --connect-timeout take whole numbers") from None
    if parallel < 1 or connect_timeout < 1:
        raise DeployError("--parallel and --connect-timeout must be at least 1")
    manager_target = manager_ssh_target(cluster, targets, manager)
    in_hosts = manager_target in targets

    sec = seed_secrets(cluster_dir)
    secrets = {"agent": agent_source().encode(), "ca": sec.ca_cert_pem.encode(), "token": sec.join_token,
               "authorize": manager_key_authorization(cluster, sec.manager_ssh_key)}
    registry = RegistryClient.for_cluster(cluster, cluster_dir)
    t_health = time.monotonic()
    problem = health_problem(registry)
    plan = manager_plan_for(cluster, cluster_dir, wheel) if problem and registry_down(problem.reason) else None

    mgr = HostState.for_target(manager_target, role="manager", plan=plan)
    mgr.result.hostname = cluster.manager
    workers = [HostState.for_target(t) for t in targets if t != manager_target]
    host_runs = [mgr if t == manager_target else next(w for w in workers if w.result.host == t) for t in targets]
    if not in_hosts and plan is not None:
        host_runs.insert(0, mgr)  # deploy sets the manager up: it gets its row, first
    LOG.info("deploy: %d host(s), up to %d ssh sessions at once, registry %s", len(targets), parallel,
             registry.api)
    # One ssh session per host runs all its steps (runner.py): each ssh session costs the deploying machine a
    # process, and a connection (the key exchange) or a channel of a multiplexed one (bench/deploy --ssh-costs)
    ssh_dir = tempfile.mkdtemp(prefix="pibake-ssh-")  # 0700: the planned addresses' ssh config
    ssh = SshOptions(user=user, connect_timeout=connect_timeout, extra=tuple(ssh_options))
    try:
        ssh = with_planned_addresses([h.result.host for h in host_runs], planned_addresses(cluster, cluster_dir),
                                     ssh, ssh_dir)
        runner = Runner(Inputs(cluster, secrets, user), parallel=parallel, ssh=ssh, progress=progress)
        if problem is not None and plan is None:
            # something answers at the registry's address, but not this cluster's healthy registry: never
            # overwrite what runs there
            mgr.started = t_health
            if not in_hosts:
                host_runs.insert(0, mgr)
            mgr.result.step = "registry"
            runner.fail(mgr, f"registry: {problem}; deploy sets up only a manager "
                             "whose registry is not running (is it this cluster's manager?)")
        elif plan is None:  # the registry answers: the manager is left alone
            mgr.started = t_health
            mgr.result.timings["registry"] = time.monotonic() - t_health
            if in_hosts:
                runner.note(mgr, step="ready", status="unchanged")
        else:
            LOG.info("deploy: the registry at %s does not answer (%s); setting up the manager %s over ssh",
                     registry.api, problem.reason, manager_target)
            _setup_manager(runner, mgr, registry)
        if mgr.result.status == "failed":
            for w in workers:
                w.started = w.started or time.monotonic()
                w.result.error = manager_not_ready(mgr.result)
                runner.note(w, status="failed")
        elif workers:
            runner.run(workers)
            # A node whose slurmd did not stay up (e.g. it started while slurmctld restarted for other nodes) is
            # not idle after a short while: run its agent once more (it starts what is not running), then wait.
            idle_end = time.monotonic() + idle_timeout
            _wait_idle(registry, workers, min(idle_timeout, AGENT_RETRY_AFTER_S), progress, final=False)
            stragglers = [h for h in workers if h.result.status == "running" and h.result.step == "idle"]
            if stragglers:
                LOG.info("deploy: %s not idle after %d s; running the agent there again",
                         ", ".join(h.result.host for h in stragglers), AGENT_RETRY_AFTER_S)
                runner.run(stragglers, "agent")
            _wait_idle(registry, workers, max(0.0, idle_end - time.monotonic()), progress, budget=idle_timeout)
        return DeployReport(hosts=[h.result for h in host_runs], manager=cluster.manager,
                            registry=registry.base, parallel=parallel,
                            started_at=started_wall, duration_s=time.monotonic() - t0)
    finally:
        registry.close()
        shutil.rmtree(ssh_dir, ignore_errors=True)


def _setup_manager(runner, mgr, registry):
    """The manager's steps up to the registry's start, the wait for /health, then its agent."""
    runner.run([mgr])
    if mgr.result.status == "failed":
        return
    end = time.monotonic() + MANAGER_REGISTRY_TIMEOUT
    problem = health_problem(registry)
    while problem is not None and time.monotonic() < end:
        time.sleep(0.5)
        problem = health_problem(registry)
    mgr.result.timings["registry"] = mgr.result.timings.get("registry", 0.0) + time.monotonic() - mgr.step_started
    if problem is not None:
        runner.fail(mgr, f"registry: no answer from {problem.url} after "
                         f"{MANAGER_REGISTRY_TIMEOUT} s ({problem.reason}); see /var/log/pibake/pibake-registry.log on "
                         "the manager (journalctl -u pibake-registry with systemd)")
        return
    LOG.info("deploy: the manager's registry answers; running its agent")
    runner.run([mgr], "agent")


def _wait_idle(registry, host_runs, timeout, progress, final=True, budget=None):
    waiting = [h for h in host_runs if h.result.status == "running" and h.result.step == "idle"]
    end = time.monotonic() + timeout
    states = {}
    while waiting:
        states = slurm_states(registry) or states
        for h in list(waiting):
            state = states.get(h.result.hostname)
            h.result.slurm_state = state
            if state == "idle":
                waiting.remove(h)
                h.result.timings["idle"] = h.result.timings.get("idle", 0.0) + time.monotonic() - h.step_started
                h.result.status = final_status(h.result)
                h.result.duration_s = time.monotonic() - h.started
                if progress:
                    progress(h.result.to_dict())
        if not waiting or time.monotonic() > end:
            break
        time.sleep(IDLE_POLL_S)
    if not final:
        return
    for h in waiting:
        state = states.get(h.result.hostname)
        h.result.status = "failed"
        h.result.error = (f"idle: the node is {state or 'not in sinfo'} after {round(budget or timeout)} s "
                          "(see slurmd's log on the node and slurmctld's on the manager)")
        h.result.duration_s = time.monotonic() - h.started
        if progress:
            progress(h.result.to_dict())
