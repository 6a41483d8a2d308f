"""Which machines deploy reaches and how: the --hosts list, the manager's ssh target, the planned addresses
of names ssh cannot map by itself, and ssh's own one-line errors."""

import dataclasses
import ipaddress
import logging
import os
import re
from pathlib import Path

from pibake.errors import PlanError
from pibake.plan import recorded_plan

LOG = logging.getLogger(__name__)


def parse_hosts(hosts):
    """``"red[01-04]"``, ``"10.1.1.[11-14]"``, ``"red01,red02"`` or a list of such: the expanded list of ssh
    targets, in order, without duplicates. Raises PlanError naming what to fix."""
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError, RangeSetParseError  # start-up: deploy only
    from ClusterShell.NodeUtils import GroupResolverError  # start-up: loaded only when a host list is read

    items = [hosts] if isinstance(hosts, str) else list(hosts or ())
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            # NodeSet folds/sorts; keep the order given: expand each comma-separated part on its own
            for part in _split_top_level(text):
                for name in NodeSet(part, resolver=False):  # no group resolution: a name is a name
                    if name not in out:
                        out.append(name)
        except (NodeSetParseError, RangeSetParseError) as exc:
            raise PlanError(f"--hosts {text!r}: {exc}; write e.g. red[01-04] or 10.1.1.[11-14]") from None
        except GroupResolverError:  # "@source:group" names a ClusterShell group; deploy resolves none
            raise PlanError(f"--hosts {text!r}: node groups (@...) are not supported; write e.g. red[01-04] or "
                            "10.1.1.[11-14]") from None
    if not out:
        raise PlanError("--hosts: no host given; write e.g. red[01-04] or 10.1.1.[11-14]")
    bad = [h for h in out if not _valid_target(h)]
    if bad:
        raise PlanError(f"--hosts: not a host name or IP address: {', '.join(bad)}")
    return out


def _split_top_level(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _valid_target(host):
    return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host)) and ".." not in host


def planned_addresses(cluster, cluster_dir):
    """{hostname: IP} of the machines this cluster planned: plan.yaml's nodes and cluster.yaml's manager."""
    out = {n.hostname: n.ip for n in recorded_plan(cluster_dir)}
    out[cluster.manager] = cluster.manager_ip
    return out


def split_config_option(ssh_options):
    """(the ssh config file given with ``-F`` or None, the other options) (pure)."""
    opts, config, i = list(ssh_options), None, 0
    rest = []
    while i < len(opts):
        if opts[i] == "-F" and i + 1 < len(opts):
            config, i = opts[i + 1], i + 2
            continue
        if opts[i].startswith("-F") and len(opts[i]) > 2:
            config, i = opts[i][2:], i + 1
            continue
        rest.append(opts[i])
        i += 1
    return config, tuple(rest)


def address_config(names, planned, user_config=None, home=None):
    """The text of an ssh config that reaches ``names`` at their planned addresses (pure).

    The user's own config comes first (``user_config`` given with -F, else ~/.ssh/config and
    /etc/ssh/ssh_config, as ssh reads them), so whatever it says wins. Each name's block then applies only
    when nothing before it changed where the name goes: ``Match originalhost NAME host NAME`` (ssh's ``host``
    is the HostName set so far, ``originalhost`` the name typed; an ``-o HostName=`` or the user's HostName
    makes them differ). It adds ``HostName <planned IP>`` and ``HostKeyAlias <name>`` (host keys stay filed
    under the name the user gave). Checked with OpenSSH 9.2's ``ssh -G`` (tests/test_deploy_unit.py)."""
    if user_config == "none":
        includes = []
    elif user_config:
        includes = [os.path.abspath(os.path.expanduser(user_config))]
    else:
        includes = [os.path.join(home or os.path.expanduser("~"), ".ssh", "config"), "/etc/ssh/ssh_config"]
    lines = ["# pibake deploy: the planned addresses of this cluster's machines (plan.yaml, cluster.yaml);",
             "# your own ssh configuration is read first and wins"]
    lines += ['Include "%s"' % path.replace('"', "") for path in includes]
    for name in names:
        lines += [f"Match originalhost {name} host {name}", f"    HostName {planned[name]}",
                  f"    HostKeyAlias {name}"]
    return "\n".join(lines) + "\n"


def _is_ip(value):
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def with_planned_addresses(targets, planned, ssh, directory):
    """``ssh`` (SshOptions) extended so that names of ``targets`` that the cluster planned reach their planned
    address unless ssh maps them by itself (the user's config or options give them a HostName): a config file
    written to ``directory`` that includes the user's own (``address_config``; ssh decides per connection, so
    no ``ssh -G`` per name: ~7 ms of CPU each). Names nobody planned, and IPs, are left to ssh (and DNS)."""
    names = [t for t in targets if t in planned and not _is_ip(t)]
    if not names:
        return ssh
    user_config, rest = split_config_option(ssh.extra)
    path = Path(directory) / "ssh_config"
    path.write_text(address_config(names, planned, user_config))
    LOG.info("deploy: %s reach their planned addresses unless your ssh config maps them (%s)",
             ", ".join(names), path)
    return dataclasses.replace(ssh, extra=("-F", str(path), *rest))


def manager_ssh_target(cluster, targets, manager=None):
    """How deploy reaches the manager over ssh (pure): the entry of ``targets`` that names it (cluster.yaml's
    name or IP), else ``manager`` (--manager), else cluster.yaml's manager name."""
    for t in targets:
        if t in (cluster.manager, cluster.manager_ip):
            return t
    return manager or cluster.manager

def ssh_error(stderr, rc):
    """One line for a failed ssh session: ssh's own last message (exit 255), else the command's."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    if lines:
        return lines[-1]
    return f"ssh exited with {rc} without a message" if rc == 255 else f"exited with {rc}"
