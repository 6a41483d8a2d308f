"""The one error family users see.

A ``PibakeError`` carries a message a person can act on. The CLI prints it as
``pibake: error: <message>`` without a traceback and exits 1. Anything else that
escapes is a bug: the CLI calls it an internal error.
"""


class PibakeError(Exception):
    """An error the user can fix. ``str(err)`` says what is wrong and what to do."""

    exit_code = 1


class ConfigError(PibakeError):
    """cluster.yaml or the cluster directory is missing or invalid."""


class PlanError(PibakeError):
    """A hostname/IP plan is invalid (counts differ, duplicates, outside the network, ...)."""


class SeedError(PibakeError):
    """A rendered cloud-init seed failed validation; nothing was written."""


class SecretsError(PibakeError):
    """Secrets are missing, unreadable or have unsafe permissions."""


class CommandError(PibakeError):
    """An external command failed. Carries argv, exit code and stderr."""

    def __init__(self, argv, returncode, stderr="", stdout="", message=None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr or ""
        self.stdout = stdout or ""
        if message is None:
            tail = self.stderr.strip().splitlines()[-3:]
            detail = ("; ".join(tail)) if tail else "no error output"
            message = f"{self.argv[0]} exited with {returncode}: {detail}"
        super().__init__(message)


class DeployError(PibakeError):
    """deploy cannot start (bad host list, registry refuses the admin credential, ...)."""


class NotBuiltError(PibakeError):
    """A command or feature that is planned but not built yet. The CLI exits 2."""

    exit_code = 2

    def __init__(self, what):
        super().__init__(f"{what} is not built yet in this version of pibake")


class RegistryError(PibakeError):
    """A request the registry refuses: ``status`` is the HTTP status it answers with, ``problems`` one
    line per thing to fix (the message joins them). No secret in either."""

    def __init__(self, status, message, problems=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


class ConflictError(RegistryError):
    """The hostname is enrolled with another MAC address (409)."""

    def __init__(self, hostname):
        super().__init__(409, f"{hostname} is already enrolled with another MAC address; if the board was "
                              f"replaced, remove the old record first (`pibake registry remove {hostname}`)")
        self.hostname = hostname


class JobError(RegistryError):
    """A REST job request that cannot be accepted (400 invalid, 404 unknown, 429 queue full)."""


class BootError(PibakeError):
    """A lab host could not be booted (not a seed problem: see SeedError for those)."""


class LabClusterError(PibakeError):
    """The lab cluster could not be brought up, found or entered."""


class RootfsError(PibakeError):
    """The lab's root filesystem could not be built or mounted."""


class LabError(PibakeError):
    """A lab host or network could not be created or entered."""


class TargetError(PibakeError):
    """The arm64 target image could not be built (emulation, mirror or tools missing)."""


class VMError(PibakeError):
    """The emulated Pi could not be started, or did not reach a boot phase in time."""


class TargetRunError(PibakeError):
    """The emulated Pi did not reach a phase in time (the message says which, and the console's last lines)."""


class MqttError(PibakeError):
    """The broker could not be set up or told about a change."""


class RecoverError(PibakeError):
    """The node could not be recovered, or was refused (not down, no plug, the manager)."""


class SwitchError(PibakeError):
    """A plug could not be reached, refused the credentials, timed out or answered garbage."""


class GuardError(PibakeError):
    """Writing to this target is refused. The message names the device, its model and what to do."""


class ImageError(PibakeError):
    """An image is unknown, missing, corrupt, or its download failed or did not match its sha256."""


class BootPartitionError(PibakeError):
    """The target has no usable FAT boot partition, or the seed did not read back equal."""


class WriteError(PibakeError):
    """Writing the image failed; the target is incomplete."""


class VerifyError(PibakeError):
    """The read-back differs from the image."""


class BakeError(PibakeError):
    """An image could not be baked (``pibake image bake``: emulation, tools, apt inside the image)."""


class BurnError(PibakeError):
    """A burn cannot start or did not finish; the message says which target and what to do."""


class ApplyError(PibakeError):
    """slurm.conf could not be put in force. The message names the step that failed."""


class SlurmdCError(PibakeError, ValueError):
    """``slurmd -C`` output that cannot be used. The message says what is missing."""


class AgentFailed(PibakeError):
    """The agent was refused or failed; the exit code is the agent's own (1, 2 or 75)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class SwitchBusy(SwitchError):
    """Another command holds the plug (a cycle takes seconds); raised only when asked not to wait."""


class LoopBusy(PibakeError):
    """Another process runs this switch loop (auto, rules) on this cluster directory."""


class DriverMissing(SwitchError):
    """The Python library a switch driver needs is not installed here (python-kasa on a manager: Debian has no
    python3-kasa, and the manager installs pibake with --no-deps over Debian's packages)."""


class RegistryClientError(PibakeError):
    """A request to the cluster's registry failed, as its client saw it (``pibake.registry_client``).

    ``url`` the full URL asked; ``status`` the HTTP status, None when no answer came (refused, timed out, TLS
    check failed); ``reason`` one line: why; ``server_message`` the registry's own ``{"error": ...}`` text
    when it answered with one. ``str()`` joins them; no credential is ever part of it."""

    def __init__(self, url, reason, *, status=None, server_message=None):
        self.url = url
        self.reason = reason
        self.status = status
        self.server_message = server_message
        super().__init__(f"{url}: {reason}" + (f" ({server_message})" if server_message else ""))
