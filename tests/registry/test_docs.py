"""docs/registry.md: its settings example and its commands are real."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pibake.registry.service import OPTION_KEYS, RegistryService

DOC = (Path(__file__).resolve().parents[2] / "docs" / "registry.md").read_text()


def test_settings_example_is_accepted_by_the_registry(cluster_dir, tmp_path):
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    options = yaml.safe_load(block)["registry"]
    assert set(options) == set(OPTION_KEYS)
    options["slurm_conf"] = str(tmp_path / "slurm.conf")  # not /etc in a test
    reg = RegistryService(cluster_dir, **options)
    assert reg.applier.mode == "auto" and reg.slurm_settings == {"SlurmdTimeout": 120}
    assert "SlurmdTimeout=120" in reg.slurm_conf()


@pytest.mark.parametrize("command", sorted(set(re.findall(r"`pibake registry ([a-z-]+)", DOC))))
def test_documented_commands_exist(command):
    out = subprocess.run([sys.executable, "-m", "pibake", "registry", command, "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_documented_serve_options_exist():
    out = subprocess.run([sys.executable, "-m", "pibake", "registry", "serve", "--help"], capture_output=True,
                         text=True, timeout=60).stdout
    usage = DOC.split("pibake --cluster DIR registry serve", 1)[1].split("```", 1)[0]
    for option in re.findall(r"--[a-z-]+", usage):
        assert option in out, option
