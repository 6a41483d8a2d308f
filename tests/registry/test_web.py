"""The registry page in headless Chromium (Debian's chromium driven by Playwright), JavaScript disabled:
log in, see the enrolled nodes, accept a pending node, wrong password shows an error."""

import os

import pytest

from pibake.registry.app import create_app
from tests.registry.browser import chromium_page, needs_chromium, served
from tests.registry.conftest import MEMORY, enrolment

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")

SCREENSHOT = os.environ.get("PIBAKE_SCREENSHOT")  # e.g. /tmp/registry.png to look at the page


@pytest.fixture
def live_registry(cluster_dir, app_options, creds):
    app = create_app(cluster_dir, require_approval=True, **app_options)
    client = app.test_client()
    for i, (name, kind) in enumerate((("red01", "pi4"), ("red02", "pi5"), ("red03", "pi3")), start=1):
        r = client.post("/api/v1/enrol", json=enrolment(name, i, kind=kind), headers=creds.join)
        assert r.status_code == 201
    for name in ("red01", "red02"):
        assert client.post(f"/api/v1/nodes/{name}/accept", auth=creds.admin).status_code == 200
    with served(app) as url:
        yield url


@pytest.fixture
def page():
    with chromium_page(sync_api, height=700) as browser_page:
        yield browser_page


def test_login_see_nodes_accept_pending(live_registry, page, creds):
    page.goto(live_registry + "/")
    assert page.url.startswith(live_registry + "/login")

    page.fill("#password", "wrong password")
    page.click("button[type=submit]")
    assert "Wrong password" in page.inner_text("#login-error")
    assert page.locator("table#nodes").count() == 0

    page.fill("#password", creds.admin[1])
    page.click("button[type=submit]")
    page.wait_for_selector("table#nodes")
    rows = {r.get_attribute("id"): r for r in page.locator("table#nodes tbody tr").all()}
    assert set(rows) == {"node-red01", "node-red02", "node-red03"}
    red01 = rows["node-red01"]
    assert red01.locator(".hostname").inner_text() == "red01"
    assert red01.locator(".ip").inner_text() == "127.0.77.1"
    assert red01.locator(".model").inner_text() == "Raspberry Pi 4 Model B Rev 1.4"
    assert red01.locator(".cpus").inner_text() == "4"
    assert red01.locator(".memory").inner_text() == "3.7 GiB"
    assert red01.locator(".status").inner_text().strip() == "enrolled"
    assert rows["node-red02"].locator(".model").inner_text() == "Raspberry Pi 5 Model B Rev 1.0"
    assert rows["node-red03"].locator(".memory").inner_text() == f"{MEMORY['pi3']} MiB"
    assert rows["node-red03"].locator(".status").inner_text().strip() == "pending"
    assert "1 waiting for approval" in page.inner_text(".summary")
    assert rows["node-red01"].locator("button.accept").count() == 0
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    rows["node-red03"].locator("button.accept").click()
    page.wait_for_selector(".flash.ok")
    assert "Accepted red03" in page.inner_text(".flash.ok")
    assert page.locator("#node-red03 .status").inner_text().strip() == "enrolled"
    assert "waiting for approval" not in page.inner_text(".summary")

    page.locator("#node-red02 button.remove").click()
    page.wait_for_selector(".flash.ok")
    assert "Removed red02" in page.inner_text(".flash.ok")
    assert page.locator("#node-red02").count() == 0 and page.locator("#node-red01").count() == 1

    # the session cookie is HttpOnly and SameSite=Strict
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "pibake_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.click("button.link")  # log out
    assert page.url.startswith(live_registry + "/login")
    page.goto(live_registry + "/")
    assert page.url.startswith(live_registry + "/login")


def test_forms_without_csrf_token_are_refused(live_registry, creds):
    import requests

    session = requests.Session()
    r = session.post(live_registry + "/login", data={"password": creds.admin[1]}, timeout=10)
    assert r.status_code == 200 and "red03" in r.text
    r = session.post(live_registry + "/nodes/red03/accept", data={}, timeout=10)
    assert "The form expired" in r.text
    assert 'class="badge pending"' in r.text
    # not logged in: redirected to the login page, nothing changes
    r = requests.post(live_registry + "/nodes/red01/remove", data={}, timeout=10, allow_redirects=False)
    assert r.status_code == 302 and "/login" in r.headers["Location"]
