"""The switches on the registry page, in headless Chromium without JavaScript: live state from a real plug
(the npm Kasa simulator) and the Shelly fake, On without a question, Off only after a confirmation page,
Recover for a node's plug explained before anything happens, and no action without the CSRF token."""


import pytest
import requests

from pibake import switches
from pibake.registry.app import create_app
from tests.registry.browser import chromium_page, needs_chromium, served
from tests.switches.conftest import kasa_plug, needs_kasa_simulator, shelly  # noqa: F401  (fixtures)
from tests.fixtures_plugin import update_cluster_yaml

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")


@pytest.fixture
def live(cluster_dir, app_options, kasa_plug, shelly):  # noqa: F811
    update_cluster_yaml(cluster_dir, {"switches": [
        {"name": "lamp", "driver": "kasa", "address": kasa_plug.address, "thing": "lamp", "timeout": 2},
        {"name": "pi1", "driver": "shelly", "address": shelly.address, "node": "red01", "timeout": 2},
    ]})
    switches.set_credentials(cluster_dir, "pi1", password="shelly-pass-1")
    app = create_app(cluster_dir, **app_options)
    with served(app) as url:
        yield url


@pytest.fixture
def page():
    with chromium_page(sync_api, height=900) as browser_page:
        yield browser_page


@needs_kasa_simulator
def test_switch_buttons(live, page, creds, cluster_dir, kasa_plug, shelly):  # noqa: F811
    page.goto(live + "/login")
    page.fill("#password", creds.admin[1])
    page.click("button[type=submit]")
    page.wait_for_selector("table#switches")
    assert page.inner_text("#switch-lamp .powers") == "lamp"
    assert page.inner_text("#switch-pi1 .powers") == "node red01"
    assert page.inner_text("#switch-lamp .state").strip() == "off"

    page.click("#switch-lamp button.switch-on")  # on: no question
    assert "lamp: on now." in page.inner_text(".flash.ok")
    assert page.inner_text("#switch-lamp .state").strip() == "on"
    assert page.inner_text("#switch-lamp .power").endswith(" W")

    page.click("#switch-lamp button.switch-off")  # off: a confirmation page first, nothing switched yet
    assert "Off lamp?" in page.inner_text("h1")
    assert switches.switch_status(cluster_dir, "lamp")["state"]["on"] is True
    page.click("button.confirm")
    assert "lamp: off now." in page.inner_text(".flash.ok")
    assert page.inner_text("#switch-lamp .state").strip() == "off"

    page.click("#switch-pi1 button.switch-cycle")  # a node's plug: Recover, explained, then cancelled
    assert "This recovers node red01" in page.inner_text("#confirm-text")
    page.click("a.cancel")
    assert shelly.output is False and not any("Switch.Set" in r for r in shelly.requests)

    log = page.text_content("#switch-log")
    assert "lamp · on · by web · ok" in log and "lamp · off · by web · ok" in log

    kasa_plug.stop()
    page.goto(live + "/")
    assert "cannot reach the device" in page.get_attribute("#switch-lamp .state small", "title")


@needs_kasa_simulator
def test_no_switching_without_the_csrf_token(live, creds, cluster_dir, kasa_plug):  # noqa: F811
    session = requests.Session()
    session.post(live + "/login", data={"password": creds.admin[1]}, timeout=10)
    r = session.post(live + "/switches/lamp/on", data={}, timeout=10)
    assert r.status_code == 200 and "The form expired" in r.text
    r = session.post(live + "/switches/lamp/on", data={"csrf": "forged"}, timeout=10)
    assert "The form expired" in r.text
    assert switches.switch_status(cluster_dir, "lamp")["state"]["on"] is False
    assert requests.post(live + "/switches/lamp/on", timeout=10, allow_redirects=False).status_code == 302
