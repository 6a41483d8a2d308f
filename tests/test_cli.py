import subprocess
import sys

PIBAKE = [sys.executable, "-m", "pibake"]


def run(*args):
    return subprocess.run(PIBAKE + list(args), capture_output=True, text=True, timeout=60)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for name in ("init", "render", "burn", "deploy", "verify", "registry", "lab", "devices", "image"):
        assert f"\n  {name} " in out.stdout, name


def test_usage_error_is_one_line_exit_2():
    out = run("--no-such-option")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
