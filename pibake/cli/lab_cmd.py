"""``pibake lab``: a simulated Pi cluster on this Linux machine (thin shell over ``pibake.lab.cluster``)."""

import os
import sys

import click

from pibake import api
from pibake.api import LAB_DEFAULT_RELEASE as DEFAULT_RELEASE
from pibake.api import LAB_RELEASES as RELEASES
from pibake.api import lab_down, lab_freeze, lab_power, lab_shell_command, lab_status, lab_up
from pibake.api import lab_shell_argv as shell_argv
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state

prefix_option = click.option(
    "--prefix", default="pblab", show_default=True, metavar="NAME",
    help="Name prefix of the lab's namespaces, links and state (2-9 of a-z0-9): several labs can coexist.")


def _say(text=""):
    click.echo(text, err=True)


@cli.group("lab", short_help="A simulated Pi cluster on this Linux machine (namespaces + real cloud-init).")
def lab_cmd():
    """A simulated Pi cluster on this Linux machine: each host is a set of namespaces with its own
    Debian root, booted by the real cloud-init from the seed on a burned image's boot partition.

    \b
    Examples:
      pibake burn --hostname red00 --ip 10.77.7.10 --output 'images/{hostname}.img'
      pibake burn --hostname 'red[01-03]' --ip '10.77.7.[11-13]' --output 'images/{hostname}.img'
      pibake lab up --from-images images
      pibake lab status
      pibake lab shell red00 -- srun -N3 hostname
      pibake lab down

    Needs root. Nothing leaves the lab: its bridge has no address on this machine, no gateway, no NAT.
    """


@lab_cmd.command("up")
@click.option("--workers", default=3, show_default=True, type=click.IntRange(0, 50),
              help="Workers to burn when no --from-images is given.")
@click.option("--from-images", "images_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Boot DIR/<hostname>.img (from pibake burn --output 'DIR/{hostname}.img'). "
                   "Default: burn the manager and --workers workers onto a synthetic Pi-like image.")
@click.option("--manager-delay", default=0.0, type=click.FloatRange(0, 3600), metavar="SECONDS",
              help="Boot the workers first and the manager SECONDS later (their agents retry).")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(1), metavar="SECONDS",
              help="How long to wait for every worker to be idle in sinfo.")
@click.option("--no-wait", is_flag=True, help="Return after booting, without waiting for idle workers.")
@click.option("--release", type=click.Choice(RELEASES), default=DEFAULT_RELEASE, show_default=True,
              help="Debian release of the hosts' root: trixie (as Raspberry Pi OS trixie: cloud-init 25, Slurm "
                   "24.11, Python 3.13) or bookworm (cloud-init 22.4, Slurm 22.05, Python 3.11).")
@click.option("--sim-bus", type=click.Path(dir_okay=False, exists=True), default=None, metavar="FILE",
              help="Sensor hosts (images burned with --role sensor) read this register image (JSON, e.g. "
                   "tests/fixtures/sensors/bme280-lab.json) instead of an I2C bus.")
@click.option("--sensor-interval", type=click.FloatRange(1), default=None, metavar="SECONDS",
              help="Seconds between sensor readings on sensor hosts (default: the seed's 60).")
@prefix_option
@json_option
@pass_state
def up_cmd(state, workers, images_dir, manager_delay, timeout, no_wait, release, sim_bus, sensor_interval, prefix,
           as_json):
    """Boot a lab cluster from burned images: manager first, then the workers, until all are idle."""
    progress = (lambda message: _say(f"lab: {message}")) if state.verbosity >= 0 else None
    report = lab_up(state.cluster_path, images_dir=images_dir, workers=workers, manager_delay=manager_delay,
                    prefix=prefix, wait=not no_wait, timeout=timeout, release=release, progress=progress,
                    sim_bus=sim_bus, sensor_settings={"interval_s": sensor_interval} if sensor_interval else None)
    if as_json:
        emit_json(report)
    t = report["timings"]
    for h in report["hosts"]:
        ht = h["timings"]
        idle = f", idle at {ht['idle_s']:.1f} s" if "idle_s" in ht else ""
        _say(f"  {h['name']:<12} {h['ip']:<15} {h['role']:<8} host {ht.get('host_s', 0):.1f} s, "
             f"root {ht.get('root_s', 0):.1f} s, cloud-init {ht.get('cloud_init_s', 0):.1f} s "
             f"(done at {ht.get('boot_done_s', 0):.1f} s){idle}; sshd {h.get('sshd')}")
    what = "all workers idle" if "all_idle_s" in t else "booted"
    _say(f"lab {report['prefix']} ({report['release']}) up on {report['network']}: {what} after "
         f"{t.get('total_s', 0):.1f} s")
    _say(f"  pibake lab status | pibake lab shell {report['hosts'][0]['name']} | pibake lab down"
         + (f" (--prefix {prefix})" if prefix != "pblab" else ""))


