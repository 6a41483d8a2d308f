"""``pibake mqtt``: the MQTT broker (Mosquitto) on the manager; see docs/mqtt.md."""

import click

from pibake import api
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state


@cli.group("mqtt", short_help="The MQTT broker on the manager")
def mqtt_group():
    """The MQTT broker (Mosquitto) on the manager, for sensor nodes, Home Assistant and Tasmota plugs."""


@mqtt_group.command("setup")
@click.option("--etc-dir", default=api.MQTT_ETC_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Where the broker's certificate, key, ACL and password file go.")
@click.option("--conf-file", default=api.MQTT_CONF_FILE, show_default=True, type=click.Path(dir_okay=False),
              help="Mosquitto's drop-in configuration (Debian's mosquitto.conf includes conf.d/).")
@click.option("--pid-file", default=api.MQTT_PID_FILE, show_default=True, type=click.Path(dir_okay=False),
              help="Mosquitto's pid file: a running broker is told to re-read its files (SIGHUP).")
@click.option("--bind", "bind_address", default=None, metavar="IP",
              help="Listen on this address only (default: every address).")
@json_option
@pass_state
def setup_cmd(state, etc_dir, conf_file, pid_file, bind_address, as_json):
    """Write Mosquitto's files on the manager from the cluster directory (run as root; idempotent).

    One TLS listener (cluster.yaml mqtt.port) with the broker certificate from secrets/, no anonymous
    access, the password file (the admin, the Tasmota plugs; node entries the registry made are kept) and
    the ACL. Start or restart Mosquitto afterwards if it was not running.
    """
    report = api.mqtt_setup(state.cluster_dir, etc_dir=etc_dir, conf_file=conf_file, pid_file=pid_file,
                            bind_address=bind_address)
    if as_json:
        emit_json(report)
        return
    click.echo(f"mosquitto configured: port {report['port']}, {len(report['node_users'])} node user(s), "
               f"plugs {', '.join(report['plug_users']) or 'none'}; reload: {report['reload']}", err=True)
    for user in report["plugs_without_password"]:
        click.echo(f"warning: no MQTT password stored for {user} (pibake switch credentials "
                   f"{user.split('_', 1)[1]} --mqtt-username {user} ...)", err=True)
