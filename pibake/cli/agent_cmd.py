"""``pibake agent run``: the first-boot agent (pibake.firstboot.agent) from an installed pibake.

The same module cloud-init ships to a node as one file; here it runs with pibake's logging and
error handling (used by ``pibake deploy`` over ssh, and by hand on a node that has pibake).
"""

import logging

import click

from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state
from pibake.api import AgentFailed, firstboot_agent as agent


@cli.group("agent", short_help="Run the first-boot agent")
def agent_group():
    """The first-boot agent: enrols this machine with the registry and makes it a Slurm node."""


@agent_group.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Agent config JSON (on a node: /etc/pibake/agent.json).")
@click.option("--once", is_flag=True, help="One attempt per request: no retries, no waiting for the registry.")
@json_option
@pass_state
def run_cmd(state, config_path, once, as_json):
    """Enrol (or authenticate with the stored node credential), install the munge key, configure and
    start munge + slurmd, and report ready to the registry. Safe to run again."""
    if state.verbosity >= 0:  # the agent says what it does unless -q
        logging.getLogger(agent.__name__).setLevel(logging.DEBUG if state.verbosity >= 2 else logging.INFO)
    try:
        result = agent.run_agent(config_path, once=once)
    except agent.AgentError as exc:
        if as_json:
            emit_json({"status": "error", "message": str(exc)})
        raise AgentFailed(str(exc), exc.exit_code) from None
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['hostname']}: {result['status']} ({result['message']})", err=True)
