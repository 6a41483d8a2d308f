"""The pibake Python API. The CLI and the REST API are thin shells over these functions.

    from pibake import api
    api.init_cluster("cluster", manager="red00", manager_ip="10.1.1.10", network="10.1.1.0/24")
    cluster = api.load_cluster("cluster")
    nodes = api.plan_nodes(cluster, "red[01-04]", "10.1.1.[11-14]")
    seed = api.render_seed(cluster, nodes[0], api.seed_secrets("cluster"))
"""

from pibake.bake.lint import lint_seed  # noqa: F401
from pibake.bake.seed import render_seed, render_seeds  # noqa: F401
from pibake.cluster import init_cluster, load_cluster  # noqa: F401
from pibake.plan import plan_from_inventory, plan_nodes  # noqa: F401
from pibake.plan import record_plan, recorded_plan, resolve_plan  # noqa: F401
from pibake.secrets import (  # noqa: F401
    check_permissions,
    ensure_secrets,
    load_join_token,
    rotate_join_token,
    seed_secrets,
    wpa_psk,
)
from pibake.bake.images import (  # noqa: F401,E402
    load_catalog,
    open_image_stream,
    resolve_image,
    verify_image,
)
from pibake.bake.devices import (  # noqa: F401,E402
    card_identity,
    check_target,
    confirmation_prompt,
    describe_devices,
    list_devices,
    open_target,
    same_card,
)
from pibake.bake.allocation import image_allocation_map  # noqa: F401,E402
from pibake.bake.writer import spool_stream, write_image, written_ranges_sha256  # noqa: F401,E402
from pibake.registry.service import RegistryService, cluster_settings  # noqa: F401,E402
from pibake.registry.slurmconf import generate_slurm_conf, parse_slurmd_c  # noqa: F401,E402
from pibake.bake.bootpart import find_boot_partition, read_seed, write_seed  # noqa: F401,E402
from pibake.bake.burn import burn, reseed  # noqa: F401,E402
from pibake.bake.manifest import entries as manifest_entries  # noqa: F401,E402
from pibake.bake.manifest import latest_by_hostname as manifest_latest_by_hostname  # noqa: F401,E402
from pibake.bake.synthetic import build_pi_image  # noqa: F401,E402
from pibake.lab.cluster import lab_down, lab_freeze, lab_power, lab_run, lab_status, lab_up  # noqa: F401,E402
from pibake.firstboot.agent import collect_facts as agent_facts  # noqa: F401,E402
from pibake.firstboot.agent import run_agent  # noqa: F401,E402
from pibake.lab.hosts import LabHost, LabNetwork, cleanup_leftovers  # noqa: F401,E402
from pibake.deploy import DeployReport, HostResult, deploy  # noqa: F401,E402
# What the CLI (which imports nothing else of pibake) and the registry's handlers use; names say which part.
from pibake.benchmarks import bench_markdown, summary_rows as bench_summary_rows  # noqa: F401,E402
from pibake.bake import burn as bake_burn, images as bake_images  # noqa: F401,E402
from pibake.bake.devices import DEFAULT_MAX_BYTES, SystemFacts, gather_facts, human_size, parse_size  # noqa: F401,E402
from pibake.deploy import DEFAULT_CONNECT_TIMEOUT as DEPLOY_CONNECT_TIMEOUT  # noqa: F401,E402
from pibake.deploy import DEFAULT_IDLE_TIMEOUT as DEPLOY_IDLE_TIMEOUT  # noqa: F401,E402
from pibake.deploy import DEFAULT_PARALLEL as DEPLOY_PARALLEL, format_table as format_deploy_table  # noqa: F401,E402
from pibake.errors import ConfigError, NotBuiltError, PibakeError, SecretsError  # noqa: F401,E402
from pibake import fields  # noqa: F401,E402  (the CLI checks option values with them)
from pibake.model import BOARDS  # noqa: F401,E402
from pibake.firstboot import agent as firstboot_agent  # noqa: F401,E402
from pibake.jobs import DEFAULT_WORKERS as DEFAULT_JOB_WORKERS, MANAGER_FUNCTIONS as MANAGER_JOB_FUNCTIONS  # noqa: F401,E402
from pibake.lab.cluster import lab_shell_command, shell_argv as lab_shell_argv  # noqa: F401,E402
from pibake.lab.rootfs import DEFAULT_RELEASE as LAB_DEFAULT_RELEASE, RELEASES as LAB_RELEASES  # noqa: F401,E402
from pibake.secrets import secrets_dir  # noqa: F401,E402
from pibake.tables import text_table  # noqa: F401,E402
from pibake.errors import AgentFailed, SwitchError, TargetError  # noqa: F401,E402
from pibake.verify import verify  # noqa: F401,E402
from pibake.jobs import JobRunner  # noqa: F401,E402
from pibake.lab.target import cached_target_image, ensure_target_image  # noqa: F401,E402
from pibake.bake.golden import BakeError, read_marker as baked_marker  # noqa: F401,E402
from pibake.lab.rootfs import debian_mirror  # noqa: F401,E402
from pibake.switches import (  # noqa: F401,E402
    all_status as switches_status,
    cycle_switch,
    list_switches,
    set_credentials as set_switch_credentials,
    switch_command,
    switch_info,
    switch_log,
    switch_status,
)
from pibake.switches.recover import recover_node  # noqa: F401,E402
from pibake.switches.auto import Policy as AutoPolicy, auto_pass  # noqa: F401,E402
from pibake.switches.rules import load_rules, rules_pass  # noqa: F401,E402
from pibake.broker import setup_broker as mqtt_setup  # noqa: F401,E402
from pibake.mqtt import CONF_FILE as MQTT_CONF_FILE, ETC_DIR as MQTT_ETC_DIR, PID_FILE as MQTT_PID_FILE  # noqa: F401,E402


def served_registry_options(cluster_dir):
    """The options ``pibake registry serve`` runs the registry with (pibake.registry.server)."""
    from pibake.registry.server import served_options  # start-up: gunicorn loads only for the registry commands

    return served_options(cluster_dir)


def serve_registry(cluster_dir, **options):
    """Serve the registry under gunicorn with TLS (``pibake registry serve``); returns when it stops."""
    from pibake.registry.server import serve  # start-up: gunicorn loads only for the registry commands

    return serve(cluster_dir, **options)


from pibake.sensors import Sensors, parse_time as parse_sensor_time  # noqa: F401,E402
from pibake.sensors_model import METRICS as SENSOR_METRICS  # noqa: F401,E402
from pibake.switches.loop import LOOPS as SWITCH_LOOPS, LoopBusy, run_loop as run_switch_loop  # noqa: F401,E402
from pibake.switches.rules import last_round as rules_last_round, rules_status  # noqa: F401,E402
from pibake.switches import DriverMissing as SwitchDriverMissing  # noqa: F401,E402


def bake_image(name_or_path, cluster_dir, role, *, sha256=None, cache_dir=None, image_cache_dir=None, mirror=None,
               offline=False, progress=None):
    """``pibake image bake``: the role's packages installed into a cached copy of the image
    (``pibake.bake.golden``); apt fetches only from ``mirror`` (default: this machine's configured Debian
    mirror) and the image's own local repositories (``offline``: only those)."""
    return bake_burn.bake_image(name_or_path, cluster_dir, role, sha256=sha256, cache_dir=cache_dir,
                                image_cache_dir=image_cache_dir,
                                mirror=None if offline else (mirror or debian_mirror()), offline=offline,
                                progress=progress)
