"""TP-Link Kasa plugs through python-kasa, on the local network only (no cloud account involved).

Without credentials the plug is spoken to with the legacy XOR protocol on TCP 9999 (HS100/HS103/HS110,
KP115 and the other IOT plugs on older firmware), connected directly instead of by UDP discovery, which
python-kasa itself recommends for a known address. With credentials (newer firmware that wants the
TP-Link account) python-kasa discovers the device's encryption first.
"""

import asyncio
import errno
import logging
from concurrent.futures import ThreadPoolExecutor

from kasa import (
    Credentials,
    Device,
    DeviceConfig,
    DeviceConnectionParameters,
    DeviceEncryptionType,
    DeviceFamily,
    Discover,
    Module,
)
from kasa import exceptions as kasa_errors

from pibake.switches.base import Switch, SwitchState

LOG = logging.getLogger(__name__)


class KasaSwitch(Switch):
    driver = "kasa"

    def _run(self, operation):
        """Connect, run ``operation(device)`` and disconnect, all within one deadline.

        From a thread that already runs an event loop (a notebook, an async caller) the work goes to a
        helper thread: asyncio.run cannot nest."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._run_here(operation)

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(self._run_here, operation).result()

    def _run_here(self, operation):
        try:
            return asyncio.run(self._with_device(operation))
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise self.timed_out() from exc

    async def _with_device(self, operation):
        async with asyncio.timeout(self.timeout * 2):  # connect + one command, each bounded by timeout
            device = None
            try:
                device = await self._connect()
                return await operation(device)
            except kasa_errors.AuthenticationError as exc:
                raise self.bad_credentials() from exc
            except kasa_errors.TimeoutError as exc:
                raise self.timed_out() from exc
            except kasa_errors.KasaException as exc:
                raise self._classify(exc) from exc
            except OSError as exc:
                raise self.unreachable(exc.strerror or type(exc).__name__) from exc
            finally:
                if device is not None:
                    await device.disconnect()

    def _classify(self, exc):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return self.unreachable("connection refused")
        if isinstance(cause, OSError):
            return self.unreachable(cause.strerror or type(cause).__name__)
        if isinstance(cause, (TimeoutError, asyncio.TimeoutError)):
            return self.timed_out()
        text = str(exc)
        if "Unable to connect" in text or "Connection" in text and "refused" in text:
            return self.unreachable("connection refused")
        return self.garbage(text.splitlines()[0][:80] if text else type(exc).__name__)

    async def _connect(self):
        if self.credentials:
            creds = Credentials(self.credentials.get("username", ""), self.credentials.get("password", ""))
            device = await Discover.discover_single(
                self.config.host, port=self.config.port, credentials=creds,
                discovery_timeout=int(max(1, self.timeout)), timeout=int(max(1, self.timeout)),
            )
            if device is None:
                raise self.unreachable("no answer to discovery")
            await device.update()
            return device
        config = DeviceConfig(
            host=self.config.host,
            port_override=self.config.port,
            timeout=int(max(1, self.timeout)),
            connection_type=DeviceConnectionParameters(DeviceFamily.IotSmartPlugSwitch, DeviceEncryptionType.Xor),
        )
        return await Device.connect(config=config)

    def _outlet(self, device):
        """The plug itself, or outlet ``channel`` of a power strip (HS300, KP303)."""
        if device.children:
            if self.config.channel >= len(device.children):
                raise self.garbage(f"it has {len(device.children)} outlets, no outlet {self.config.channel}")
            return device.children[self.config.channel]
        return device

    def _state_of(self, device):
        outlet = self._outlet(device)
        meter = outlet.modules.get(Module.Energy) or device.modules.get(Module.Energy)
        power = energy = None
        if meter is not None:
            power = _number(meter.current_consumption)
            energy = _number(meter.consumption_total)
        if not isinstance(outlet.is_on, bool):
            raise self.garbage(f"relay state {outlet.is_on!r}")
        return SwitchState(on=outlet.is_on, power_w=power, energy_kwh=energy)

    def state(self):
        async def read(device):
            return self._state_of(device)

        return self._run(read)

    def turn(self, on):
        async def switch(device):
            outlet = self._outlet(device)
            await (outlet.turn_on() if on else outlet.turn_off())
            await device.update()
            return self._state_of(device)

        return self._run(switch)

    def toggle(self):
        async def flip(device):
            outlet = self._outlet(device)
            await (outlet.turn_off() if outlet.is_on else outlet.turn_on())
            await device.update()
            return self._state_of(device)

        return self._run(flip)

    def info(self):
        async def describe(device):
            return {
                "model": device.model,
                "alias": device.alias,
                "mac": device.mac,
                "firmware": (device.hw_info or {}).get("sw_ver"),
                "outlets": len(device.children) or 1,
                "has_energy_meter": self._state_of(device).power_w is not None,
            }

        return self._run(describe)


def _number(value):
    return None if value is None else round(float(value), 3)
