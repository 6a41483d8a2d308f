"""The sensors page in headless Chromium against the real server: `pibake registry serve` (gunicorn, TLS with
the cluster's certificate, which Chromium pins), readings sent by two sensor nodes through POST /api/v1/readings
over TLS (30 days of history for one: the 30-day chart comes from the hourly aggregates). A screenshot of the
page is kept as a test artefact (in $PIBAKE_ARTEFACTS, else the test's tmp dir; the path is printed).
The login's hardening: Secure session cookie, failed logins slowed down and limited per client."""

import os
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from pibake.registry.app import create_app
from pibake.registry.logins import LoginThrottle, failure_delay
from tests.registry.browser import chromium_page, needs_chromium
from tests.registry.conftest import enrolment
from tests.registry.test_server import Server
from tests.fixtures_plugin import update_cluster_yaml

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")

NETWORKS = [{"ssid": "home", "bssid": "aa:bb:cc:00:00:01", "signal_dbm": -47, "signal_pct": 96, "channel": 6,
             "frequency_mhz": 2437, "security": "WPA2"},
            {"ssid": "neighbour:5G\\", "bssid": "aa:bb:cc:00:00:02", "signal_dbm": -78, "signal_pct": 44,
             "channel": 36, "frequency_mhz": 5180, "security": "WPA2 WPA3"},
            {"ssid": "", "bssid": "aa:bb:cc:00:00:03", "signal_dbm": -88, "signal_pct": 24, "channel": 11,
             "frequency_mhz": 2462, "security": None}]


def _history(now, days, every):
    """Readings of a living room over ``days``: a daily temperature swing, a scan every hour."""
    import math

    out, seq, t = [], 1, now - days * 86400
    while t < now - 1:
        phase = math.sin((t % 86400) / 86400 * 2 * math.pi)
        out.append({"seq": seq, "time": t, "place": None,
                    "metrics": {"temperature_c": round(21 + 4 * phase, 2), "humidity_pct": round(45 - 5 * phase, 1),
                                "pressure_hpa": 1008.2, "wifi_signal_dbm": -50 - int(8 * (1 + phase)),
                                "wifi_quality_pct": 90, "soc_temperature_c": 44.5, "throttled": 0},
                    "wifi": {"ssid": "home", "bssid": "aa:bb:cc:00:00:01", "channel": 6, "frequency_mhz": 2437,
                             "bitrate_mbps": 72.2, "signal_dbm": -50},
                    "networks": NETWORKS if seq % 6 == 0 else []})
        seq += 1
        t += every
    return out


@pytest.fixture
def live(cluster_dir, tmp_path, creds):
    update_cluster_yaml(cluster_dir, {"sensors": {"thresholds": {"*": {"temperature_c": {"min": 18, "max": 24}}}}})
    server = Server(cluster_dir, tmp_path).start()
    try:
        now = time.time()
        # red-attic enrolled but has sent nothing (its sensor is broken, or it is out of range): offline
        for name, index, readings in (("red-zero", 9, _history(now, 30, 600)), ("red-attic", 10, [])):
            r = requests.post(f"{server.url}/enrol", json=enrolment(name, index, role="sensor"), headers=creds.join,
                              verify=server.ca, timeout=10)
            assert r.status_code == 201, r.text
            auth = (name, r.json()["credential"])
            for i in range(0, len(readings), 500):
                r = requests.post(f"{server.url}/readings", json={"readings": readings[i:i + 500]}, auth=auth,
                                  verify=server.ca, timeout=60)
                assert r.status_code == 200, r.text
        requests.post(f"{server.url}/sensors/red-attic/place", json={"place": "attic"}, auth=creds.admin,
                      verify=server.ca, timeout=10).raise_for_status()
        yield server
    finally:
        server.stop()


