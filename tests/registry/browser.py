"""The registry page in a real browser, for test_web and test_web_switches: the app served on loopback by
werkzeug in a thread, and Debian's headless Chromium driven by Playwright (JavaScript off, as the page needs
none)."""

import contextlib
import os
import threading

import pytest
from werkzeug.serving import make_server

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="Debian chromium not installed (apt-get install chromium)")


@contextlib.contextmanager
def served(app):
    """The base URL of ``app`` served on 127.0.0.1 (a free port) until the block ends."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@contextlib.contextmanager
def chromium_page(sync_api, *, width=1400, height=900):
    """A page of a fresh headless Chromium without background networking."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        context = browser.new_context(java_script_enabled=False, viewport={"width": width, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()
