"""``pibake verify [--json] [--report DIR] [--bench]``: a shell over ``pibake.verify.verify``."""

import click

from pibake.api import bench_markdown, verify
from pibake.cli import cli
from pibake.cli.options import emit_json, json_option, pass_state


@cli.command("verify", short_help="Check the cluster (and --bench it)")
@json_option
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write report.json and report.md (and with --bench the plots) into DIR; "
                   "<cluster>/reports/latest then points there (the registry page shows it).")
@click.option("--bench", is_flag=True, help="Also measure srun latency, sbatch throughput, CPU, disk and network "
                                            "(default report DIR: <cluster>/reports/<UTC time>).")
@click.option("--user", default=None, help="ssh user on the nodes (default: the cluster's user).")
@click.option("--identity", "-i", type=click.Path(dir_okay=False), default=None,
              help="ssh private key (default: ssh's own choice, ~/.ssh/config and the agent).")
@click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
              help="ssh known_hosts file to use (new hosts are accepted and remembered).")
@click.option("--connect-timeout", type=float, default=5, show_default=True, help="ssh connect timeout (s).")
@pass_state
def verify_cmd(state, as_json, report_dir, bench, user, identity, known_hosts, connect_timeout):
    """Check the cluster: registry healthy, every burned/planned node enrolled, all nodes idle, srun on every
    node, munge both ways, clock skew within munge's 300 s, slurm.conf the same everywhere.

    Exit 0 only when every check passes; each failure says what to do. The manager is reached locally when
    this machine is the manager, else over ssh, like the nodes.
    """
    def progress(_fraction, message):
        if not as_json and state.verbosity >= 0:
            click.echo(f"  ... {message}", err=True)

    report = verify(state.cluster_path, bench=bench, report_dir=report_dir, user=user, identity=identity,
                    known_hosts=known_hosts, connect_timeout=connect_timeout, progress=progress)
    data = report.to_json()
    if as_json:
        emit_json(data)
    else:
        width = max(len(c["name"]) for c in data["checks"])
        for c in data["checks"]:
            mark = {"ok": "ok  ", "fail": "FAIL", "skip": "skip"}[c["status"]]
            click.echo(f"{mark} {c['name']:<{width}}  {c['summary']}", err=True)
            if c["status"] == "fail" and c["action"]:
                click.echo(f"     {'':<{width}}  what to do: {c['action']}", err=True)
        if report.bench is not None:
            click.echo("\n".join(bench_markdown(report.bench)), err=True)
        if report.report_dir:
            click.echo(f"report: {report.report_dir}", err=True)
        click.echo("verify: all checks passed" if report.ok
                   else f"verify: {len(report.failed)} check(s) failed", err=True)
    return 0 if report.ok else 1
