"""`pibake devices`: the disks pibake could write to, and why every other one is refused."""

import click

from pibake import api
from pibake.api import DEFAULT_MAX_BYTES, SystemFacts, gather_facts, human_size, parse_size
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option

DEVICES_EPILOG = """\b
A candidate is a whole, removable disk with a card in it (size > 0), writable, not larger than the
cap (default 256 GB), holding nothing mounted, no swap and not the running system. Every other disk
is listed with the reason `pibake burn` would refuse it. Unattached loop devices are left out.
\b
Examples:
  pibake devices
  pibake devices --json | jq '.[] | select(.candidate) | .path'
  pibake devices --allow-non-removable        (loop devices, internal readers that report RM=0)"""


def max_size_option(fn):
    return click.option(
        "--max-size", "max_size", default="256G", show_default=True, metavar="SIZE",
        help="Refuse disks larger than this (e.g. 512G, 2T; 'none' for no cap).")(fn)


@cli.command("devices", short_help="List removable cards that pibake could write to.", epilog=DEVICES_EPILOG)
@click.option("--allow-non-removable", is_flag=True, help="Count non-removable disks as candidates too.")
@max_size_option
@click.option("--all", "show_all", is_flag=True, help="Also list unattached loop devices.")
@click.option("--record", "record_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also save the facts read (lsblk JSON, /proc/swaps, mountinfo, sysfs) to DIR, for a bug report.")
@click.option("--facts", "facts_dir", type=click.Path(file_okay=False, exists=True), default=None, hidden=True,
              help="Decide on facts recorded with --record instead of this machine's (listing only).")
@json_option
def devices_cmd(allow_non_removable, max_size, show_all, record_dir, facts_dir, as_json):
    """List removable cards that pibake could write to, and why others are refused."""
    cap = parse_size(max_size) if max_size else DEFAULT_MAX_BYTES
    facts = SystemFacts.from_dir(facts_dir) if facts_dir else gather_facts()
    if record_dir:
        SystemFacts.save(facts, record_dir)
        click.echo(f"facts saved to {record_dir}", err=True)
    reports = api.describe_devices(facts, allow_non_removable=allow_non_removable, max_bytes=cap,
                                   include_empty_loops=show_all)
    if as_json:
        emit_json([r.to_dict() for r in reports])
        return
    say = lambda text="": click.echo(text, err=True)  # noqa: E731
    candidates = [r for r in reports if r.candidate]
    refused = [r for r in reports if not r.candidate]
    if candidates:
        say("Cards pibake can write to:")
        for r in candidates:
            d = r.device
            say(f"  {d.path:<14} {human_size(d.size):>9}  {d.model or '-'}  serial {d.serial or '-'}  "
                f"{(d.transport or '-').upper()}  {'removable' if d.removable else 'NOT removable'}")
            for part in d.partitions:
                say(f"      {part.path:<14} {human_size(part.size):>9}  {part.fstype or '-'}")
    else:
        say("No card pibake can write to: insert an SD card (in a USB reader or the built-in slot) and run again.")
    if refused:
        say("")
        say("Refused:")
        for r in refused:
            d = r.device
            say(f"  {d.path:<14} {human_size(d.size):>9}  {d.model or ('loop device' if d.type == 'loop' else '-')}"
                f"  serial {d.serial or '-'}")
            for reason in r.reasons:
                say(f"      - {reason}")
