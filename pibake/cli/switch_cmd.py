"""``pibake switch ...`` and ``pibake recover``: smart plugs, a thin shell over ``pibake.api``."""

import sys

import click

from pibake import api
from pibake.api import PibakeError
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state

yes_option = click.option("--yes", "-y", is_flag=True,
                          help="Do not ask before cutting the power of a node (needed without a terminal).")


def ssh_options(func):
    """--user, -i/--identity, --known-hosts: how a recovery reaches the node and the manager over ssh (as
    `pibake verify`); passed on as one ``ssh_options`` mapping."""
    func = click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
                        help="ssh known_hosts file to use (new hosts are accepted and remembered).")(func)
    func = click.option("--identity", "-i", type=click.Path(dir_okay=False), default=None,
                        help="ssh private key (default: ssh's own choice, ~/.ssh/config and the agent).")(func)
    return click.option("--user", default=None, help="ssh user on the nodes (default: the cluster's user).")(func)


def _ssh(user, identity, known_hosts):
    return {"user": user, "identity": identity, "known_hosts": known_hosts}


def _state_text(state):
    if state is None:
        return "-"
    text = "on" if state["on"] else "off"
    if state.get("power_w") is not None:
        text += f" {state['power_w']:g} W"
    if state.get("energy_kwh") is not None:
        text += f" {state['energy_kwh']:g} kWh"
    return text


def _table(rows, header):
    for line in api.text_table([header, *rows]):
        click.echo(line, err=True)


def _powers(item):
    return f"node {item['node']}" if item.get("node") else (item.get("thing") or "-")


def _confirm_power_cut(state, name, what, yes):
    """A node loses power: ask on a terminal, insist on --yes without one."""

    item = next((s for s in api.list_switches(state.cluster_dir) if s["name"] == name), None)
    if item is None or not item["node"] or yes:
        return
    if not sys.stdin.isatty():
        raise PibakeError(f"switch {name} powers node {item['node']}: {what} cuts its power; "
                          "add --yes to confirm")
    click.confirm(f"{what.capitalize()} cuts the power of node {item['node']}. Go on?", abort=True, err=True)


@cli.group("switch", short_help="Smart plugs: list, status, on, off, toggle, cycle")
def switch_group():
    """Smart plugs and relays declared under switches: in cluster.yaml (Kasa, Shelly Gen2+, Tasmota).

    Every command reads the state back from the device and reports it. See docs/switches.md."""


@switch_group.command("list")
@json_option
@pass_state
def list_cmd(state, as_json):
    """List the switches of cluster.yaml (no device is contacted)."""

    items = api.list_switches(state.cluster_dir)
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo("no switches in cluster.yaml (see docs/switches.md)", err=True)
        return
    _table([(s["name"], s["driver"], s["address"], s["transport"], _powers(s), "yes" if s["auto_cycle"] else "no")
            for s in items], ("NAME", "DRIVER", "ADDRESS", "VIA", "POWERS", "AUTO-CYCLE"))


@switch_group.command("status")
@click.argument("name", required=False)
@json_option
@pass_state
def status_cmd(state, name, as_json):
    """Read the state (and power, energy where metered) of NAME, or of every switch.

    With every switch, one that cannot be reached is reported with its error and the exit code is 1."""

    items = [api.switch_status(state.cluster_dir, name)] if name else api.switches_status(state.cluster_dir)
    if as_json:
        emit_json(items[0] if name else items)
    else:
        _table([(s["name"], _powers(s), _state_text(s["state"]) if s["state"] else f"error: {s['error']}")
                for s in items], ("NAME", "POWERS", "STATE"))
    if any(s.get("error") for s in items):
        sys.exit(1)


def _action(state, name, action, as_json):

    result = api.switch_command(state.cluster_dir, name, action)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{name}: {_state_text(result['state'])}", err=True)


@switch_group.command("on")
@click.argument("name")
@json_option
@pass_state
def on_cmd(state, name, as_json):
    """Turn NAME on; prints the state read back."""
    _action(state, name, "on", as_json)


@switch_group.command("off")
@click.argument("name")
@json_option
@yes_option
@pass_state
def off_cmd(state, name, as_json, yes):
    """Turn NAME off; prints the state read back. Asks first when it powers a node."""
    _confirm_power_cut(state, name, "turning it off", yes)
    _action(state, name, "off", as_json)


@switch_group.command("toggle")
@click.argument("name")
@json_option
@yes_option
@pass_state
def toggle_cmd(state, name, as_json, yes):
    """Flip NAME; prints the state read back. Asks first when it powers a node."""
    _confirm_power_cut(state, name, "toggling it", yes)
    _action(state, name, "toggle", as_json)


@switch_group.command("info")
@click.argument("name")
@json_option
@pass_state
def info_cmd(state, name, as_json):
    """What the device says it is (model, firmware, MAC, ...)."""

    result = api.switch_info(state.cluster_dir, name)
    if as_json:
        emit_json(result)
        return
    for key, value in result["info"].items():
        click.echo(f"{key}: {value}", err=True)


