"""pibake sensor agent: read the node's sensors and Wi-Fi, buffer the readings on disk, send them to the registry.

Contract (docs/sensors-node.md; the wire format is the registry's ``POST /api/v1/readings``):

* installed by cloud-init ``write_files`` at ``/usr/local/lib/pibake/sensor_agent.py`` on EVERY role and run by
  ``pibake-sensor.service`` as ``python3 /usr/local/lib/pibake/sensor_agent.py --config /etc/pibake/sensor.json``.
  Every Pi reports its SoC temperature and throttling flags (and Wi-Fi when it has a ``wlan0``); the I2C bus is
  read only where the config names one (``"bus": 1``, the sensor role) and a sensor answers there.
* settings ``/etc/pibake/sensor.json`` (keys and defaults in ``DEFAULTS``); registry URL, CA file, hostname and the
  per-node credential file come from the first-boot agent's ``/etc/pibake/agent.json`` (``agent_config`` key). The
  credential is the one the first-boot agent received at enrolment; until it exists, readings only accumulate.
* single file, stdlib only, plus the sensor driver libraries where a sensor is found: Debian's ``python3-bme280``
  (RPi.bme280, a BME280/BMP280 driver that takes any smbus-like bus object) with ``python3-smbus2``; Pimoroni's
  ``bme680`` for a BME680. Chips are told apart by their chip id (0x60 BME280, 0x58 BMP280: no humidity, 0x61
  BME680). The compensation maths is the libraries'; this file only finds the chip, checks it finished its
  conversion and applies the user's calibration offsets.
* every reading is written to the on-disk buffer (SQLite) BEFORE anything is sent; ``seq`` is SQLite's
  AUTOINCREMENT key, so it only grows, across restarts too. Batches (oldest first) go to the registry over HTTPS
  pinned to the cluster CA (only that file is trusted, as in agent.py) with HTTP Basic ``hostname:credential``.
  The registry stores ``(node, seq)`` once, so a resend after a crash never duplicates. A batch is deleted from the
  buffer only after the registry answered 200. 4xx (a batch the registry refuses) → the batch moves to the bounded
  ``rejected`` table (kept for a person to look at) and sending goes on; 401/403/404/408/429, 5xx and an
  unreachable registry → the batch stays and is retried with exponential backoff. The buffer is bounded
  (``buffer_max``): when full the oldest readings are dropped and the count is logged.
* MQTT is optional: with ``"mqtt": {...}`` in the settings, ``sensor_mqtt.MqttPublisher`` (a file next to this one)
  publishes each new reading; a missing module or a broker failure is logged and never stops the HTTPS path.
* ``--once`` takes one reading (buffers and sends it), ``--dry-run`` neither buffers nor sends, ``--json`` prints the
  reading. Exit codes: 0 fine, 1 failed, 2 bad config.
"""

import argparse
import base64
import errno
import http.client
import json
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.parse

LOG = logging.getLogger("pibake.sensor")
AGENT_VERSION = "1"

# The metric names (the unit is in the name) and their plausible ranges. The registry refuses a batch holding a
# value outside these, so the agent leaves such a value out of its reading (and logs it) instead.
# Kept equal to pibake/sensors_model.py by a parity test (this file cannot import pibake).
METRICS = ("temperature_c", "humidity_pct", "pressure_hpa", "gas_ohm", "wifi_signal_dbm", "wifi_quality_pct",
           "wifi_bitrate_mbps", "soc_temperature_c", "throttled")
RANGES = {
    "temperature_c": (-40.0, 85.0), "humidity_pct": (0.0, 100.0), "pressure_hpa": (300.0, 1100.0),
    "gas_ohm": (0.0, 1e7), "wifi_signal_dbm": (-120.0, 0.0), "wifi_quality_pct": (0.0, 100.0),
    "wifi_bitrate_mbps": (0.0, 10000.0), "soc_temperature_c": (-40.0, 125.0), "throttled": (0, 0xFFFFFFFF),
}
MAX_BATCH = 500  # the registry refuses bigger batches (413)
MAX_NETWORKS = 64  # per reading (the registry refuses more): the strongest are kept
EARLIEST_TIME = 946684800  # 2000-01-01: a clock before that is not set yet (the registry refuses such readings)
PLACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.,'()/-]{0,63}$")  # the registry's place label pattern

