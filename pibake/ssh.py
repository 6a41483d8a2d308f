"""How pibake calls OpenSSH, in one place: the options every session gets, login user, identity,
known_hosts, host key policy and the argv of ssh itself.

``pibake.connect.SshConnector`` (deploy, verify, bench, recover) hands these options to a ClusterShell task
(``clustershell_info``), which does the fan-out and starts the same ssh as ``SshOptions.argv`` (nothing that
differs (its hard-wired ``-oForwardAgent=no -oForwardX11=no -oBatchMode=yes`` are in ``options()``
already)). Options the user gives (``extra``: ``-F file``, ``-o Key=value``, ``-i file``) come first: ssh
keeps the first value it reads, so they win over pibake's defaults. Key exchange, ciphers and MACs stay
OpenSSH's defaults (and the user's config): dropping the post-quantum exchange for a cheaper one is the
user's choice (``-o KexAlgorithms=...``, docs/deploy.md "What ssh costs"); deploy runs one session per host,
so it is one exchange per host."""

import shlex
from dataclasses import dataclass

from pibake.run import which


def ssh_program():
    return which("ssh") or "ssh"


@dataclass(frozen=True)
class SshOptions:
    """One way of reaching hosts over ssh. None leaves a setting to ssh (and its config files).

    ``host_key_check``: StrictHostKeyChecking (``accept-new`` for verify, ``no`` only for throwaway VMs);
    ``known_hosts``: UserKnownHostsFile; ``log_level``: LogLevel."""

    user: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 10
    host_key_check: str | None = None
    log_level: str | None = None
    extra: tuple = ()

    def options(self):
        """The option arguments of every ssh pibake starts (no login, host or command)."""
        opts = [str(o) for o in self.extra]
        opts += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout:g}",
                 "-o", "ForwardAgent=no", "-o", "ForwardX11=no"]
        if self.host_key_check:
            opts += ["-o", f"StrictHostKeyChecking={self.host_key_check}"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.log_level:
            opts += ["-o", f"LogLevel={self.log_level}"]
        return opts

    def _login(self):
        return ["-l", self.user] if self.user else []

    def head(self):
        """``ssh`` and its options up to the host: what ``argv`` puts before ``host -- command`` (a connector
        builds it once and reuses it for every session)."""
        return [ssh_program(), *self.options(), *self._login()]

    def argv(self, host, command):
        """``ssh ... host -- command`` (``command``: one shell command line, as ssh sends it)."""
        return [*self.head(), host, "--", command]

    def config_argv(self, host):
        """``ssh -G host``: the configuration ssh would use for ``host`` (no connection is made)."""
        return [ssh_program(), *self.options(), *self._login(), "-G", host]

    def clustershell_info(self):
        """Task settings that make ClusterShell's ssh worker start ``argv``'s ssh (ClusterShell appends
        ``-l``, its own connect timeout and the host)."""
        return {"ssh_path": ssh_program(), "ssh_options": shlex.join(self.options()), "ssh_user": self.user,
                "connect_timeout": self.connect_timeout}
