"""README's first command: `scripts/demo` burns four images, boots them in the lab with the real cloud-init,
and `pibake verify` passes on the result. Runs the script itself (its own lab prefix and folder, `--down`)."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_plugin import needs_lab

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, needs_lab("debootstrap")]


@pytest.mark.skipif(not (ROOT / ".venv/bin/pibake").exists(),
                    reason="scripts/demo runs .venv/bin/pibake: run the suite through scripts/test")
def test_readme_demo_ends_with_verify_passing(tmp_path):
    prefix = f"pd{os.getpid() % 10**6}"
    proc = subprocess.run([str(ROOT / "scripts/demo"), "--dir", str(tmp_path / "demo"), "--prefix", prefix,
                           "--down"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "verify: all checks passed" in out, out[-4000:]
    for check in ("registry", "expected-nodes", "reachable", "sinfo-idle", "srun", "munge", "clock-skew",
                  "slurm-conf"):
        assert f"ok   {check}" in out, check
    assert sorted(line for line in proc.stdout.split() if line.startswith("red0")) == ["red01", "red02", "red03"]
    # --down: nothing of this lab is left
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(prefix + "-")]
