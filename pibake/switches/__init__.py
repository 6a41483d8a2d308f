"""Smart plugs and relays: the switches of cluster.yaml, driven from the manager or the deploying machine.

    from pibake import switches
    switches.list_switches("cluster")                 # what cluster.yaml declares, no network
    switches.switch_status("cluster", "rack")          # {"name", "state": {"on", "power_w", ...}, ...}
    switches.switch_command("cluster", "fan", "on")    # on | off | toggle; the state read back after it
    switches.cycle_switch("cluster", "lamp", off_s=5)  # off, wait, on; every step reported

Drivers (``pibake.switches.kasa``, ``.shelly``, ``.tasmota``) share one interface (``base.Switch``).
Commands for one plug never interleave: each holds a lock on ``<cluster>/switches/<name>.lock`` (threads
and processes alike). Every action is appended to ``<cluster>/switches/log.jsonl`` (no credentials).
Credentials live in ``<cluster>/secrets/switch-<name>.json`` (0400), never in cluster.yaml or a log.
This package is orchestration: it is never shipped to the nodes (the first-boot agent does not import it).
"""

import contextlib
import datetime as dt
import fcntl
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from pibake.cluster import load_cluster
from pibake.errors import (  # noqa: F401 (pibake.switches.SwitchError)
    ConfigError,
    DriverMissing,
    SecretsError,
    SwitchBusy,
    SwitchError,
)
from pibake.layout import KASA_PACKAGES
from pibake.locks import file_lock
from pibake.secrets import secrets_dir, write_private
from pibake.switches.base import SwitchState  # noqa: F401

LOG = logging.getLogger(__name__)

ACTIONS = ("on", "off", "toggle")
DEFAULT_OFF_S = 10.0  # long enough for a Pi's supply capacitors to drain so it really resets
_THREAD_LOCKS = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def kasa_missing_text():
    """What to do when python-kasa is not installed in this Python (the manager's /opt/pibake venv, unless
    someone installed it there): the one line the CLI, REST and the page show."""
    pip = Path(sys.prefix) / "bin" / "pip"
    return (f"the kasa driver needs python-kasa, which is not installed in {sys.prefix}: install it with "
            f"`{pip} install python-kasa` (on the manager first `apt-get install python3-aiohttp`; Debian has no "
            "python3-kasa; see docs/switches.md)")


def kasa_broken_text(exc):
    """What to do when python-kasa is installed but cannot be imported: a library it needs is missing (on a
    manager: a Debian package of pibake.layout.KASA_PACKAGES, which a seed installs for a Kasa cluster)."""
    missing = exc.name or str(exc)
    return (f"the kasa driver cannot load python-kasa in {sys.prefix}: it needs the Python module {missing}, "
            f"which is not installed (on the manager: `apt-get install {' '.join(KASA_PACKAGES)}`; "
            "see docs/switches.md)")


def _driver_class(driver):
    # imported on use: python-kasa (asyncio, aiohttp) and paho are only loaded for the plug in hand
    if driver == "kasa":
        if importlib.util.find_spec("kasa") is None:
            raise DriverMissing(kasa_missing_text())
        try:
            from pibake.switches.kasa import KasaSwitch  # start-up: python-kasa loads in ~1.4 s
        except ImportError as exc:  # python-kasa is there, a library it needs is not (Debian's aiohttp)
            raise DriverMissing(kasa_broken_text(exc)) from None
        return KasaSwitch
    if driver == "shelly":
        from pibake.switches.shelly import ShellySwitch  # start-up: the plug in hand only

        return ShellySwitch
    if driver == "tasmota":
        from pibake.switches.tasmota import TasmotaSwitch  # start-up: the plug in hand only (paho)

        return TasmotaSwitch
    raise ConfigError(f"unknown switch driver {driver!r}")


# --------------------------------------------------------------------------- configuration


def switch_configs(cluster_dir):
    """{name: SwitchConfig} from cluster.yaml (validated)."""
    return {s.name: s for s in load_cluster(cluster_dir).switches}