def _print_recovery(result, as_json):
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{result['node']}: recovered through switch {result['switch']}", err=True)


@switch_group.command("cycle")
@click.argument("name")
@click.option("--off-seconds", type=click.FloatRange(0, 600), default=None,
              help="How long the power stays off (default 10).")
@click.option("--wait", "wait_s", type=click.FloatRange(1, 7200), default=600, show_default=True,
              help="For a node: seconds to wait until it answers ssh and Slurm lists it idle.")
@click.option("--force", is_flag=True, help="For a node: cycle it even if ssh or Slurm says it is up.")
@ssh_options
@json_option
@yes_option
@pass_state
def cycle_cmd(state, name, off_seconds, wait_s, force, user, identity, known_hosts, as_json, yes):
    """Power-cycle NAME: off, wait, on, each step read back.

    \b
    For a switch that powers a node this recovers a hung node: it first checks that the node
    really is down (no ssh answer and Slurm marks it down or not responding; nothing is switched
    otherwise), then cycles the plug and waits until the node answers ssh and is idle in Slurm."""

    item = next((s for s in api.list_switches(state.cluster_dir) if s["name"] == name), None)
    if item is not None and item["node"]:
        _confirm_power_cut(state, name, "cycling it", yes)
        result = api.recover_node(state.cluster_dir, item["node"], off_s=off_seconds, wait_s=wait_s, force=force,
                                  progress=lambda m: click.echo(m, err=True),
                                  ssh_options=_ssh(user, identity, known_hosts))
        _print_recovery(result, as_json)
        return
    kwargs = {} if off_seconds is None else {"off_s": off_seconds}
    result = api.cycle_switch(state.cluster_dir, name, progress=lambda m: click.echo(m, err=True), **kwargs)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{name}: {_state_text(result['state'])} after the cycle", err=True)


@switch_group.command("credentials")
@click.argument("name")
@click.option("--username", default=None, help="Device user name (Kasa: the TP-Link account; Shelly/Tasmota: admin).")
@click.option("--mqtt-username", default=None, help="MQTT broker user name (Tasmota over MQTT).")
@click.option("--password-file", type=click.Path(dir_okay=False, allow_dash=True), default=None, metavar="FILE",
              help="Read the password (device, or broker with --mqtt-username) from the first line of FILE "
                   "('-' for standard input) instead of asking.")
@pass_state
def credentials_cmd(state, name, username, mqtt_username, password_file):
    """Store NAME's password in secrets/switch-NAME.json (mode 0400); never in cluster.yaml.

    The password is asked for (hidden) on a terminal, or read with --password-file."""

    if password_file == "-":
        password = sys.stdin.readline().rstrip("\n")
    elif password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\n")
        except OSError as exc:
            raise PibakeError(f"cannot read the password from {password_file}: {exc.strerror}") from None
    else:
        password = click.prompt("Password", hide_input=True, err=True)
    if mqtt_username:
        path = api.set_switch_credentials(state.cluster_dir, name, username=username, mqtt_username=mqtt_username,
                                          mqtt_password=password)
    else:
        path = api.set_switch_credentials(state.cluster_dir, name, username=username, password=password)
    click.echo(f"stored the credentials of {name} in {path}", err=True)


@switch_group.command("log")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
@pass_state
def log_cmd(state, limit, as_json):
    """The last switch actions (who, what, whether it worked), oldest first."""

    entries = api.switch_log(state.cluster_dir, limit)
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        what = e["action"] + (f" {e['node']}" if e.get("node") else "")
        result = "ok" if e.get("ok") else f"FAILED: {e.get('error', '')}"
        click.echo(f"{e['time']}  {e['switch']}  {what}  by {e.get('by', '-')}  {result}", err=True)


@switch_group.command("auto")
@click.option("--once", is_flag=True, help="One round, then exit (for a timer or cron); else every --interval.")
@click.option("--interval", type=click.FloatRange(5, 86400), default=60, show_default=True,
              help="Seconds between rounds.")
@click.option("--max-per-hour", type=click.IntRange(1, 60), default=2, show_default=True,
              help="Recoveries of one node within any hour.")
@click.option("--backoff", type=click.FloatRange(0, 86400), default=600, show_default=True,
              help="Seconds to wait after a node's first recovery before another; doubles each time in the hour.")
@click.option("--off-seconds", type=click.FloatRange(0, 600), default=10, show_default=True,
              help="How long the power stays off in a recovery.")
@click.option("--wait", "wait_s", type=click.FloatRange(1, 7200), default=600, show_default=True,
              help="Seconds to wait until a recovered node answers ssh and Slurm lists it idle.")
