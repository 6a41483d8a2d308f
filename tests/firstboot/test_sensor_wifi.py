"""The sensor agent's Wi-Fi side: the REAL nmcli (NetworkManager's client) against python-dbusmock's
NetworkManager template on a private D-Bus daemon started here (no Wi-Fi radio exists on this machine), and the
iw / /proc/net/wireless parsers on fixtures in those tools' output format (tests/fixtures/wifi/README.md)."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import needs_program
from tests.firstboot.sensorkit import ROOT, load_agent

sa = load_agent()
WIFI = ROOT / "tests" / "fixtures" / "wifi"
NM = "org.freedesktop.NetworkManager"
MOCK = "org.freedesktop.DBus.Mock"
SYSTEM_PYTHON = "/usr/bin/python3"  # dbusmock needs dbus-python (Debian python3-dbus), not in the venv


def gvariant_str(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class MockNetworkManager:
    """dbus-daemon + ``python3 -m dbusmock --template networkmanager``; nmcli finds it through
    DBUS_SYSTEM_BUS_ADDRESS."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs = []

    def start(self):
        daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                  stdout=subprocess.PIPE, text=True)
        self.procs.append(daemon)
        self.address = daemon.stdout.readline().strip()
        self.env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address, "DBUS_SESSION_BUS_ADDRESS": self.address}
        log = open(self.tmp / "dbusmock.log", "w")  # noqa: SIM115 - closed with the process
        mock = subprocess.Popen([SYSTEM_PYTHON, "-m", "dbusmock", "--system", "--template", "networkmanager"],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(mock)
        deadline = time.monotonic() + 20
        while subprocess.run(["gdbus", "introspect", "--system", "-d", NM, "-o", "/org/freedesktop/NetworkManager"],
                             env=self.env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline or mock.poll() is not None:
                raise RuntimeError("dbusmock NetworkManager did not start: " + (self.tmp / "dbusmock.log").read_text())
            time.sleep(0.1)
        return self

    def call(self, path, method, *args):
        out = subprocess.run(["gdbus", "call", "--system", "-d", NM, "-o", path, "-m", method, *args],
                             env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        return out.removeprefix("('").removesuffix("',)")

    def add_wifi_device(self, iface):
        dev = self.call("/org/freedesktop/NetworkManager", f"{MOCK}.AddWiFiDevice", f"mock_{iface}", iface, "100")
        # NM's LastScan (CLOCK_BOOTTIME ms) says "just scanned": `--rescan auto` then lists without waiting for a
        # scan (the mock never scans, so nmcli would wait out its 15 s timeout)
        now_ms = int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)
        self.call(dev, f"{MOCK}.AddProperty", f"{NM}.Device.Wireless", "LastScan", f"<int64 {now_ms}>")
        return dev

    def add_ap(self, dev, name, ssid, bssid, freq, rate_kbit, strength, security=0x108):
        return self.call("/org/freedesktop/NetworkManager", f"{MOCK}.AddAccessPoint", dev, name,
                         gvariant_str(ssid), bssid, "2", str(freq), str(rate_kbit), str(strength), str(security))

    def set_active(self, dev, ap):
        self.call(dev, f"{MOCK}.AddProperty", f"{NM}.Device.Wireless", "ActiveAccessPoint", f"<objectpath '{ap}'>")

    def stop(self):
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def nm(tmp_path, monkeypatch):
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run([SYSTEM_PYTHON, "-c", "import dbusmock"],
                                                           capture_output=True).returncode != 0:
        pytest.skip("not installed: python3-dbusmock (Debian)")
    mock = MockNetworkManager(tmp_path).start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", mock.address)
    yield mock
    mock.stop()


def run_with_iw(iw_text):
    """The agent's command runner, with ``iw`` answered from a fixture (nl80211 needs a radio); nmcli is real."""
    def run(argv, timeout=20):
        if argv[0] == "iw":
            return iw_text
        return sa._run(argv, timeout)
    return run


def settings_for(tmp_path, proc_file=None):
    return {**sa.DEFAULTS, "proc_net_wireless": str(proc_file or tmp_path / "none")}


@needs_program("nmcli", "dbus-daemon", "gdbus")
def test_real_nmcli_scan_with_awkward_ssids_hidden_and_several_aps(nm, tmp_path):
    dev = nm.add_wifi_device("wlan0")
    home = nm.add_ap(dev, "ap1", "home:net\\2", "3C:A6:2F:12:34:56", 2437, 72200, 62)
    nm.add_ap(dev, "ap2", "", "3C:A6:2F:12:34:57", 5180, 300000, 40)  # hidden
    nm.add_ap(dev, "ap3", "café open", "10:20:30:40:50:60", 2412, 54000, 30, security=0)
    nm.add_ap(dev, "ap4", "a\\:b:", "10:20:30:40:50:61", 5745, 866000, 90)
    nm.set_active(dev, home)

    link, networks, metrics = sa.wifi_state(settings_for(tmp_path), scan=True, run=run_with_iw(None))
    by_bssid = {n["bssid"]: n for n in networks}
    assert len(networks) == 4
    assert by_bssid["3c:a6:2f:12:34:56"] == {"ssid": "home:net\\2", "bssid": "3c:a6:2f:12:34:56", "signal_dbm": -58,
                                             "signal_pct": 62, "channel": 6, "frequency_mhz": 2437,
                                             "security": "WPA1 WPA2"}
    assert by_bssid["3c:a6:2f:12:34:57"]["ssid"] == "" and by_bssid["3c:a6:2f:12:34:57"]["channel"] == 36
    assert by_bssid["10:20:30:40:50:60"]["ssid"] == "café open" and by_bssid["10:20:30:40:50:60"]["security"] is None
    assert by_bssid["10:20:30:40:50:61"]["ssid"] == "a\\:b:" and by_bssid["10:20:30:40:50:61"]["channel"] == 149
    # the link from nmcli alone (no iw, no /proc/net/wireless): dBm estimated from NM's percent
    assert link == {"ssid": "home:net\\2", "bssid": "3c:a6:2f:12:34:56", "channel": 6, "frequency_mhz": 2437,
                    "bitrate_mbps": 72, "signal_dbm": -58}
    assert metrics == {"wifi_signal_dbm": -58, "wifi_quality_pct": 62, "wifi_bitrate_mbps": 72}


@needs_program("nmcli", "dbus-daemon", "gdbus")
def test_iw_gives_the_measured_dbm_and_bitrate(nm, tmp_path):
    dev = nm.add_wifi_device("wlan0")
    ap = nm.add_ap(dev, "ap1", "home:net\\2", "3C:A6:2F:12:34:56", 2437, 54000, 70)
    nm.set_active(dev, ap)
    link, networks, metrics = sa.wifi_state(settings_for(tmp_path), scan=False,
                                            run=run_with_iw((WIFI / "iw-link-connected.txt").read_text()))
    assert networks is None  # no scan asked
    assert metrics == {"wifi_signal_dbm": -58, "wifi_quality_pct": 70, "wifi_bitrate_mbps": 72.2}
    assert link["ssid"] == "home:net\\2" and link["signal_dbm"] == -58 and link["bitrate_mbps"] == 72.2


@needs_program("nmcli", "dbus-daemon", "gdbus")
def test_not_associated_means_no_link_and_no_wifi_metrics(nm, tmp_path):
    dev = nm.add_wifi_device("wlan0")
    nm.add_ap(dev, "ap1", "neighbour", "AA:BB:CC:DD:EE:01", 2462, 54000, 35)
    link, networks, metrics = sa.wifi_state(settings_for(tmp_path), scan=True,
                                            run=run_with_iw((WIFI / "iw-link-not-connected.txt").read_text()))
    assert link is None and metrics == {}
    assert [n["ssid"] for n in networks] == ["neighbour"]


def test_proc_net_wireless_fallback_without_networkmanager(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nmcli, no iw on this node
    link, networks, metrics = sa.wifi_state(settings_for(tmp_path, WIFI / "proc-net-wireless.txt"), scan=True)
    assert (link, networks) == (None, [])
    assert metrics == {"wifi_signal_dbm": -58, "wifi_quality_pct": 74}


def test_parsers_on_fixtures():
    assert sa.parse_proc_net_wireless((WIFI / "proc-net-wireless-unsigned.txt").read_text()) == {
        "wlan0": {"quality_pct": 57, "signal_dbm": -58}}
    assert sa.parse_iw_link((WIFI / "iw-link-not-connected.txt").read_text()) is None
    assert sa.split_terse(r"*:a\:b\\c::x") == ["*", "a:b\\c", "", "x"]
    assert [sa.freq_to_channel(f) for f in (2412, 2484, 5180, 5955, 999)] == [1, 14, 36, 1, None]
    assert sa.parse_throttled("throttled=0x50005\n") == 0x50005 and sa.parse_throttled("") is None


def test_nmcli_missing_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("nmcli") is None
    assert sa.wifi_state(settings_for(tmp_path), scan=True) == (None, [], {})
