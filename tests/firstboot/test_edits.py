"""The agent's file edits: pure functions, idempotent, and the token scrub that keeps files valid."""

import json
import os
import pickle
import stat

import pytest
import yaml

from pibake.firstboot import agent
from tests.conftest import needs_root

TOKEN = "K10" + "ab" * 32 + "::abc123." + "s3cr3t" * 5 + "xy"


def test_token_fixture_is_a_real_token_shape():
    assert agent.TOKEN_RE.match(TOKEN)


@pytest.mark.parametrize("before, after", [
    ("", 'SLURMD_OPTIONS="--conf-server red00:6817"\n'),
    ('# Additional options that are passed to the slurmd daemon\n#SLURMD_OPTIONS=""\n',
     '# Additional options that are passed to the slurmd daemon\n#SLURMD_OPTIONS=""\n'
     'SLURMD_OPTIONS="--conf-server red00:6817"\n'),
    ('SLURMD_OPTIONS="-v"\nOTHER=1\nexport SLURMD_OPTIONS=x\n', 'SLURMD_OPTIONS="--conf-server red00:6817"\nOTHER=1\n'),
])
def test_set_shell_var(before, after):
    once = agent.set_shell_var(before, "SLURMD_OPTIONS", "--conf-server red00:6817")
    assert once == after
    assert agent.set_shell_var(once, "SLURMD_OPTIONS", "--conf-server red00:6817") == once


def test_hosts_entry_added_once():
    base = "127.0.0.1 localhost\n127.0.1.1 red01\n"
    once = agent.ensure_hosts_entry(base, "red00", "10.1.1.10")
    assert once == base + "10.1.1.10 red00\n"
    assert agent.ensure_hosts_entry(once, "red00", "10.1.1.10") == once


def test_hosts_entry_already_there_with_aliases():
    text = "10.1.1.10 red00.lan red00 # manager\n"
    assert agent.ensure_hosts_entry(text, "red00", "10.1.1.10") == text


def test_hosts_entry_moves_a_stale_mapping():
    text = "127.0.0.1 localhost\n10.9.9.9 red00\n10.9.9.8 other red00 # old\n"
    assert agent.ensure_hosts_entry(text, "red00", "10.1.1.10") == (
        "127.0.0.1 localhost\n10.9.9.8 other # old\n10.1.1.10 red00\n")


USER_DATA = f"""#cloud-config
hostname: red01
write_files:
  - path: /etc/pibake/agent.json
    permissions: '0600'
    content: |
      {{"registry_url": "https://red00:8443", "join_token": "{TOKEN}", "role": "worker"}}
  - path: /etc/pibake/token
    content: {TOKEN}
  - path: /etc/pibake/token-quoted
    content: '{TOKEN}'
runcmd:
  - [python3, /usr/local/lib/pibake/agent.py, --config, /etc/pibake/agent.json]
"""


def test_scrub_keeps_yaml_valid_and_removes_every_copy():
    new, count = agent.scrub_token(USER_DATA.encode(), TOKEN)
    assert count == 3 and len(new) == len(USER_DATA.encode())
    assert TOKEN.encode() not in new and b"s3cr3t" not in new
    before, after = yaml.safe_load(USER_DATA), yaml.safe_load(new)
    assert after["runcmd"] == before["runcmd"] and after["hostname"] == "red01"
    cfg = json.loads(after["write_files"][0]["content"])
    assert cfg["registry_url"] == "https://red00:8443"
    assert cfg["join_token"].startswith("pibake-join-token-removed") and not agent.TOKEN_RE.match(cfg["join_token"])
    assert after["write_files"][1]["content"] == cfg["join_token"]
    assert agent.scrub_token(new, TOKEN) == (new, 0)


def test_scrub_keeps_a_pickle_loadable():
    """cloud-init caches the datasource (with the raw user-data) in obj.pkl: same-length replacement."""
    blob = pickle.dumps({"userdata_raw": USER_DATA.encode(), "text": USER_DATA})
    new, count = agent.scrub_token(blob, TOKEN)
    assert count == 6  # three in each copy
    back = pickle.loads(new)
    assert TOKEN not in back["text"]
    assert back["text"].encode() == back["userdata_raw"] == agent.scrub_token(USER_DATA.encode(), TOKEN)[0]


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_file_reports_change_only_once(tmp_path):
    path = tmp_path / "sub" / "f"
    assert agent.write_file(str(path), "a\n", 0o600) is True
    assert mode(path) == 0o600
    assert agent.write_file(str(path), "a\n", 0o600) is False
    assert agent.write_file(str(path), "a\n", 0o644) is True and mode(path) == 0o644
    assert agent.write_file(str(path), b"b\n", 0o644) is True and path.read_text() == "b\n"
    assert [p.name for p in path.parent.iterdir()] == ["f"]  # no temp file left


@needs_root("needs root to chown")
def test_write_file_owner(tmp_path):
    path = tmp_path / "munge.key"
    assert agent.write_file(str(path), b"k" * 1024, 0o400, "munge") is True
    import pwd
    assert os.stat(path).st_uid == pwd.getpwnam("munge").pw_uid and mode(path) == 0o400
    assert agent.write_file(str(path), b"k" * 1024, 0o400, "munge") is False


def test_unknown_owner_is_a_clear_error(tmp_path):
    with pytest.raises(agent.AgentError, match="no user 'nosuchuser'"):
        agent.write_file(str(tmp_path / "x"), b"", 0o400, "nosuchuser")
