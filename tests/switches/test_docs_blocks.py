"""The switch blocks of the manual, run as written against the Kasa simulator and the Shelly/Tasmota fakes."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.switches.conftest import write_cluster

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXITS_RE = re.compile(r"\s+#\s*exits (\d+)\s*$")


def block(page, name):
    return re.search(rf"```sh\n# doc-test: {name}\n(.*?)```", (DOCS / page).read_text(), re.S).group(1)


def run_block(text, cwd):
    """Run each pibake line in ``cwd``; `# exits N` is the wanted code."""
    outputs = []
    for line in text.splitlines():
        wanted = 0
        match = EXITS_RE.search(line)
        if match:
            wanted, line = int(match.group(1)), line[:match.start()]
        words = shlex.split(line)
        assert words[0] == "pibake"
        out = subprocess.run([sys.executable, "-m", "pibake", *words[1:]], cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == wanted, (line, out.stderr)
        assert "Traceback" not in out.stderr
        outputs.append((line, out))
    return outputs


def test_commands_page_switch_block(tmp_path, kasa_plug, shelly, tasmota):
    """docs/commands.md, block cmd-switch."""
    tasmota.password = "tasmota-pass-1"
    write_cluster(tmp_path / "cluster", [
        {"name": "rack-red01", "driver": "shelly", "address": shelly.address, "node": "red01"},
        {"name": "fan", "driver": "tasmota", "address": tasmota.address, "thing": "fan"},
        {"name": "lamp", "driver": "kasa", "address": kasa_plug.address, "thing": "lamp"},
    ])
    (tmp_path / "fan-password").write_text("tasmota-pass-1\n")
    (tmp_path / "cluster" / "secrets").mkdir(mode=0o700)
    from pibake import switches
    switches.set_credentials(tmp_path / "cluster", "rack-red01", password="shelly-pass-1")
    outputs = dict(run_block(block("commands.md", "cmd-switch"), tmp_path))
    assert tasmota.power is False and shelly.output is False  # on, toggle -> off; off
    assert "fan: on" in outputs["pibake switch on fan"].stderr
    assert '"model": "Nous A1T"' in outputs["pibake switch info fan --json"].stdout