@lab_cmd.command("status")
@prefix_option
@json_option
def status_cmd(prefix, as_json):
    """Per host: address, role, running, cloud-init, Slurm state, enrolled with the registry."""
    report = lab_status(prefix=prefix)
    if as_json:
        emit_json(report)
        return
    _say(f"lab {report['prefix']} ({report['cluster']}, {report['network']}), registry {report['registry']}")
    _say(f"  {'HOST':<12} {'IP':<15} {'ROLE':<8} {'RUNNING':<8} {'CLOUD-INIT':<12} {'SLURM':<10} {'ENROLLED':<9} SSHD")
    for h in report["hosts"]:
        ci = h["cloud_init"] or {}
        ci_text = (ci.get("status") or "-") + (f" ({len(ci['errors'])} errors)" if ci.get("errors") else "")
        enrolled = {True: "yes", False: "no", None: "?"}[h["enrolled"]]
        _say(f"  {h['name']:<12} {h['ip']:<15} {h['role']:<8} {'yes' if h['running'] else 'NO':<8} "
             f"{ci_text:<12} {h['slurm'] or '-':<10} {enrolled:<9} {'yes' if h['sshd'] else 'no'}")


@lab_cmd.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("host")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@prefix_option
def shell_cmd(host, command, prefix):
    """A root shell inside lab host HOST; with a COMMAND (after --), run it and exit with its code.

    \b
    Examples:
      pibake lab shell red01
      pibake lab shell red00 -- sinfo
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if not command:
        argv = shell_argv(host, prefix=prefix)
        os.execvp(argv[0], argv)
    sys.exit(lab_shell_command(host, list(command), prefix=prefix))


@lab_cmd.command("power")
@click.argument("host")
@click.argument("action", type=click.Choice(["on", "off"]))
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(1), metavar="SECONDS",
              help="How long each cloud-init stage of the boot may take.")
@prefix_option
@json_option
@pass_state
def power_cmd(state, host, action, timeout, prefix, as_json):
    """Cut (off) or restore (on) the power of lab host HOST, as the smart plug of a Pi does.

    \b
    off: every process of HOST dies at once and its network link goes down; its card (root
    file system, boot partition) is kept.
    on:  HOST boots again from its card: cloud-init (what runs every boot), sshd, and the
    units pibake's seed enabled (the agent: it logs in with its node credential and starts
    munge and slurmd again).

    \b
    Example (a hung node and its recovery by hand):
      pibake lab freeze red02
      pibake lab power red02 off
      pibake lab power red02 on
    """
    progress = (lambda message: _say(f"lab: {message}")) if state.verbosity >= 0 else None
    report = lab_power(host, action, prefix=prefix, timeout=timeout, progress=progress)
    if as_json:
        emit_json(report)
    _say(f"{host}: power {action} after {report['seconds']:.1f} s")


@lab_cmd.command("freeze")
@click.argument("host")
@prefix_option
@json_option
def freeze_cmd(host, prefix, as_json):
    """Hang lab host HOST: stop (SIGSTOP) every process in it, as a Pi hangs on a stuck SD card.

    Its link stays up, so connections are accepted and never answered; ssh and Slurm find it
    down. Only `pibake lab power HOST off` and `on` (or a smart plug bound to it) bring it back."""
    report = lab_freeze(host, prefix=prefix)
    if as_json:
        emit_json(report)
    _say(f"{host}: frozen ({report['stopped']} processes stopped)")


@lab_cmd.command("down")
@prefix_option
@json_option
def down_cmd(prefix, as_json):
    """Remove the lab: every host, namespace, link and folder named after its prefix (also after a crash)."""
    report = lab_down(prefix=prefix)
    if as_json:
        emit_json(report)
    removed = report["netns"] + report["links"]
    _say(f"lab {prefix} down: removed {len(report['netns'])} hosts, {len(report['links'])} links, "
         f"{report['processes']} processes" if removed else f"lab {prefix}: nothing was running")


@lab_cmd.command("target-image")
@click.option("--cached", is_flag=True, help="Only report the cached image; never build (exit 1 when absent).")
@json_option
@pass_state
def target_image_cmd(state, cached, as_json):
    """Build (once) the arm64 target image: Debian trixie arm64 shaped like Raspberry Pi OS trixie Lite.

    \b
    Example:
      pibake lab target-image
      pibake burn --hostname red01 --ip 10.77.7.11 --image "$(pibake lab target-image --json | jq -r .path)" \\
          --output red01.img

    The image's root is built with mmdebstrap under qemu-user emulation and cached under
    /var/cache/pibake/target by a hash of its recipe: the first build takes a long while (docs/lab.md), later
    calls return at once. Needs root, qemu-user-static, mmdebstrap and the Debian mirror.
    """
    if cached:
        image = api.cached_target_image()
        if image is None:
            raise api.TargetError("no target image is cached for this recipe: run `pibake lab target-image`")
    else:
        progress = (lambda message: _say(f"target image: {message}")) if state.verbosity >= 0 else None
        image = api.ensure_target_image(progress=progress)
    if as_json:
        emit_json({"path": str(image.path), **image.stamp})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(image.versions.items()))
    _say(f"{image.path} ({image.stamp.get('size_bytes', 0) // 2**20} MiB): {versions}")
