"""`pibake init` (cluster directory: cluster.yaml + secrets) and `pibake token` (the join token)."""

import datetime as dt
import ipaddress
import re
import sys

import click

from pibake import api
from pibake.api import ConfigError, PibakeError, SecretsError, load_cluster, secrets_dir
from pibake.cli import cli, options
from pibake.cli.options import emit_json, json_option, pass_state


def _say(text=""):
    click.echo(text, err=True)


def _read_wifi_password(path):
    """The passphrase from a file ('-' = stdin): its first line, without the newline."""
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.readline()
    except FileNotFoundError:
        raise ConfigError(f"--wifi-password-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--wifi-password-file {path}: cannot read it ({type(exc).__name__})") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"--wifi-password-file {path}: the first line is empty")
    return password


def _refuse_plain_password(ctx, param, value):
    if value is not None:
        raise click.UsageError(
            "--wifi-password is not accepted: a password on the command line lands in shell history and ps. "
            "Leave it out to be prompted (hidden input), or use --wifi-password-file FILE."
        )
    return value


def _suggest_workers(result):
    """Example worker hostnames/IPs for the 'next step' text."""
    net = ipaddress.IPv4Network(result["network"])
    first = ipaddress.IPv4Address(result["manager_ip"]) + 1
    last = first + 3
    if last not in net or last == net.broadcast_address or first == net.broadcast_address:
        return None
    gateway = result.get("gateway")
    if gateway and first <= ipaddress.IPv4Address(gateway) <= last:
        return None
    base = ".".join(str(first).split(".")[:3])
    return f"'{result['name']}[01-04]'", f"'{base}.[{str(first).split('.')[3]}-{str(last).split('.')[3]}]'"


INIT_EPILOG = """\b
Examples:
  pibake --cluster ~/red init --manager red00 --manager-ip 10.1.1.10 --network 10.1.1.0/24
  pibake init --manager red00 --manager-ip 192.168.50.10 --network 192.168.50.0/24 \\
      --gateway 192.168.50.1 --dns 192.168.50.1 --dns 9.9.9.9 --ssh-key ~/.ssh/id_ed25519.pub
  pibake init ... --wifi-country DE --wifi-ssid HomeNet      (asks for the passphrase, hidden)
  pibake init ... --rotate munge-key                         (replace one secret on purpose)

\b
Re-running init with the same values changes nothing. Different values are refused unless you
edit cluster.yaml yourself or pass --force (the old file is kept as cluster.yaml.bak).
Secrets are never replaced unless named with --rotate.
Secret names: ca, registry-cert, join-token, munge-key, admin, manager-ssh-key (ca also renews
the registry certificate and the join token). A re-run adds the secrets a cluster made by an
older pibake lacks (e.g. manager-ssh-key) and keeps the others."""


@cli.command("init", short_help="Create a cluster directory: cluster.yaml and secrets.", epilog=INIT_EPILOG)
@click.option("--manager", required=True, type=options.HOSTNAME, metavar="HOSTNAME", help="Hostname of the manager node, e.g. red00.")
@click.option("--manager-ip", required=True, type=options.IPV4, metavar="IP", help="Static IPv4 address of the manager, e.g. 10.1.1.10.")
@click.option("--network", required=True, type=options.NETWORK, metavar="CIDR", help="The cluster's IPv4 network, e.g. 10.1.1.0/24.")
@click.option("--name", default=None, type=options.CLUSTER_NAME, metavar="NAME", help="Cluster name. Default: the manager's name without its number (red00 -> red).")
@click.option("--gateway", default=None, type=options.IPV4, metavar="IP", help="Default route of the nodes. Default: the network's first host.")
@click.option("--dns", multiple=True, type=options.IPV4_LIST, metavar="IP", help="DNS server (repeatable, or comma-separated). Default: the gateway.")
@click.option("--user", default=None, type=options.USERNAME, metavar="NAME", help="Login user on every node (ssh keys only). Default: pi.")
@click.option("--ssh-key", "ssh_key_files", multiple=True, metavar="FILE",
              help="ssh public key file (repeatable). Default: your ~/.ssh/*.pub.")