def artefacts_dir(tmp_path):
    path = Path(os.environ.get("PIBAKE_ARTEFACTS") or tmp_path / "artefacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@needs_chromium
def test_sensors_page_over_tls_with_charts_networks_and_offline_badge(live, creds, tmp_path):
    base = live.url.removesuffix("/api/v1")
    with chromium_page(sync_api, height=1000, trust_cert=live.cluster_dir / "secrets" / "registry.crt") as page:
        page.goto(base + "/sensors")
        assert page.url.startswith(base + "/login")
        page.fill("#password", "wrong")
        page.click("button[type=submit]")
        assert "Wrong password" in page.inner_text("#login-error")
        page.fill("#password", creds.admin[1])
        page.click("button[type=submit]")
        page.wait_for_selector("table#sensors")

        (cookie,) = [c for c in page.context.cookies() if c["name"] == "pibake_session"]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        zero, attic = page.locator("#sensor-red-zero"), page.locator("#sensor-red-attic")
        assert zero.locator(".state").inner_text().strip() == "online"
        assert attic.locator(".state .badge.offline").inner_text() == "offline"
        assert attic.locator(".place").inner_text() == "attic"
        assert zero.locator(".value.pressure_hpa").inner_text() == "1008.2 hPa"
        assert zero.locator(".value.temperature_c").inner_text().endswith(" °C")

        zero.locator(".node a").click()
        page.wait_for_selector("#chart-temperature_c svg")
        for metric in ("temperature_c", "humidity_pct", "pressure_hpa", "wifi_signal_dbm", "soc_temperature_c"):
            assert page.locator(f"#chart-{metric} svg polyline.mean").count() == 1, metric
        assert page.locator("#chart-temperature_c rect.threshold-band").count() == 1
        assert page.locator("#chart-humidity_pct rect.threshold-band").count() == 0
        assert "raw" in page.inner_text("#chart-temperature_c figcaption")
        assert page.locator("#latest-temperature_c .threshold").inner_text().startswith("18..24 °C")
        ssids = page.locator("table#networks td.ssid").all_inner_texts()
        assert ssids == ["home", "neighbour:5G\\", "(hidden)"]
        assert page.locator("table#survey tbody tr").count() == 3

        page.locator("a.range", has_text="30d").click()
        page.wait_for_selector("strong.range.current")
        assert page.inner_text("strong.range.current") == "30d"
        assert "hourly" in page.inner_text("#chart-temperature_c figcaption")
        assert page.locator("#chart-temperature_c polyline.mean").get_attribute("points").count(",") > 600
        shot = artefacts_dir(tmp_path) / "sensors-page.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot of the sensors page: {shot}")
        assert shot.stat().st_size > 10000

        page.fill("#place-input", "living room")
        page.click("#place-form button")
        page.wait_for_selector(".flash.ok")
        assert "place living room from now on" in page.inner_text(".flash.ok")
        page.select_option("#threshold-metric", "humidity_pct")
        page.fill("#threshold-max", "40")
        page.click("#threshold-form button")
        page.wait_for_selector(".flash.ok")
        assert "humidity_pct: ..40 (api)" in page.inner_text(".flash.ok")
        assert page.locator("#chart-humidity_pct rect.threshold-band").count() == 1

        page.goto(base + "/sensors/red-attic")
        assert page.inner_text("#offline-badge") == "offline"


def test_a_failed_login_on_the_real_server_is_recorded_for_every_worker(live, creds):
    base = live.url.removesuffix("/api/v1")
    r = requests.post(base + "/login", data={"password": "guess"}, verify=live.ca, timeout=30)
    assert r.status_code == 401 and "Wrong password" in r.text
    conn = sqlite3.connect(live.cluster_dir / "web-logins.db")
    try:
        assert conn.execute("SELECT client FROM failures").fetchall() == [("127.0.0.1",)]
    finally:
        conn.close()


def test_failed_logins_are_slowed_down_then_refused_per_client(cluster_dir, app_options, creds):
    """Each failure waits longer (0.25 s doubling, recorded instead of slept); after 5 within 15 min that client
    gets 429 even with the right password; another client still logs in; a success clears the count."""
    delays = []
    app = create_app(cluster_dir, test_config={"TESTING": True, "PIBAKE_LOGIN_SLEEP": delays.append}, **app_options)
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "10.1.1.66"
    for _ in range(5):
        assert guesser.post("/login", data={"password": "guess"}).status_code == 401
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0]
    r = guesser.post("/login", data={"password": creds.admin[1]})
    assert r.status_code == 429 and "Too many failed logins" in r.text and int(r.headers["Retry-After"]) > 800
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.1.1.7"
    assert other.post("/login", data={"password": "typo"}).status_code == 401
    r = other.post("/login", data={"password": creds.admin[1]})
    assert r.status_code == 302
    assert "Secure" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    assert delays[-1] == 0.25  # the other client's first failure
    throttle = LoginThrottle(cluster_dir)
    assert throttle.locked_for("10.1.1.7") == 0 and throttle.locked_for("10.1.1.66") > 0
    assert throttle.locked_for("10.1.1.66", now=time.time() + 901) == 0  # the window passes
    assert [failure_delay(n) for n in (1, 2, 6, 20)] == [0.25, 0.5, 4.0, 4.0]
