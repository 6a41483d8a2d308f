"""Shelly Gen2+ (Plus, Pro, Gen3, Gen4) relays through their RPC over HTTP.

``/rpc/Switch.GetStatus``, ``/rpc/Switch.Set``, ``/rpc/Switch.Toggle``, ``/rpc/Shelly.GetDeviceInfo``.
A device with a password wants HTTP digest authentication with SHA-256 (RFC 7616), user ``admin``,
realm = the device id: requests' ``HTTPDigestAuth`` speaks it (Python's urllib handler does not).
The devices serve plain HTTP only; keep them on the cluster's own network.
"""

import json
import logging

import requests
from requests.auth import HTTPDigestAuth

from pibake.switches.base import Switch, SwitchState, short

LOG = logging.getLogger(__name__)

SHELLY_USER = "admin"  # Gen2+ devices have one user, always admin


class ShellySwitch(Switch):
    driver = "shelly"

    def _rpc(self, method, **params):
        url = f"http://{self.config.address}/rpc/{method}"
        auth = None
        if self.credentials:
            auth = HTTPDigestAuth(self.credentials.get("username") or SHELLY_USER, self.credentials["password"])
        try:
            reply = requests.get(url, params=params, auth=auth, timeout=self.timeout, allow_redirects=False)
        except requests.Timeout as exc:
            raise self.timed_out() from exc
        except requests.ConnectionError as exc:
            raise self.unreachable(_connection_reason(exc)) from exc
        except requests.RequestException as exc:
            raise self.garbage(type(exc).__name__) from exc
        if reply.status_code == 401:
            raise self.bad_credentials()  # wrong password, or none stored for a device that wants one
        try:
            body = reply.json()
        except (ValueError, json.JSONDecodeError) as exc:
            raise self.garbage(f"HTTP {reply.status_code}: {short(reply.text)!r}") from exc
        if reply.status_code != 200:
            message = body.get("message") if isinstance(body, dict) else None
            raise self.garbage(f"HTTP {reply.status_code}: {short(message or body)}")
        if not isinstance(body, dict):
            raise self.garbage(f"{short(body)!r}")
        return body

    def state(self):
        status = self._rpc("Switch.GetStatus", id=self.config.channel)
        output = status.get("output")
        if not isinstance(output, bool):
            raise self.garbage(f"no output in {short(status)}")
        energy = status.get("aenergy") or {}
        total_wh = energy.get("total") if isinstance(energy, dict) else None
        return SwitchState(
            on=output,
            power_w=_number(status.get("apower")),
            energy_kwh=None if total_wh is None else _number(float(total_wh) / 1000.0),
        )

    def turn(self, on):
        self._rpc("Switch.Set", id=self.config.channel, on="true" if on else "false")
        return self.state()

    def toggle(self):
        self._rpc("Switch.Toggle", id=self.config.channel)
        return self.state()

    def info(self):
        info = self._rpc("Shelly.GetDeviceInfo")
        if "id" not in info:
            raise self.garbage(f"no id in {short(info)}")
        return {
            "model": info.get("model"),
            "id": info.get("id"),
            "mac": info.get("mac"),
            "firmware": info.get("ver"),
            "generation": info.get("gen"),
            "auth": bool(info.get("auth_en")),
        }


def _connection_reason(exc):
    text = str(exc)
    if "refused" in text:
        return "connection refused"
    if "timed out" in text:
        return "connection timed out"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "unknown host name"
    return "connection failed"


def _number(value):
    try:
        return None if value is None else round(float(value), 3)
    except (TypeError, ValueError):
        return None