@click.option("--timezone", default=None, type=options.TIMEZONE, metavar="ZONE", help="IANA time zone, e.g. Europe/Berlin. Default: this machine's.")
@click.option("--locale", default=None, type=options.LOCALE, metavar="LOCALE", help="System locale of the nodes. Default: C.UTF-8.")
@click.option("--wifi-country", default=None, type=options.COUNTRY, metavar="CC", help="Wi-Fi country (ISO 3166 alpha-2, e.g. DE).")
@click.option("--wifi-ssid", default=None, type=options.SSID, metavar="SSID", help="Wi-Fi network name; the passphrase is asked for (hidden).")
@click.option("--wifi-password-file", default=None, metavar="FILE",
              help="Read the Wi-Fi passphrase from the first line of FILE ('-' = stdin) instead of asking.")
@click.option("--wifi-password", hidden=True, expose_value=False, callback=_refuse_plain_password, is_eager=True)
@click.option("--image", default=None, metavar="NAME|PATH",
              help="OS image: catalog name (see `pibake image list`) or a local image file. Default: raspios-trixie-lite-arm64.")
@click.option("--family", type=click.Choice(["raspios", "ubuntu"]), default=None,
              help="Image family; required with a local image file.")
@click.option("--rotate", multiple=True, is_flag=False, flag_value="all", metavar="[NAME]",
              help="Replace secrets on purpose: all of them, or the NAMEd one (repeatable).")
@click.option("--force", is_flag=True, help="Replace differing values in cluster.yaml (backup: cluster.yaml.bak).")
@json_option
@pass_state
def init_cmd(state, manager, manager_ip, network, name, gateway, dns, user, ssh_key_files, timezone, locale,
             wifi_country, wifi_ssid, wifi_password_file, image, family, rotate, force, as_json):
    """Create a cluster directory: a documented cluster.yaml and secrets/ (CA, registry
    certificate, join token, munge key, admin password, the manager's ssh key).

    The directory is --cluster (default ./cluster or $PIBAKE_CLUSTER)."""
    wifi_password = None
    if wifi_password_file is not None:
        if not wifi_ssid:
            raise ConfigError("--wifi-password-file needs --wifi-ssid and --wifi-country")
        wifi_password = _read_wifi_password(wifi_password_file)
    elif wifi_ssid:
        if not wifi_country:
            raise ConfigError("--wifi-ssid needs --wifi-country (ISO 3166 code, e.g. DE)")
        wifi_password = click.prompt(
            f"Wi-Fi passphrase for {wifi_ssid}", hide_input=True, confirmation_prompt=True, err=True
        )
    result = api.init_cluster(
        state.cluster_path, manager=manager, manager_ip=manager_ip, network=network, name=name,
        gateway=gateway, dns=dns, user=user, ssh_key_files=ssh_key_files, timezone=timezone, locale=locale,
        wifi_country=wifi_country, wifi_ssid=wifi_ssid, wifi_password=wifi_password, image=image,
        family=family, rotate=rotate, force=force,
    )
    if as_json:
        emit_json(result)
    _report_init(result)