@ssh_options
@json_option
@pass_state
def auto_cmd(state, once, interval, max_per_hour, backoff, off_seconds, wait_s, user, identity, known_hosts,
             as_json):
    """Recover hung nodes by themselves: run on the manager.

    \b
    Each round looks at every switch with auto_cycle: true (never the manager, never a
    switch that powers a thing) and recovers its node when ssh and Slurm both find it down,
    like `pibake recover`, within --max-per-hour and with --backoff between attempts. Every
    attempt and every skip for the limit is recorded in `pibake switch log`. On the manager
    pibake-switch-auto.service runs this loop; one copy per cluster directory."""
    policy = api.AutoPolicy(max_per_hour=max_per_hour, backoff_s=backoff, off_s=off_seconds, wait_s=wait_s)

    def one_round():
        # looping (the manager's pibake-switch-auto.service): a node found up is not worth a journal line
        return api.auto_pass(state.cluster_dir, policy=policy, ssh_options=_ssh(user, identity, known_hosts),
                             progress=lambda m: click.echo(m, err=True), quiet_up=not once)

    report = api.run_switch_loop(state.cluster_dir, "auto", one_round, interval=interval, once=once,
                                 on_error=_loop_error)
    if once:
        if as_json:
            emit_json(report)
        elif not report:
            click.echo("no switch has auto_cycle: true", err=True)


def _loop_error(err):
    """A round of a loop failed with a user error: one line, and the loop goes on."""
    click.echo(f"pibake: error: {err}", err=True)


@switch_group.command("rules")
@click.option("--once", is_flag=True, help="One round, then exit (for a timer or cron); else every --interval.")
@click.option("--interval", type=click.FloatRange(5, 86400), default=60, show_default=True,
              help="Seconds between rounds.")
@click.option("--list", "list_only", is_flag=True,
              help="Show each rule with its last round's outcome (reading, decision, state) and switch nothing.")
@json_option
@pass_state
def rules_cmd(state, once, interval, list_only, as_json):
    """Apply the rules: of cluster.yaml (a sensor reading switches a plug): run on the manager.

    \b
    Each round reads every rule's newest reading from the registry's readings store and the
    switch's state from the device, and switches on or off as the rule says: on above on_above
    and off below off_below (or the other way round for heating), nothing in between
    (hysteresis), never before min_on_s / min_off_s since the switch last changed, never on a
    reading older than max_age_s. Every switching is recorded in `pibake switch log` with the
    rule and the reason. On the manager pibake-switch-rules.service runs this loop; --list shows
    what it last decided (state ok, stale: no usable reading, error: the plug failed). See
    docs/switches.md."""
    if list_only:
        _list_rules(state, as_json)
        return

    def one_round():
        return api.rules_pass(state.cluster_dir, progress=None if (as_json or not once) else
                              lambda m: click.echo(m, err=True))

    def changes(report):  # looping: a line for each switching or failure, not for every quiet round
        for row in report:
            if row["action"]:
                click.echo(f"rule {row['rule']}: {row['why']} -> {row['switch']} {row['action']}", err=True)

    report = api.run_switch_loop(state.cluster_dir, "rules", one_round, interval=interval, once=once,
                                 on_report=None if once else changes, on_error=_loop_error)
    if once:
        if as_json:
            emit_json(report)
        elif not report:
            click.echo("no rules in cluster.yaml (see docs/switches.md)", err=True)
        if any(r["action"] == "error" for r in report):
            sys.exit(1)


def _list_rules(state, as_json):
    items = api.rules_status(state.cluster_dir)
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo("no rules in cluster.yaml (see docs/switches.md)", err=True)
        return
    rows = []
    for r in items:
        last = r["last"]
        if last is None:
            rows.append((r["rule"], r["describe"], "-", "-", "no round yet"))
            continue
        value = "-" if last["value"] is None else f"{last['value']:g}"
        switch = "-" if last["on"] is None else ("on" if last["on"] else "off")
        rows.append((r["rule"], r["describe"], f"{last['state']} since {last['since']}", f"{value} / {switch}",
                     f"{last['time']}: {last['why']}"))
    _table(rows, ("RULE", "WHAT", "STATE", "VALUE / SWITCH", "LAST DECISION"))


@cli.command("recover")
@click.argument("node")
@click.option("--off-seconds", type=click.FloatRange(0, 600), default=None,
              help="How long the power stays off (default 10).")
@click.option("--wait", "wait_s", type=click.FloatRange(1, 7200), default=600, show_default=True,
              help="Seconds to wait until the node answers ssh and Slurm lists it idle.")
@click.option("--force", is_flag=True, help="Cycle it even if ssh or Slurm says it is up.")
@ssh_options
@json_option
@yes_option
@pass_state
def recover_cmd(state, node, off_seconds, wait_s, force, user, identity, known_hosts, as_json, yes):
    """Recover hung NODE through the switch that powers it (see `pibake switch cycle`)."""

    item = next((s for s in api.list_switches(state.cluster_dir) if s["node"] == node), None)
    if item is None:
        raise PibakeError(f"no switch in cluster.yaml powers {node} (see docs/switches.md)")
    _confirm_power_cut(state, item["name"], "recovering it", yes)
    result = api.recover_node(state.cluster_dir, node, off_s=off_seconds, wait_s=wait_s, force=force,
                              progress=lambda m: click.echo(m, err=True),
                              ssh_options=_ssh(user, identity, known_hosts))
    _print_recovery(result, as_json)