DEFAULTS = {
    "interval_s": 60,
    "offsets": {},
    "bus": None,  # I2C bus number (1 on a Pi); None: no environment sensor on this node
    "address": None,  # 0x76 or 0x77; None: try both
    "buffer": "/var/lib/pibake/sensor-buffer.sqlite3",
    "buffer_max": 100000,
    "rejected_max": 5000,
    "batch": 100,
    "place": None,
    "wifi_interface": "wlan0",
    "scan_every_s": 300,
    "mqtt": None,
    "sim_bus": None,  # lab/tests: a register image JSON standing in for the I2C bus
    "agent_config": "/etc/pibake/agent.json",
    "request_timeout_s": 15,
    "backoff_base_s": 5,
    "backoff_max_s": 600,
    "thermal_dir": "/sys/class/thermal",
    "proc_net_wireless": "/proc/net/wireless",
}
ADDRESSES = (0x76, 0x77)
CHIPS = {0x60: "bme280", 0x58: "bmp280", 0x61: "bme680"}
REG_CHIP_ID = 0xD0
REG_STATUS = 0xF3  # BME280/BMP280: bit 3 "measuring" is set while a conversion runs
MEASURING = 0x08
CONVERSION_WAIT_S = 0.25  # x1 oversampling converts in < 10 ms; a bit still set after this is a stuck sensor
RETRY_STATUSES = (401, 403, 404, 408, 429)  # not the batch's fault: keep it and try again later


class SensorError(Exception):
    """The environment sensor could not be read (the reading goes on without it)."""


class ConfigError(Exception):
    """The settings are unusable: exit 2."""


# =========================================================================== settings


def _read_settings_file(path, missing_ok):
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the sensor settings ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the sensor settings must be a JSON object")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    return data


def settings_dropins(path):
    """The drop-in files that override ``path`` (``/etc/pibake/sensor.json`` -> ``/etc/pibake/sensor.d/*.json``),
    in name order. The seed rewrites sensor.json on a re-seeded card; local changes (calibration offsets, the lab's
    simulated bus) live in a drop-in and survive that."""
    directory = os.path.splitext(str(path))[0] + ".d"
    return [os.path.join(directory, n) for n in sorted(_listdir(directory)) if n.endswith(".json")]


