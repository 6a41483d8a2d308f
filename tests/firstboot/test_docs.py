"""docs/agent.md stays true: its config example loads, and every config key the agent knows is documented
there and in the agent's own docstring."""

import json
import re
from pathlib import Path

from pibake.firstboot import agent

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


def test_config_example_loads(tmp_path):
    block = re.search(r"```json\n(.*?)```", DOC.read_text(), re.S).group(1)
    path = tmp_path / "agent.json"
    path.write_text(block)
    raw, config = agent.load_config(str(path))
    assert set(raw) == {"registry_url", "join_token", "ca_cert", "hostname", "role", "manager", "manager_ip",
                        "credential_file", "boot_dir"}
    assert config["deadline_s"] == 900 and config["services"] == "auto"
    json.dumps(config)


def test_every_config_key_is_documented():
    text = DOC.read_text()
    for key in list(agent.DEFAULTS) + ["join_token_file"]:
        assert f"`{key}`" in text or f"\"{key}\"" in text, key
        assert key in agent.__doc__, key


def test_default_scrub_paths_are_documented():
    text = DOC.read_text()
    for path in agent.DEFAULT_SCRUB_PATHS:
        assert Path(path).name in text, path
