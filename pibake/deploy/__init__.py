"""``pibake deploy``: make running machines Slurm workers over ssh, in parallel, with a result per host.

    from pibake.deploy import deploy
    report = deploy("cluster", "red[01-04]")          # or "10.1.1.[11-14]", or a list of names/IPs
    report.ok, report.exit_code, report.to_dict()      # report.to_json() is what `pibake deploy --json` prints

Built like pyinfra: ``facts`` (a command + a pure parser), ``steps`` (per step, a pure function from facts to
a command and a reader of its outcome), one ``runner`` that executes them over ssh (ClusterShell) and records
per-host ``results``; ``session`` is one deploy (manager first, workers, wait for idle); ``manager`` takes the
manager's steps from its seed; ``remote/`` holds the programs that run on the nodes. The manual, with what
each step does on a host: docs/deploy.md.
"""

from pibake.deploy.facts import _MARK, facts_spec, parse_host_facts, remote_program, session_command  # noqa: F401
from pibake.deploy.hosts import (  # noqa: F401
    address_config,
    manager_ssh_target,
    parse_hosts,
    planned_addresses,
    split_config_option,
    ssh_error,
    with_planned_addresses,
)
from pibake.deploy.manager import (  # noqa: F401
    MANAGER_WHEEL_DIR,
    ManagerPlan,
    agent_script,
    manager_plan,
    manager_plan_for,
    setup_script,
    shell_line,
)
from pibake.deploy.node import (  # noqa: F401
    AFTER_WRITE,
    AGENT_CONFIG,
    AGENT_PATH,
    CA_PATH,
    CREDENTIAL_FILE,
    REMOTE_PATH,
    ROLE_PACKAGES,
    role_packages,
    SENSOR_FILES,
    SENSOR_UNIT,
    TIMESYNCD_DROPIN,
    TOKEN_FILE,
    WORKER_FACT_FILES,
    agent_config,
    files_to_ship,
    manager_config_equivalents,
    manager_key_authorization,
    missing_packages,
    wanted_files,
)
from pibake.deploy.results import (  # noqa: F401
    MANAGER_STEPS,
    STEPS,
    DeployReport,
    HostResult,
    final_status,
    format_table,
    manager_not_ready,
    summarize,
)
from pibake.deploy.session import (  # noqa: F401
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_PARALLEL,
    deploy,
    registry_down,
)
from pibake.deploy.steps import agent_changes, credential_rejected, parse_agent_output  # noqa: F401
from pibake.errors import DeployError  # noqa: F401