def load_settings(path):
    """DEFAULTS overlaid with the JSON file at ``path`` (a missing file means all defaults), then with its
    drop-ins (``settings_dropins``), each key replacing the one before."""
    settings = dict(DEFAULTS)
    settings.update(_read_settings_file(path, missing_ok=True))
    for dropin in settings_dropins(path):
        settings.update(_read_settings_file(dropin, missing_ok=False))
    problems = []
    if not isinstance(settings["interval_s"], (int, float)) or settings["interval_s"] <= 0:
        problems.append("interval_s must be a number of seconds > 0")
    offsets = settings["offsets"]
    if not isinstance(offsets, dict) or any(k not in METRICS or isinstance(v, bool) or not isinstance(v, (int, float))
                                            for k, v in offsets.items()):
        problems.append(f"offsets must map metric names ({', '.join(METRICS)}) to numbers")
    address = settings["address"]
    if isinstance(address, str):
        try:
            address = settings["address"] = int(address, 0)
        except ValueError:
            address = -1
    if address is not None and address not in ADDRESSES:
        problems.append("address must be 0x76, 0x77 or null (try both)")
    if settings["bus"] is not None and (isinstance(settings["bus"], bool) or not isinstance(settings["bus"], int)):
        problems.append("bus must be an I2C bus number (1 on a Raspberry Pi) or null")
    for key in ("buffer_max", "rejected_max"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            problems.append(f"{key} must be a whole number >= 1")
    if not isinstance(settings["batch"], int) or not 1 <= settings["batch"] <= MAX_BATCH:
        problems.append(f"batch must be 1..{MAX_BATCH}")
    if settings["place"] is not None and not (isinstance(settings["place"], str) and PLACE_RE.match(settings["place"])):
        problems.append("place must be null or a label of letters, digits, spaces and _ . , ' ( ) / - "
                        "(at most 64, starting with a letter or digit)")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return settings


def load_agent_config(path):
    """registry_url, ca_cert, hostname, credential_file from the first-boot agent's config (None if absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the agent config ({exc})") from None
    missing = [k for k in ("registry_url", "ca_cert", "hostname", "credential_file") if not data.get(k)]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    return data


# =========================================================================== I2C: the bus and the chip


class RegisterImageBus:
    """A simulated I2C bus with the smbus2 calls the driver libraries use, backed by a register image.

    The lab and the tests use it where no I2C hardware can exist (settings ``sim_bus``). The image is JSON::

        {"devices": {"0x76": {"registers": {"0x88": "70 6b 43 67 ...", "0xd0": "58", "0xf7": "65 5a c0 7e ed 00"},
                              "stuck_measuring": false}}}

    each ``registers`` entry being the bytes from that register on. A device behaves like a Bosch sensor as far
    as the drivers can tell: an address with no device NACKs (OSError EREMOTEIO, as smbus2 raises), writing a
    forced-mode measurement to ctrl_meas (0xF4) finishes at once (the mode bits fall back to sleep, the status
    register's measuring bit stays clear) unless ``stuck_measuring`` holds that bit set.
    """

    def __init__(self, devices):
        self.devices = {}
        self.stuck = {}
        for addr, dev in devices.items():
            address = int(addr, 0) if isinstance(addr, str) else int(addr)
            regs = bytearray(256)
            for start, data in (dev.get("registers") or {}).items():
                first = int(start, 0) if isinstance(start, str) else int(start)
                values = bytes.fromhex(data) if isinstance(data, str) else bytes(data)
                regs[first:first + len(values)] = values
            self.devices[address] = regs
            self.stuck[address] = bool(dev.get("stuck_measuring"))
            if self.stuck[address]:
                regs[REG_STATUS] |= MEASURING

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as fh:
                image = json.load(fh)
            return cls(image["devices"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"sim_bus {path}: not a register image ({exc})") from None

    def _regs(self, address):
        if address not in self.devices:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")  # what smbus2 raises on a NACK
        return self.devices[address]

    def read_byte_data(self, address, register):
        return self._regs(address)[register & 0xFF]

    def read_word_data(self, address, register):
        regs = self._regs(address)
        return regs[register & 0xFF] | regs[(register + 1) & 0xFF] << 8  # SMBus words are little-endian

    def read_i2c_block_data(self, address, register, length):
        regs = self._regs(address)
        return [regs[(register + i) & 0xFF] for i in range(length)]

    def write_byte_data(self, address, register, value):
        regs = self._regs(address)
        regs[register & 0xFF] = value & 0xFF
        if register == 0xF4 and value & 0x03 in (0x01, 0x02):  # forced mode: one conversion, then sleep
            regs[0xF4] &= ~0x03
            if self.stuck[address]:
                regs[REG_STATUS] |= MEASURING

    def write_i2c_block_data(self, address, register, data):
        for i, value in enumerate(data):
            self.write_byte_data(address, (register + i) & 0xFF, value)

    def close(self):
        pass


def open_bus(settings):
    """The I2C bus to read: the simulated one when ``sim_bus`` is set, else smbus2 on /dev/i2c-<bus>; None when
    this node has no bus configured or the kernel has none (I2C off: ``dtparam=i2c_arm=on`` missing)."""
    if settings.get("sim_bus"):
        return RegisterImageBus.load(settings["sim_bus"])
    if settings.get("bus") is None:
        return None
    if not os.path.exists(f"/dev/i2c-{settings['bus']}"):
        raise SensorError(f"/dev/i2c-{settings['bus']} does not exist: I2C is off (config.txt needs "
                          "dtparam=i2c_arm=on, then a reboot)")
    try:
        import smbus2  # noqa: PLC0415 - only nodes with a sensor need it
    except ImportError:
        raise SensorError("python3-smbus2 is not installed (apt install python3-smbus2)") from None
    return smbus2.SMBus(settings["bus"])


def detect_chip(bus, address=None):
    """(address, chip) of the first Bosch sensor answering at ``address`` (or 0x76, then 0x77).

    Raises SensorError naming what was seen: no device (NACK on both) or an unknown chip id.
    """
    seen = []
    for addr in ([address] if address else ADDRESSES):
        try:
            chip_id = bus.read_byte_data(addr, REG_CHIP_ID)
        except OSError:
            seen.append(f"nothing at 0x{addr:02x}")
            continue
        if chip_id in CHIPS:
            return addr, CHIPS[chip_id]
        seen.append(f"0x{addr:02x} has chip id 0x{chip_id:02x} (not a BME280 0x60, BMP280 0x58 or BME680 0x61)")
    raise SensorError("no BME280/BMP280/BME680 found: " + "; ".join(seen))


def _wait_conversion(bus, address, timeout=CONVERSION_WAIT_S):
    deadline = time.monotonic() + timeout
    while bus.read_byte_data(address, REG_STATUS) & MEASURING:
        if time.monotonic() > deadline:
            raise SensorError(f"the sensor at 0x{address:02x} stays busy (status 'measuring' bit set for more than "
                              f"{timeout} s); its reading was discarded")
        time.sleep(0.005)


def read_bosch(bus, address, chip):
    """{metric: value} from the chip, computed by its driver library (RPi.bme280 / Pimoroni bme680)."""
    try:
        if chip == "bme680":
            return _read_bme680(bus, address)
        try:
            import bme280  # noqa: PLC0415 - Debian python3-bme280 (RPi.bme280)
        except ImportError:
            raise SensorError("python3-bme280 is not installed (apt install python3-bme280)") from None
        # Fresh calibration per reading (load_calibration_params, not the library's memoized cache): a sensor
        # swapped at run time is read right, and it is 26 bytes.
        params = bme280.load_calibration_params(bus, address)
        sample = bme280.sample(bus, address, params)
        _wait_conversion(bus, address)  # the library reads after a fixed delay: refuse data from a busy sensor
    except OSError as exc:
        raise SensorError(f"I2C error reading the {chip} at 0x{address:02x}: {exc}") from None
    metrics = {"temperature_c": sample.temperature, "pressure_hpa": sample.pressure}
    if chip == "bme280":  # a BMP280 has no humidity sensor: its "humidity" registers hold nothing
        metrics["humidity_pct"] = sample.humidity
    return metrics


def _read_bme680(bus, address):
    try:
        import bme680  # noqa: PLC0415 - Pimoroni's bme680 (pip), only on BME680 nodes
    except ImportError:
        raise SensorError("a BME680 was found but the bme680 library is not installed "
                          "(pip install bme680; see docs/sensors-node.md)") from None
    try:
        sensor = bme680.BME680(address, i2c_device=bus)
        sensor.set_gas_status(bme680.ENABLE_GAS_MEAS)
        sensor.set_gas_heater_profile(320, 150)
        deadline = time.monotonic() + 3.0
        while not sensor.get_sensor_data():
            if time.monotonic() > deadline:
                raise SensorError(f"the BME680 at 0x{address:02x} reported no new data within 3 s")
            time.sleep(0.05)
    except (OSError, RuntimeError) as exc:
        raise SensorError(f"reading the BME680 at 0x{address:02x} failed: {exc}") from None
    data = sensor.data
    metrics = {"temperature_c": data.temperature, "pressure_hpa": data.pressure, "humidity_pct": data.humidity}
    if data.heat_stable:
        metrics["gas_ohm"] = data.gas_resistance
    return metrics


def read_environment(settings, bus=None):
    """Environment metrics of this node ({} when it has no sensor bus). Raises SensorError."""
    own = bus is None
    if own:
        bus = open_bus(settings)
        if bus is None:
            return {}
    try:
        address, chip = detect_chip(bus, settings.get("address"))
        return read_bosch(bus, address, chip)
    finally:
        if own:
            bus.close()


# =========================================================================== Wi-Fi


def split_terse(line):
    """Fields of one ``nmcli -t`` line: ``:`` separates, ``\\:`` and ``\\\\`` are a literal ``:`` and ``\\``."""
    fields, current, i = [], [], 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            current.append(line[i + 1])
            i += 2
            continue
        if ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    fields.append("".join(current))
    return fields


NMCLI_FIELDS = ("IN-USE", "SSID", "BSSID", "CHAN", "FREQ", "RATE", "SIGNAL", "SECURITY")


def _number(text):
    m = re.search(r"-?\d+(\.\d+)?", text or "")
    if not m:
        return None
    value = float(m.group(0))
    return int(value) if value.is_integer() else value


def pct_to_dbm(pct):
    """NetworkManager's signal percent back to dBm. NM maps dBm to percent linearly, -90 dBm (noise floor) → 30 %,
    -20 dBm → 100 % (nm-wifi-utils-nl80211.c, nl80211_xbm_to_percent), i.e. pct = dBm + 120 inside that range;
    outside it NM clamps, so this is an estimate there."""
    return None if pct is None else max(-120, min(0, int(pct) - 120))


def parse_nmcli_wifi(text):
    """Access points from ``nmcli -t -f IN-USE,SSID,BSSID,CHAN,FREQ,RATE,SIGNAL,SECURITY device wifi list``.

    Each: ssid (None when hidden), bssid (lower case), channel, frequency_mhz, bitrate_mbps, signal_pct,
    signal_dbm (from NM's percent, see pct_to_dbm), security (None when open), in_use.
    """
    networks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = split_terse(line)
        if len(fields) != len(NMCLI_FIELDS):
            LOG.debug("nmcli line with %d fields ignored", len(fields))
            continue
        in_use, ssid, bssid, chan, freq, rate, signal, security = fields
        pct = _number(signal)
        networks.append({
            "ssid": ssid if ssid not in ("", "--") else None,
            "bssid": bssid.lower() or None,
            "channel": _number(chan),
            "frequency_mhz": _number(freq),
            "bitrate_mbps": _number(rate),
            "signal_pct": pct,
            "signal_dbm": pct_to_dbm(pct),
            "security": security.strip() if security.strip() not in ("", "--") else None,
            "in_use": in_use.strip() == "*",
        })
    return networks


def parse_proc_net_wireless(text):
    """{iface: {"quality_pct", "signal_dbm"}} from /proc/net/wireless (link quality is out of 70 on Linux)."""
    result = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        iface, rest = line.split(":", 1)
        parts = rest.split()
        if len(parts) < 3:
            continue
        link, level = _number(parts[1]), _number(parts[2])
        if link is None or level is None:
            continue
        if level > 0:  # old drivers report an unsigned byte
            level -= 256
        result[iface.strip()] = {"quality_pct": round(min(100.0, link * 100 / 70)), "signal_dbm": level}
    return result


def parse_iw_link(text):
    """The current link from ``iw dev IFACE link``: ssid, bssid, frequency_mhz, signal_dbm, bitrate_mbps;
    None when not connected."""
    if not text or "Not connected" in text:
        return None
    link = {}
    m = re.search(r"Connected to ([0-9a-fA-F:]{17})", text)
    if m:
        link["bssid"] = m.group(1).lower()
    for key, pattern in (("ssid", r"^\s*SSID: (.*)$"), ("frequency_mhz", r"^\s*freq: ([\d.]+)"),
                         ("signal_dbm", r"^\s*signal: (-?\d+) dBm"), ("bitrate_mbps", r"^\s*tx bitrate: ([\d.]+)")):
        m = re.search(pattern, text, re.M)
        if m:
            link[key] = unescape_iw_ssid(m.group(1)) if key == "ssid" else _number(m.group(1))
    return link or None


def unescape_iw_ssid(text):
    """iw prints an SSID's backslashes, non-printable bytes and edge spaces as ``\\xNN``: back to the text."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def freq_to_channel(freq):
    """IEEE 802.11 channel of a frequency in MHz (2.4, 5 and 6 GHz bands)."""
    if freq is None:
        return None
    freq = int(freq)
    if freq == 2484:
        return 14
    if 2412 <= freq <= 2472:
        return (freq - 2407) // 5
    if 5955 <= freq <= 7115:
        return (freq - 5950) // 5
    if 5000 <= freq <= 5900:
        return (freq - 5000) // 5
    return None


def _run(argv, timeout=20):
    """stdout of ``argv`` or None when the program is missing or fails (logged at debug)."""
    if not shutil.which(argv[0]):
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOG.debug("%s failed: %s", argv[0], exc)
        return None
    if proc.returncode != 0:
        LOG.debug("%s exited %d: %s", " ".join(argv), proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout


def wifi_state(settings, scan=False, run=_run):
    """(link, networks, metrics) of the Wi-Fi interface. ``networks`` is None unless ``scan``.

    NetworkManager (``nmcli -t``) gives the access points and which one is in use; ``iw`` the real signal in dBm
    and the bit rate of the link; /proc/net/wireless is the fallback for signal and quality when neither works.
    """
    iface = settings["wifi_interface"]
    if not iface:
        return None, None, {}
    argv = ["nmcli", "-t", "-f", ",".join(NMCLI_FIELDS), "device", "wifi", "list", "ifname", iface,
            "--rescan", "auto" if scan else "no"]  # auto: NM rescans when its last scan is > 30 s old
    listed = run(argv)
    aps = parse_nmcli_wifi(listed) if listed else []
    current = next((ap for ap in aps if ap["in_use"]), None)
    link = None
    if current:
        link = {k: current[k] for k in ("ssid", "bssid", "channel", "frequency_mhz", "bitrate_mbps", "signal_dbm")}
        link["signal_pct"] = current["signal_pct"]
    iw = parse_iw_link(run(["iw", "dev", iface, "link"]) or "")
    if iw:
        link = {**(link or {}), **iw}
        link.setdefault("channel", freq_to_channel(link.get("frequency_mhz")))
    proc = parse_proc_net_wireless(_read_text(settings["proc_net_wireless"]) or "").get(iface)
    metrics = {}
    if link:
        if iw and iw.get("signal_dbm") is not None:
            metrics["wifi_signal_dbm"] = iw["signal_dbm"]
        elif proc:
            metrics["wifi_signal_dbm"] = proc["signal_dbm"]
        elif link.get("signal_dbm") is not None:
            metrics["wifi_signal_dbm"] = link["signal_dbm"]
        if link.get("signal_pct") is not None:
            metrics["wifi_quality_pct"] = link["signal_pct"]
        elif proc:
            metrics["wifi_quality_pct"] = proc["quality_pct"]
        if link.get("bitrate_mbps") is not None:
            metrics["wifi_bitrate_mbps"] = link["bitrate_mbps"]
        link["signal_dbm"] = metrics.get("wifi_signal_dbm", link.get("signal_dbm"))
        link.pop("signal_pct", None)
    elif proc:  # associated but NM and iw could not say more
        metrics = {"wifi_signal_dbm": proc["signal_dbm"], "wifi_quality_pct": proc["quality_pct"]}
    if link is not None:
        link["ssid"] = link.get("ssid") or ""  # "" is a hidden network, as the registry spells it
    networks = None
    if scan:
        seen = [ap for ap in aps if ap["bssid"]]
        seen.sort(key=lambda ap: -(ap["signal_pct"] or 0))
        networks = [{**{k: ap[k] for k in ("bssid", "signal_dbm", "signal_pct", "channel", "frequency_mhz",
                                           "security")}, "ssid": ap["ssid"] or ""} for ap in seen[:MAX_NETWORKS]]
    return link, networks, metrics


# =========================================================================== the SoC


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def parse_throttled(text):
    """The bit flags of ``vcgencmd get_throttled`` (``throttled=0x50000``), None if unreadable."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text or "")
    return int(m.group(1), 0) if m else None


def soc_state(settings, run=_run):
    """soc_temperature_c (the CPU thermal zone) and throttled (vcgencmd, on a Pi) when available."""
    metrics = {}
    base = settings["thermal_dir"]
    zones = sorted(z for z in _listdir(base) if z.startswith("thermal_zone"))
    chosen = None
    for zone in zones:  # the Pi's is "cpu-thermal"; else the first zone
        kind = (_read_text(f"{base}/{zone}/type") or "").strip()
        if chosen is None or kind in ("cpu-thermal", "cpu_thermal", "x86_pkg_temp"):
            chosen = zone
            if kind.startswith("cpu"):
                break
    if chosen:
        raw = _number(_read_text(f"{base}/{chosen}/temp"))
        if raw is not None:
            metrics["soc_temperature_c"] = round(raw / 1000.0, 2)
    throttled = parse_throttled(run(["vcgencmd", "get_throttled"]))
    if throttled is not None:
        metrics["throttled"] = throttled
    return metrics


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


# =========================================================================== a reading


def finish_metrics(raw, offsets):
    """Offsets applied, values rounded, anything outside the registry's plausible range left out (logged)."""
    metrics = {}
    for name, value in raw.items():
        if value is None or name not in METRICS:
            continue
        if name == "throttled":
            value = int(value)
        else:
            value = round(float(value) + offsets.get(name, 0.0), 2)
        low, high = RANGES[name]
        if not low <= value <= high:
            LOG.warning("%s = %s is outside %s..%s (a faulty sensor?); left out of this reading", name, value, low,
                        high)
            continue
        metrics[name] = value
    return metrics


class Reader:
    """Takes readings: environment sensor, Wi-Fi, SoC. Remembers the last sensor problem to log changes once."""

    def __init__(self, settings, run=_run, bus=None, clock=time.time):
        self.settings, self.run, self.bus, self.clock = settings, run, bus, clock
        self.last_scan = None
        self.last_problem = None

    def take(self, scan=None):
        raw = {}
        try:
            raw.update(read_environment(self.settings, self.bus))
            problem = None
        except SensorError as exc:
            problem = str(exc)
        if problem != self.last_problem:
            if problem:
                LOG.warning("environment sensor: %s", problem)
            elif self.last_problem:
                LOG.info("environment sensor: reading again")
            self.last_problem = problem
        now = self.clock()
        if scan is None:
            scan = self.last_scan is None or now - self.last_scan >= self.settings["scan_every_s"]
        link, networks, wifi_metrics = wifi_state(self.settings, scan=scan, run=self.run)
        if scan:
            self.last_scan = now
        raw.update(wifi_metrics)
        raw.update(soc_state(self.settings, run=self.run))
        reading = {"time": round(now, 3), "place": self.settings.get("place"),
                   "metrics": finish_metrics(raw, self.settings.get("offsets") or {}), "wifi": link}
        if networks is not None:
            reading["networks"] = networks
        return reading


# =========================================================================== the on-disk buffer


class Buffer:
    """Readings waiting to be sent, in SQLite (one file, 0600). ``seq`` is the AUTOINCREMENT key: it never goes
    back, also across restarts and after rows are deleted. Bounded: ``add`` drops the oldest beyond ``limit``."""

    def __init__(self, path, limit, rejected_limit=5000):
        self.path, self.limit, self.rejected_limit = path, limit, rejected_limit
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # created private before SQLite opens it
        os.close(fd)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a reading is on disk when add() returns (power cut safe)
        self.db.execute("CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
                        " error TEXT NOT NULL, batch TEXT NOT NULL)")
        self.dropped = 0

    def add(self, reading):
        """Store ``reading`` (without seq); return it with its new seq."""
        body = json.dumps({k: v for k, v in reading.items() if k != "seq"}, separators=(",", ":"))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("INSERT INTO readings (body) VALUES (?)", (body,)).lastrowid
            count = self.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            excess = count - self.limit
            if excess > 0:
                self.db.execute("DELETE FROM readings WHERE seq IN (SELECT seq FROM readings ORDER BY seq LIMIT ?)",
                                (excess,))
        if excess > 0:
            self.dropped += excess
            LOG.warning("buffer full (%d readings): dropped the %d oldest (%d dropped since start)", self.limit,
                        excess, self.dropped)
        return {"seq": seq, **reading}

    def oldest(self, n):
        rows = self.db.execute("SELECT seq, body FROM readings ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [{"seq": seq, **json.loads(body)} for seq, body in rows]

    def remove_upto(self, seq):
        with self.db:
            self.db.execute("DELETE FROM readings WHERE seq <= ?", (seq,))

    def reject(self, batch, error):
        """Move ``batch`` (all of it is in the buffer) to the bounded ``rejected`` table."""
        last = batch[-1]["seq"]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO rejected (at, error, batch) VALUES (?, ?, ?)",
                            (time.time(), error, json.dumps(batch, separators=(",", ":"))))
            self.db.execute("DELETE FROM readings WHERE seq <= ?", (last,))
            self.db.execute("DELETE FROM rejected WHERE id NOT IN (SELECT id FROM rejected ORDER BY id DESC LIMIT ?)",
                            (self.rejected_limit,))

    def pending(self):
        return self.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0]

    def rejected(self):
        return [{"at": at, "error": error, "batch": json.loads(batch)}
                for at, error, batch in self.db.execute("SELECT at, error, batch FROM rejected ORDER BY id")]

    def close(self):
        self.db.close()


# =========================================================================== sending


class Unreachable(Exception):
    """Try again later (no connection, 5xx, or a status that is not the batch's fault)."""


class Refused(Exception):
    """The registry refused the batch (4xx): it goes to the rejected table."""


class Sender:
    """POST batches to the registry over HTTPS pinned to the cluster CA file (no system CAs, no proxies), HTTP
    Basic with the node's credential. The same approach as agent.py's ``_Https`` (this file is shipped alone)."""

    def __init__(self, agent_config, timeout=15.0):
        parts = urllib.parse.urlsplit(agent_config["registry_url"])
        self.host, self.port = parts.hostname, parts.port or 443
        self.path = parts.path.rstrip("/") + "/api/v1/readings"
        self.ca_file = agent_config["ca_cert"]
        self.hostname = agent_config["hostname"]
        self.credential_file = agent_config["credential_file"]
        self.timeout = timeout
        self.context = None

    def credential(self):
        text = _read_text(self.credential_file)
        return text.strip() if text and text.strip() else None

    def post(self, batch):
        """Send ``batch``; return the registry's answer (dict). Raises Unreachable or Refused."""
        credential = self.credential()
        if not credential:
            raise Unreachable(f"no node credential in {self.credential_file} yet (the node has not enrolled)")
        if self.context is None:
            try:
                self.context = ssl.create_default_context(cafile=self.ca_file)  # that file only
            except (OSError, ValueError) as exc:
                raise Unreachable(f"{self.ca_file}: cannot load the cluster CA ({exc})") from None
        token = base64.b64encode(f"{self.hostname}:{credential}".encode()).decode()
        body = json.dumps({"readings": batch}, separators=(",", ":")).encode()
        headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
                   "Accept": "application/json", "User-Agent": f"pibake-sensor-agent/{AGENT_VERSION}"}
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            resp = conn.getresponse()
            content = resp.read()
        except ssl.SSLCertVerificationError as exc:
            raise Unreachable(f"TLS check of the registry failed (not the cluster CA's certificate: "
                              f"{exc.verify_message}); nothing was sent") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach the registry at {self.host}:{self.port} ({exc})") from None
        finally:
            conn.close()
        try:
            data = json.loads(content or b"{}")
        except ValueError:
            data = {}
        message = data.get("error") if isinstance(data, dict) else None
        message = message or content[:200].decode("utf-8", "replace").strip() or resp.reason
        if resp.status == 200:
            return data if isinstance(data, dict) else {}
        if resp.status >= 500 or resp.status in RETRY_STATUSES:
            raise Unreachable(f"the registry answered HTTP {resp.status} ({message})")
        raise Refused(f"HTTP {resp.status}: {message}")


class Shipper:
    """Moves readings from the buffer to the registry, oldest first, with backoff while it cannot."""

    def __init__(self, buffer, sender, settings, clock=time.monotonic, rand=random.random):
        self.buffer, self.sender, self.settings = buffer, sender, settings
        self.clock, self.rand = clock, rand
        self.failures = 0
        self.next_try = 0.0
        self.last_problem = None

    def flush(self, max_batches=50):
        """Send what is pending (up to ``max_batches`` batches) unless backing off. Returns readings accepted."""
        if self.sender is None or self.clock() < self.next_try:
            return 0
        sent = 0
        for _ in range(max_batches):
            batch = self.buffer.oldest(self.settings["batch"])
            if not batch:
                break
            try:
                answer = self.sender.post(batch)
            except Unreachable as exc:
                self.failures += 1
                delay = min(self.settings["backoff_max_s"], self.settings["backoff_base_s"] * 2 ** (self.failures - 1))
                delay = delay * (0.5 + self.rand() / 2)  # jitter: many nodes do not come back in step
                self.next_try = self.clock() + delay
                if str(exc) != self.last_problem or self.failures % 10 == 1:
                    LOG.warning("%s; %d reading(s) kept, next try in %.0f s", exc, self.buffer.pending(), delay)
                self.last_problem = str(exc)
                break
            except Refused as exc:
                LOG.error("the registry refused readings %d..%d (%s); moved them to the rejected table in %s",
                          batch[0]["seq"], batch[-1]["seq"], exc, self.buffer.path)
                self.buffer.reject(batch, str(exc))
                continue
            self.buffer.remove_upto(batch[-1]["seq"])
            sent += len(batch)
            if self.failures:
                LOG.info("the registry answers again; sending the buffered readings")
            self.failures, self.last_problem = 0, None
            LOG.debug("sent %d reading(s) up to seq %d: %s", len(batch), batch[-1]["seq"], answer)
        return sent


# =========================================================================== MQTT (optional)


def make_publisher(settings, hostname):
    """sensor_mqtt.MqttPublisher when settings["mqtt"] is set and the module is there; else None (logged)."""
    if not settings.get("mqtt"):
        return None
    try:
        from sensor_mqtt import MqttPublisher  # noqa: PLC0415 - installed next to this file when MQTT is on
    except ImportError as exc:
        LOG.warning("MQTT is configured but sensor_mqtt cannot be loaded (%s); sending over HTTPS only", exc)
        return None
    try:
        return MqttPublisher(hostname, settings["mqtt"])
    except Exception as exc:  # noqa: BLE001 - MQTT must never stop the agent
        LOG.warning("MQTT publisher could not start (%s); sending over HTTPS only", exc)
        return None


def publish(publisher, reading):
    if publisher is None:
        return
    try:
        publisher.publish(reading)
    except Exception as exc:  # noqa: BLE001 - a broker problem never blocks the HTTPS path
        LOG.warning("MQTT publish of reading %s failed: %s", reading.get("seq"), exc)


# =========================================================================== main


class Agent:
    def __init__(self, settings, agent_config, *, reader=None, buffer=None, sender=None):
        self.settings = settings
        hostname = (agent_config or {}).get("hostname") or os.uname().nodename
        self.reader = reader or Reader(settings)
        self.buffer = buffer or Buffer(settings["buffer"], settings["buffer_max"], settings["rejected_max"])
        if sender is None and agent_config:
            sender = Sender(agent_config, settings["request_timeout_s"])
        if sender is None:
            LOG.warning("no agent config: readings are buffered but not sent")
        self.shipper = Shipper(self.buffer, sender, settings)
        self.publisher = make_publisher(settings, hostname)
        self.stopping = False
        self.clock_warned = False

    def step(self):
        if self.reader.clock() < EARLIEST_TIME:
            if not self.clock_warned:
                LOG.warning("the clock is not set yet (before 2000-01-01): no readings until time sync")
                self.clock_warned = True
            self.shipper.flush()
            return None
        reading = self.buffer.add(self.reader.take())  # on disk before anything is sent
        publish(self.publisher, reading)
        self.shipper.flush()
        return reading

    def run(self):
        interval = self.settings["interval_s"]
        LOG.info("sensor agent started: every %s s, %d reading(s) buffered", interval, self.buffer.pending())
        next_at = time.monotonic()
        while not self.stopping:
            try:
                self.step()
            except sqlite3.Error as exc:
                LOG.error("buffer %s: %s", self.buffer.path, exc)
            next_at += interval
            while not self.stopping and time.monotonic() < next_at:
                time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
                if self.shipper.buffer.pending() and time.monotonic() >= self.shipper.next_try:
                    self.shipper.flush()
            if time.monotonic() - next_at > interval:  # suspended (a battery node): do not catch up in a burst
                next_at = time.monotonic()
        self.close()

    def close(self):
        if self.publisher is not None:
            try:
                self.publisher.close()
            except Exception:  # noqa: BLE001
                pass
        self.buffer.close()


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="sensor_agent.py",
        description="pibake sensor agent: reads the BME280/BMP280/BME680 on I2C, the Wi-Fi link and nearby networks, "
                    "the SoC temperature and throttling; buffers the readings on disk and sends them to the registry.")
    p.add_argument("--config", default="/etc/pibake/sensor.json", help="sensor settings (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="take one reading (buffer it and try to send), then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="take one reading and print it; nothing is buffered or sent")
    p.add_argument("--json", action="store_true", help="print the reading as JSON on stdout")
    p.add_argument("--status", action="store_true",
                   help="print the buffer's state (pending readings, rejected batches) and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="sensor-agent: %(levelname)s: %(message)s")
    try:
        settings = load_settings(args.config)
        agent_config = load_agent_config(settings["agent_config"])
    except ConfigError as exc:
        print(f"sensor-agent: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        reading = Reader(settings).take(scan=True)
        print(json.dumps(reading, indent=None if args.json else 2))
        return 0
    try:
        if args.status:
            buffer = Buffer(settings["buffer"], settings["buffer_max"], settings["rejected_max"])
            rejected = buffer.rejected()
            status = {"pending": buffer.pending(), "rejected_batches": len(rejected),
                      "last_rejection": rejected[-1]["error"] if rejected else None}
            buffer.close()
            print(json.dumps(status) if args.json else "\n".join(f"{k}: {v}" for k, v in status.items()))
            return 0
        agent = Agent(settings, agent_config)
    except (OSError, sqlite3.Error) as exc:
        print(f"sensor-agent: error: buffer {settings['buffer']}: {exc}", file=sys.stderr)
        return 1
    if args.once:
        reading = agent.step()
        if args.json and reading is not None:
            print(json.dumps(reading))
        agent.close()
        return 0

    def stop(_signum, _frame):
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
