"""The Shelly fake's SHA-256 digest check, against two clients nobody here wrote: curl --digest and requests'
HTTPDigestAuth. Both must log in with the right password and both must be refused with a wrong one."""

import json
import subprocess

import pytest
import requests
from requests.auth import HTTPDigestAuth

from pibake.run import which
from tests.conftest import needs_program


@needs_program("curl")
@pytest.mark.parametrize("password, ok", [("shelly-pass-1", True), ("wrong", False)])
def test_curl_digest_sha256(shelly, password, ok):
    out = subprocess.run([which("curl"), "-s", "--digest", "-u", f"admin:{password}", "-o", "-", "-w", "\n%{http_code}",
                          f"http://{shelly.address}/rpc/Shelly.GetDeviceInfo"], capture_output=True, text=True,
                         timeout=20, check=True)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == ("200" if ok else "401")
    if ok:
        assert json.loads(body)["id"] == shelly.device_id


@pytest.mark.parametrize("password, ok", [("shelly-pass-1", True), ("wrong", False)])
def test_requests_digest_sha256(shelly, password, ok):
    reply = requests.get(f"http://{shelly.address}/rpc/Switch.GetStatus", params={"id": 0},
                         auth=HTTPDigestAuth("admin", password), timeout=10)
    assert reply.status_code == (200 if ok else 401)
    challenge = reply.history[0].headers["WWW-Authenticate"] if reply.history else reply.headers["WWW-Authenticate"]
    assert "algorithm=SHA-256" in challenge and f'realm="{shelly.device_id}"' in challenge


def test_no_credentials_is_refused(shelly):
    assert requests.get(f"http://{shelly.address}/rpc/Switch.GetStatus", timeout=10).status_code == 401