def _report_init(result):
    status = result["cluster_yaml_status"]
    verb = {"created": "Created", "unchanged": "Checked", "updated": "Updated", "replaced": "Rewrote"}[status]
    _say(f"{verb} cluster '{result['name']}' in {result['cluster_dir']}/")
    _say(f"  cluster.yaml   {status}" + (f" (previous file kept as {result['backup']})" if result.get("backup") else ""))
    by_state = {}
    for secret, what in result["secrets"].items():
        by_state.setdefault(what, []).append(secret)
    _say("  secrets/       " + "; ".join(f"{what}: {', '.join(names)}" for what, names in by_state.items()))
    if result["ssh_keys_default"] and result["ssh_key_files"]:
        _say(f"  ssh keys       {result['ssh_keys']} from {', '.join(result['ssh_key_files'])} (your ~/.ssh/*.pub)")
    else:
        _say(f"  ssh keys       {result['ssh_keys']}")
    if result.get("wifi"):
        _say(f"  Wi-Fi          {result['wifi']['ssid']} ({result['wifi']['country']}), stored as a WPA PSK")
    _say(f"  image          {result['image']} ({result['family']})")
    if result.get("added"):
        _say(f"  added          {', '.join(result['added'])}")
    for warning in result["warnings"]:
        _say(f"warning: {warning}")
    _say("")
    _say(f"Review {result['cluster_yaml']}, then burn the manager and the workers, e.g.:")
    _say(f"  pibake burn --hostname {result['manager']} --ip {result['manager_ip']} --role manager --device /dev/sdX")
    workers = _suggest_workers(result)
    if workers:
        _say(f"  pibake burn --hostname {workers[0]} --ip {workers[1]} --device /dev/sdX")


# --------------------------------------------------------------------------- token

_TTL_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks", "": "days"}
MAX_TTL = dt.timedelta(days=365)


def parse_ttl(text):
    """'7d', '12h', '30m', '2w', '3600s' (a bare number means days) -> timedelta."""
    match = _TTL_RE.match(text or "")
    if not match:
        raise ConfigError(f"--ttl {text!r}: write a duration such as 30m, 12h, 7d or 2w")
    ttl = dt.timedelta(**{_TTL_UNITS[match.group(2)]: int(match.group(1))})
    if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
        raise ConfigError(f"--ttl {text!r}: must be more than 0 and at most 365d")
    return ttl


def _cluster_name(cluster_dir):
    try:
        return load_cluster(cluster_dir).name
    except PibakeError:
        return str(cluster_dir)


@cli.group("token", short_help="Show or rotate the cluster's join token.")
def token_group():
    """Show or rotate the join token that lets a new node enrol with the registry.

    \b
    Examples:
      pibake token show
      pibake token rotate --ttl 2d
    """


@token_group.command("show", epilog="\b\nExample:\n  pibake --cluster ~/red token show --json")
@json_option
@pass_state
def token_show(state, as_json):
    """Print the current join token (stdout) and when it expires.

    Anyone holding the token can enrol a machine into the cluster until it expires:
    treat it like a password."""
    token = api.load_join_token(state.cluster_path)
    expired = token.expired()
    if as_json:
        emit_json({"token": token.token, "created": token.created.isoformat(),
                   "expires": token.expires.isoformat(), "expired": expired})
    else:
        click.echo(token.token)
    name = _cluster_name(state.cluster_path)
    if expired:
        _say(f"warning: this token expired at {token.expires.isoformat()}; run `pibake token rotate`")
    else:
        _say(f"warning: anyone with this token can enrol a machine into cluster {name} "
             f"until {token.expires.isoformat()}; keep it secret")


@token_group.command("rotate", epilog="\b\nExamples:\n  pibake token rotate\n  pibake token rotate --ttl 12h --json")
@click.option("--ttl", default="7d", show_default=True, metavar="DURATION",
              help="How long the new token stays valid: 30m, 12h, 7d, 2w (at most 365d).")
@json_option
@pass_state
def token_rotate(state, ttl, as_json):
    """Replace the join token with a new one; the old one stops working at once.

    Cards burned with the old token can no longer enrol: re-burn or re-seed them. The new
    token is not printed (see `pibake token show`)."""
    delta = parse_ttl(ttl)
    if not (secrets_dir(state.cluster_path) / "ca.crt").exists():
        raise SecretsError(f"{secrets_dir(state.cluster_path)}/ca.crt is missing: run `pibake init` first")
    token = api.rotate_join_token(state.cluster_path, ttl=delta)
    if as_json:
        emit_json({"rotated": True, "created": token.created.isoformat(), "expires": token.expires.isoformat()})
    _say(f"New join token for cluster {_cluster_name(state.cluster_path)}, valid until {token.expires.isoformat()}.")
    _say("The old token no longer enrols anything. Show the new one with `pibake token show`.")
