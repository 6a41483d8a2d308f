"""What every switch driver offers, and the one error a switch raises.

A driver is a small class: ``state()``, ``turn(on)``, ``toggle()``, ``info()``. ``turn`` and ``toggle``
return the state read back from the device *after* the command, so a caller never reports what it
asked for, only what the plug says it is. Power and energy are ``None`` where the device cannot measure.
"""

from dataclasses import asdict, dataclass

from pibake.errors import SwitchError

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SwitchState:
    on: bool
    power_w: float | None = None  # instantaneous power, where the device has a meter
    energy_kwh: float | None = None  # energy counter since the device's last reset

    def as_dict(self):
        return asdict(self)


class Switch:
    """Base of the drivers. ``config`` is a ``pibake.model.SwitchConfig``; ``credentials`` a
    ``{"username", "password"}`` mapping from secrets/ or None."""

    driver = None

    def __init__(self, config, credentials=None, ca_file=None):
        self.config = config
        self.credentials = credentials
        self.ca_file = ca_file  # the cluster CA (secrets/ca.crt), for TLS where the device or broker has it
        self.timeout = config.timeout or DEFAULT_TIMEOUT_S

    def state(self):
        raise NotImplementedError

    def turn(self, on):
        raise NotImplementedError

    def toggle(self):
        return self.turn(not self.state().on)

    def info(self):
        raise NotImplementedError

    def on(self):
        return self.turn(True)

    def off(self):
        return self.turn(False)

    # one wording for the faults every driver meets
    def _where(self):
        return f"switch {self.config.name} ({self.driver} at {self.config.address})"

    def unreachable(self, why):
        return SwitchError(f"{self._where()}: cannot reach the device: {why}")

    def timed_out(self):
        return SwitchError(f"{self._where()}: no answer within {self.timeout:g} s (is it powered and on the network?)")

    def bad_credentials(self):
        return SwitchError(
            f"{self._where()}: the device refused the credentials "
            f"(set them with `pibake switch credentials {self.config.name}`)"
        )

    def garbage(self, what):
        return SwitchError(f"{self._where()}: the device answered something that is not a {self.driver} reply ({what})")


def short(text, limit=60):
    """A printable, bounded excerpt of a device's answer for an error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."
