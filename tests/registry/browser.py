"""The registry page in a real browser, for test_web, test_web_switches and test_web_sensors: the app served on
loopback over TLS with the cluster's registry certificate (werkzeug in a thread; test_web_sensors runs the real
`pibake registry serve` instead), and Debian's headless Chromium driven by Playwright (JavaScript off, as the
page needs none). TLS because the session cookie is ``Secure``."""

import base64
import contextlib
import hashlib
import os
import ssl
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason="Debian chromium not installed (apt-get install chromium)")


def spki_sha256(cert_path):
    """base64 sha256 of a certificate's public key, as Chromium's --ignore-certificate-errors-spki-list wants it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@contextlib.contextmanager
def served(app):
    """The https base URL of ``app`` served on 127.0.0.1 (a free port) with the cluster's registry certificate
    until the block ends; ``requests`` calls in the block trust the cluster CA (REQUESTS_CA_BUNDLE)."""
    secrets = Path(app.extensions["pibake_registry"].cluster_dir) / "secrets"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(secrets / "registry.crt", secrets / "registry.key")
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(secrets / "ca.crt")
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        if saved is None:
            os.environ.pop("REQUESTS_CA_BUNDLE", None)
        else:
            os.environ["REQUESTS_CA_BUNDLE"] = saved
        server.shutdown()
        thread.join(10)


@contextlib.contextmanager
def chromium_page(sync_api, *, width=1400, height=900, trust_cert=None):
    """A page of a fresh headless Chromium without background networking. ``trust_cert``: the server
    certificate Chromium accepts (pinned by its public key); without it any certificate is accepted."""
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    if trust_cert:
        args.append(f"--ignore-certificate-errors-spki-list={spki_sha256(trust_cert)}")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        context = browser.new_context(java_script_enabled=False, viewport={"width": width, "height": height},
                                      ignore_https_errors=not trust_cert)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()
