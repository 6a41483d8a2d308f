"""Any install of pibake can burn a manager: a non-editable `pip install` of the checkout (no network) burns a
manager image without --wheel, and the wheel it puts on the boot partition installs with pip elsewhere and runs.

Real pip, real venvs on Debian's python3 (pibake's dependencies from Debian packages, as on a manager), the real
burn CLI on a synthetic Pi image and mtools. The wheel made from the installation must hold exactly the files of
the wheel pip builds from the same sources (only RECORD, which lists them, may differ in order) and a RECORD
whose sha256 and size of every file are right.
"""

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from pibake.bake import bootpart, burn
from tests.conftest import needs_program
from tests.fixtures_plugin import make_ssh_key

DEBIAN_PYTHON = "/usr/bin/python3"
ROOT = Path(burn.__file__).resolve().parent.parent
SITE_DEPS = ("click", "jinja2", "yaml", "jsonschema", "requests", "flask", "flask_httpauth", "cryptography",
             "psutil", "ClusterShell", "rich", "setuptools", "wheel", "ensurepip")


def _debian_python_missing():
    if not os.path.exists(DEBIAN_PYTHON):
        return "Debian's /usr/bin/python3 is not installed"
    probe = "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    if subprocess.run([DEBIAN_PYTHON, "-c", probe, *SITE_DEPS], capture_output=True).returncode != 0:
        return "Debian's python3 lacks pibake's dependencies (scripts/setup installs them: python3-flask, ...)"
    return None


pytestmark = [needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "ssh-keygen"),
              pytest.mark.skipif(bool(_debian_python_missing()), reason=_debian_python_missing() or "ok")]


def run(argv, **kwargs):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def venv(path):
    """A venv on Debian's python3 that sees Debian's packages (pibake's dependencies), as pibake-install makes."""
    run([DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", path])
    return path / "bin"


def copy_checkout(dest):
    """The checkout's sources (what a user's clone has), so pip's build leaves this checkout alone."""
    dest.mkdir()
    for name in burn._SOURCE_FILES:  # pylint: disable=protected-access
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for part in burn._SOURCE_PARTS:  # pylint: disable=protected-access
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def wheel_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def record_problems(members):
    """Every way the wheel's RECORD disagrees with its files (PEP 427 / the wheel spec): [] when right."""
    (record_name,) = [n for n in members if n.endswith(".dist-info/RECORD")]
    rows = list(csv.reader(io.StringIO(members[record_name].decode())))
    problems = []
    listed = {row[0] for row in rows}
    problems += [f"not in RECORD: {n}" for n in sorted(set(members) - listed)]
    problems += [f"in RECORD, not in the wheel: {n}" for n in sorted(listed - set(members))]
    for path, digest, size in rows:
        if path == record_name:
            if digest or size:
                problems.append("RECORD lists a hash for itself")
            continue
        data = members.get(path, b"")
        want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if digest != want or size != str(len(data)):
            problems.append(f"wrong hash or size: {path}")
    return problems


def test_a_pip_installed_pibake_burns_a_manager_without_wheel_option(tmp_path):
    src = copy_checkout(tmp_path / "src")
    bin_ = venv(tmp_path / "installed")
    # not editable, no index, no build isolation: everything from this machine
    run([bin_ / "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", src])
    where = run([bin_ / "python", "-c", "import pibake; print(pibake.__file__)"], cwd=tmp_path).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(src))

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    cluster = tmp_path / "cluster"
    make_ssh_key(tmp_path, name="key")
    pibake = [bin_ / "pibake", "--cluster", cluster]
    run([*pibake, "init", "--manager", "red00", "--manager-ip", "10.1.1.10", "--network", "10.1.1.0/24",
         "--ssh-key", tmp_path / "key.pub", "--timezone", "Etc/UTC"], cwd=tmp_path, env=env)
    from pibake.bake.synthetic import build_pi_image

    build_pi_image(tmp_path / "raspios.img", size="96M", boot_size="40M", kernel_size=1 << 20)
    proc = run([*pibake, "burn", "--role", "manager", "--hostname", "red00", "--ip", "10.1.1.10",
                "--output", tmp_path / "x.img", "--image", tmp_path / "raspios.img", "--json"], cwd=tmp_path, env=env)
    (result,) = json.loads(proc.stdout)
    version = run([bin_ / "python", "-c", "import pibake; print(pibake.__version__)"]).stdout.strip()
    name = f"pibake/pibake-{version}-py3-none-any.whl"
    assert name in result["seed"]["files"], result

    wheel = bootpart.read_files(bootpart.find_boot_partition(tmp_path / "x.img"), [name])[name]
    members = wheel_members(wheel)
    assert record_problems(members) == []
    # the same files as the wheel pip builds from these sources, byte for byte (RECORD aside)
    run([bin_ / "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", src, "-w", tmp_path / "dist"])
    (built,) = (tmp_path / "dist").glob("pibake-*.whl")
    reference = wheel_members(built.read_bytes())
    strip = lambda m: {k: v for k, v in m.items() if not k.endswith("/RECORD")}  # noqa: E731
    assert strip(members) == strip(reference)
    info = f"pibake-{version}.dist-info"
    assert b"pibake = pibake.cli:main" in members[f"{info}/entry_points.txt"]
    assert not any(n.endswith((".pyc", "INSTALLER", "direct_url.json", "REQUESTED")) for n in members)

    # the wheel installs with pip into another venv (as pibake-install does on the manager) and runs
    (tmp_path / "wheel").mkdir()
    got = tmp_path / "wheel" / Path(name).name
    got.write_bytes(wheel)
    other = venv(tmp_path / "other")
    run([other / "pip", "install", "--quiet", "--no-deps", "--no-index", "--disable-pip-version-check", got])
    assert "Usage: pibake" in run([other / "pibake", "--help"], cwd=tmp_path).stdout
    # and that installation makes the very same wheel again (the manager could burn a card for a new manager)
    again = run([other / "python", "-c", "from pibake.bake.burn import manager_wheel; print(manager_wheel())"],
                cwd=tmp_path, env=dict(env, XDG_CACHE_HOME=str(tmp_path / "cache2"))).stdout.strip()
    assert Path(again).read_bytes() == wheel


def test_an_installed_distribution_that_is_not_pure_python_is_refused():
    class Dist:  # importlib.metadata's interface, over files in a dict
        files = ["pibake/__init__.py", "pibake-1.0.dist-info/WHEEL", "pibake-1.0.dist-info/RECORD"]
        contents = {"pibake/__init__.py": b"", "pibake-1.0.dist-info/WHEEL":
                    b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n"}

        def locate_file(self, entry):
            return self._paths[str(entry)]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dist = Dist()
        dist._paths = {}  # pylint: disable=protected-access
        for rel, data in Dist.contents.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            dist._paths[rel] = path  # pylint: disable=protected-access
        with pytest.raises(burn.BurnError, match="not a pure-Python py3-none-any installation"):
            burn.installed_wheel_files(dist)