def switch_config(cluster_dir, name):
    configs = switch_configs(cluster_dir)
    if name not in configs:
        known = ", ".join(sorted(configs)) or "none declared"
        raise ConfigError(f"no switch named {name!r} in cluster.yaml (switches: {known}; see docs/switches.md)")
    return configs[name]


def describe(config):
    """The JSON shape of one switch's configuration (what `pibake switch list --json` prints)."""
    return {
        "name": config.name,
        "driver": config.driver,
        "address": config.address,
        "channel": config.channel,
        "node": config.node,
        "thing": config.thing,
        "auto_cycle": config.auto_cycle,
        "transport": ("mqtts" if config.mqtt_tls else "mqtt") if config.mqtt_topic else ("http" if config.driver != "kasa" else "kasa-local"),
    }


def list_switches(cluster_dir):
    """Every switch of cluster.yaml, in file order, without talking to any device."""
    return [describe(s) for s in load_cluster(cluster_dir).switches]


# --------------------------------------------------------------------------- credentials


def credentials_path(cluster_dir, name):
    return secrets_dir(cluster_dir) / f"switch-{name}.json"


def set_credentials(cluster_dir, name, *, username=None, password=None, mqtt_username=None, mqtt_password=None):
    """Store a switch's credentials in secrets/switch-NAME.json (0400, directory 0700); returns the path.

    Values not given are kept from the stored record (device and MQTT credentials are set separately)."""
    switch_config(cluster_dir, name)  # an unknown name is an error before anything is written
    given = {k: v for k, v in (("username", username), ("password", password),
                               ("mqtt_username", mqtt_username), ("mqtt_password", mqtt_password)) if v}
    if not given:
        raise SecretsError("no credentials given (a password, or an MQTT user name and password)")
    # the device's and the broker's credentials are set one at a time: keep the other pair
    record = {**(load_credentials(cluster_dir, name) or {}), **given}
    sdir = secrets_dir(cluster_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    os.chmod(sdir, 0o700)
    path = credentials_path(cluster_dir, name)
    if path.exists():
        path.unlink()  # 0400 files are replaced, not opened for writing
    write_private(path, json.dumps(record))
    LOG.info("stored credentials for switch %s in %s", name, path)
    return path


def load_credentials(cluster_dir, name):
    """The stored credentials of switch ``name`` or None; refuses a file others can read."""
    path = credentials_path(cluster_dir, name)
    if not path.exists():
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SecretsError(f"{path} is readable by others (mode {mode:o}); run `chmod 400 {path}`")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SecretsError(f"{path} is not readable JSON; set it again with `pibake switch credentials {name}`") \
            from exc
    if not isinstance(record, dict):
        raise SecretsError(f"{path} is not a JSON object; set it again with `pibake switch credentials {name}`")
    return record


# --------------------------------------------------------------------------- serialising and logging


def _state_dir(cluster_dir):
    path = Path(cluster_dir) / "switches"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plug_lock(cluster_dir, name, wait=True):
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(name, threading.Lock())
    path = _state_dir(cluster_dir) / f"{name}.lock"
    if wait:
        return file_lock(path, thread_lock=thread_lock)
    return _try_lock(path, thread_lock, name)


@contextlib.contextmanager
def _try_lock(path, thread_lock, name):
    busy = SwitchBusy(f"switch {name}: busy (another command is switching it right now)")
    if not thread_lock.acquire(blocking=False):
        raise busy
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy from None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        thread_lock.release()


def record(cluster_dir, entry):
    """Append one action to <cluster>/switches/log.jsonl."""
    entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
             **entry}
    with open(_state_dir(cluster_dir) / "log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


def switch_log(cluster_dir, limit=50):
    """The last ``limit`` recorded actions, oldest first."""
    path = Path(cluster_dir) / "switches" / "log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[-limit:]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            LOG.warning("skipping an unreadable line of %s", path)
    return out


# --------------------------------------------------------------------------- commands


def open_switch(cluster_dir, name):
    """The driver object for switch ``name`` (configuration and credentials loaded)."""
    config = switch_config(cluster_dir, name)
    return _driver_class(config.driver)(config, load_credentials(cluster_dir, name),
                                        ca_file=secrets_dir(cluster_dir) / "ca.crt")


def _result(config, action, state, **extra):
    return {**describe(config), "action": action, "state": state.as_dict(), **extra}


def switch_status(cluster_dir, name, *, wait=True):
    """The state read from the device now. ``wait=False``: SwitchBusy instead of waiting for a command
    that holds the plug (the registry page must not hang for a cycle)."""
    switch = open_switch(cluster_dir, name)
    with _plug_lock(cluster_dir, name, wait=wait):
        state = switch.state()
    return _result(switch.config, "status", state)


def all_status(cluster_dir):
    """Status of every switch; a device that fails is reported with its error, not raised."""
    out = []
    for config in switch_configs(cluster_dir).values():
        try:
            out.append(switch_status(cluster_dir, config.name))
        except SwitchError as exc:
            out.append({**describe(config), "action": "status", "state": None, "error": str(exc)})
    return out


def switch_command(cluster_dir, name, action, *, by="cli", why=None):
    """Run ``action`` (on, off, toggle) and return the state read back afterwards; recorded in the log
    (``why``: the reason, for a switching a rule decided)."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown switch action {action!r} (one of {', '.join(ACTIONS)})")
    switch = open_switch(cluster_dir, name)
    reason = {"why": why} if why else {}
    with _plug_lock(cluster_dir, name):
        try:
            state = getattr(switch, action)()
        except SwitchError as exc:
            record(cluster_dir, {"switch": name, "action": action, "by": by, "ok": False, "error": str(exc), **reason})
            raise
        if action in ("on", "off") and state.on != (action == "on"):
            error = f"switch {name}: asked to turn {action}, but it reads back {'on' if state.on else 'off'}"
            record(cluster_dir, {"switch": name, "action": action, "by": by, "ok": False, "error": error, **reason})
            raise SwitchError(error)
        record(cluster_dir, {"switch": name, "action": action, "by": by, "ok": True, "on": state.on, **reason})
    return _result(switch.config, action, state)


def switch_info(cluster_dir, name):
    switch = open_switch(cluster_dir, name)
    with _plug_lock(cluster_dir, name):
        return {**describe(switch.config), "info": switch.info()}


def cycle_switch(cluster_dir, name, *, off_s=DEFAULT_OFF_S, progress=None, by="cli", sleep=time.sleep):
    """Off, wait ``off_s``, on; each step read back and reported through ``progress(message)``.

    A plug that could not be turned back on raises a ``SwitchError`` that says what is left without power.
    """
    say = progress or (lambda message: None)
    switch = open_switch(cluster_dir, name)
    config = switch.config
    steps = []
    with _plug_lock(cluster_dir, name):
        before = switch.state()
        steps.append({"step": "read", "on": before.on})
        say(f"{name}: {'on' if before.on else 'off'} before the cycle")
        state = switch.off()
        if state.on:
            record(cluster_dir, {"switch": name, "action": "cycle", "by": by, "ok": False, "error": "stayed on"})
            raise SwitchError(f"switch {name}: asked to turn off for the cycle, but it reads back on")
        steps.append({"step": "off", "on": False})
        say(f"{name}: off; waiting {off_s:g} s")
        sleep(off_s)
        steps.append({"step": "wait", "seconds": off_s})
        try:
            state = switch.on()
            if not state.on:
                raise SwitchError(f"switch {name}: asked to turn on, but it reads back off")
        except SwitchError as exc:
            left = f"node {config.node}" if config.node else (config.thing or "what it powers")
            loud = (f"CYCLE INCOMPLETE: switch {name} is OFF and could not be turned back on; {left} has no "
                    f"power. Turn it on by hand or with `pibake switch on {name}`. Cause: {exc}")
            record(cluster_dir, {"switch": name, "action": "cycle", "by": by, "ok": False, "error": loud})
            raise SwitchError(loud) from exc
        steps.append({"step": "on", "on": True})
        say(f"{name}: on again")
        record(cluster_dir, {"switch": name, "action": "cycle", "by": by, "ok": True, "off_s": off_s})
    return _result(config, "cycle", state, steps=steps)
