"""python-kasa's wheels for a manager (bake/manager_wheels.py): which dependency comes as a wheel and which from
Debian, the cache and its downloads, the burn's refusal without them, the deps/ folder on the boot partition,
and the real thing: the manager's venv built by the seed's own pibake-install from those wheels (--no-index,
over Debian's python3 and python3-aiohttp) drives the npm TP-Link plug simulator through pibake's CLI."""

import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pibake.bake import bootpart, burn
from pibake.bake import manager_wheels as mw
from pibake.bake.seed import render_template
from pibake.bake.synthetic import build_pi_image
from pibake.errors import BurnError, CommandError
from pibake.layout import KASA_PACKAGES, role_packages
from pibake.model import Seed
from tests.conftest import needs_program
from tests.switches.conftest import KasaSimulator, write_cluster

KASA_012 = ("aiohttp>=3", "asyncclick>=8.1.7", "cryptography>=1.9", "mashumaro>=3.20",
            "tzdata>=2024.2; platform_system == 'Windows'", "ptpython; extra == 'shell'")


def make_wheel(directory, name, version, requires=(), tag="py3-none-any", requires_python=""):
    """A real wheel file (zip with a .dist-info/METADATA) of project ``name``."""
    dist = name.replace("-", "_")
    path = Path(directory) / f"{dist}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += f"Requires-Python: {requires_python}\n" if requires_python else ""
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{dist}/__init__.py", "")
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", meta)
    path.write_bytes(buf.getvalue())
    return path


def kasa_index(directory, mashumaro_tag="py3-none-any"):
    """PyPI's shape of python-kasa 0.12's dependencies (versions and requirements as published)."""
    directory.mkdir(parents=True, exist_ok=True)
    make_wheel(directory, "python-kasa", "0.12.0", KASA_012, requires_python="<4.0,>=3.11")
    make_wheel(directory, "python-kasa", "0.10.2", KASA_012[:3] + ("mashumaro>=3.14",), requires_python=">=3.11")
    make_wheel(directory, "asyncclick", "8.4.2.1", ("colorama; platform_system == 'Windows'",))
    make_wheel(directory, "mashumaro", "3.23", ("typing_extensions>=4.14.0", 'orjson; extra == "orjson"'),
               tag=mashumaro_tag)
    make_wheel(directory, "typing-extensions", "4.16.0", requires_python=">=3.9")
    make_wheel(directory, "typing-extensions", "4.15.0")
    # aiohttp has a pure wheel on PyPI too; the manager takes Debian's all the same (C speedups, security updates)
    make_wheel(directory, "aiohttp", "3.14.5", ("yarl>=1.25",))
    make_wheel(directory, "cryptography", "46.0.3", ("cffi>=2.0.0",), tag="cp311-abi3-manylinux_2_34_aarch64")
    return directory


def pool(directory):
    return mw.cached_pool(directory)


def names(selection):
    return [f"{w.name}=={w.version}" for w in selection.wheels]


# --------------------------------------------------------------------------- selection (pure)

@pytest.mark.parametrize("case,preferred,wheels,missing", [
    ("published", {}, ["typing-extensions==4.16.0", "mashumaro==3.23", "asyncclick==8.4.2.1", "python-kasa==0.12.0"],
     []),
    # this machine's installed versions win where they fit the requirement, else the newest
    ("installed", {"python-kasa": "0.10.2", "typing-extensions": "4.15.0", "mashumaro": "3.0"},
     ["typing-extensions==4.15.0", "mashumaro==3.23", "asyncclick==8.4.2.1", "python-kasa==0.10.2"], []),
    # a dependency that PyPI has only as platform wheels cannot go on a card
    ("platform-only", {}, ["asyncclick==8.4.2.1", "python-kasa==0.12.0"],
     [("mashumaro>=3.20", "only platform wheels (no py3-none-any): the manager must get it from a Debian package")]),
])
def test_select_ships_pure_wheels_and_leaves_the_compiled_ones_to_debian(tmp_path, case, preferred, wheels, missing):
    index = kasa_index(tmp_path / "index", mashumaro_tag="cp313-cp313-manylinux_2_17_aarch64"
                       if case == "platform-only" else "py3-none-any")
    selection = mw.select(pool(index), preferred=preferred)
    assert names(selection) == wheels  # dependencies first
    assert selection.debian == ["python3-aiohttp", "python3-cryptography"]  # never the aiohttp wheel in the pool
    assert selection.missing == missing
    assert all(w.pure for w in selection.wheels)


def test_select_follows_only_requirements_that_hold_on_a_manager(tmp_path):
    make_wheel(tmp_path, "top", "1.0", ("win-only; sys_platform == 'win32'", "old-py; python_version < '3.11'",
                                        "new-py; python_version >= '3.12'", "opt; extra == 'x'", "plain>=2"))
    make_wheel(tmp_path, "new-py", "1.0")
    make_wheel(tmp_path, "plain", "1.0")  # too old for plain>=2
    make_wheel(tmp_path, "plain", "3.0", requires_python=">=3.12")  # does not install on bookworm's 3.11
    selection = mw.select(pool(tmp_path), "top")
    assert names(selection) == ["new-py==1.0", "top==1.0"]  # new-py: Ubuntu 24.04 and trixie need it
    assert selection.missing == [("plain>=2", "no wheel for Python 3.11, 3.12, 3.13")]
    assert mw.select([], "nothing").missing == [("nothing", "no wheel")]


def test_the_requirements_file_pins_versions_and_hashes(tmp_path):
    selection = mw.select(pool(kasa_index(tmp_path)))
    text = mw.requirements_text(selection.wheels)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert [line.split(" ")[0] for line in lines] == names(selection)
    for line, wheel in zip(lines, selection.wheels):
        assert line.endswith(f"--hash=sha256:{wheel.sha256()}") and len(wheel.sha256()) == 64


# --------------------------------------------------------------------------- the cache and its downloads

def index_download(index, calls):
    """pip download's contract over a folder: the newest wheel fitting ``spec`` into ``dest``, else an error."""
    def download(spec, dest):
        calls.append(spec)
        req = Requirement(spec)
        fits = [w for w in pool(index) if w.name == canonicalize_name(req.name) and req.specifier.contains(w.version) and w.pure]
        if not fits:
            raise CommandError(["pip", "download", spec], 1, stderr=f"ERROR: No matching distribution found for {spec}")
        shutil.copy(max(fits, key=lambda w: w.version).path, dest)
    return download


def test_kasa_wheels_fills_the_cache_once_at_the_installed_versions(tmp_path):
    index, cache, calls = kasa_index(tmp_path / "index"), tmp_path / "cache", []
    installed = {"python-kasa": "0.12.0", "typing-extensions": "4.15.0"}
    selection = mw.kasa_wheels(cache=cache, download=index_download(index, calls), preferred=installed)
    assert names(selection) == ["typing-extensions==4.15.0", "mashumaro==3.23", "asyncclick==8.4.2.1",
                                "python-kasa==0.12.0"] and selection.missing == []
    assert calls == ["python-kasa==0.12.0", "asyncclick>=8.1.7", "mashumaro>=3.20", "typing_extensions==4.15.0"]
    again = mw.kasa_wheels(cache=cache, download=index_download(index, calls := []), preferred=installed)
    assert calls == [] and names(again) == names(selection)  # offline from now on


def test_a_download_that_brings_no_fitting_wheel_is_tried_once(tmp_path):
    calls = []

    def download(spec, dest):  # pip "succeeds" with a wheel that does not fit (e.g. a stale mirror)
        calls.append(spec)
        make_wheel(dest, "python-kasa", "0.9.0")

    selection = mw.kasa_wheels(cache=tmp_path / "cache", download=download, preferred={})
    assert calls == ["python-kasa>=0.10"] and selection.missing == [("python-kasa>=0.10", "no wheel")]


def test_a_kasa_manager_without_index_or_cache_is_refused_with_what_to_do(tmp_path):
    kasa = write_cluster(tmp_path / "kasa", [{"name": "fan", "driver": "kasa", "address": "127.0.0.1:9",
                                               "thing": "fan"}])
    plain = write_cluster(tmp_path / "plain", [{"name": "lamp", "driver": "tasmota", "address": "127.0.0.1:9",
                                                 "thing": "lamp"}])
    calls = []
    offline = index_download(tmp_path / "empty-index", calls)
    (tmp_path / "empty-index").mkdir()
    from pibake.cluster import load_cluster

    # no Kasa switch: nothing to ship, nothing downloaded (a burn without network works)
    assert mw.manager_deps(load_cluster(plain), cache=tmp_path / "cache", download=offline) == {} and calls == []
    with pytest.raises(BurnError) as err:
        mw.manager_deps(load_cluster(kasa), cache=tmp_path / "cache", download=offline, preferred={})
    message = str(err.value)
    assert message.startswith("cluster.yaml has Kasa switches, but the manager cannot get python-kasa: "
                              "python-kasa>=0.10 (ERROR: No matching distribution found for python-kasa>=0.10).")
    assert f"-d {tmp_path / 'cache'} python-kasa" in message and "\n" not in message
    # the manager's seed installs Debian's aiohttp only for a Kasa cluster
    assert set(KASA_PACKAGES) <= set(role_packages("manager", kasa=True))
    assert not set(KASA_PACKAGES) & set(role_packages("manager") + role_packages("worker", kasa=True))


def test_manager_deps_are_the_wheels_and_their_requirements_file(tmp_path):
    kasa = write_cluster(tmp_path / "kasa", [{"name": "fan", "driver": "kasa", "address": "127.0.0.1:9",
                                                   "thing": "fan"}])
    from pibake.cluster import load_cluster

    files = mw.manager_deps(load_cluster(kasa), cache=tmp_path / "cache",
                            download=index_download(kasa_index(tmp_path / "index"), []), preferred={})
    assert sorted(files) == ["asyncclick-8.4.2.1-py3-none-any.whl", "mashumaro-3.23-py3-none-any.whl",
                             "python_kasa-0.12.0-py3-none-any.whl", "requirements.txt",
                             "typing_extensions-4.16.0-py3-none-any.whl"]
    assert b"python-kasa==0.12.0 --hash=sha256:" in files["requirements.txt"]


@needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy")
def test_the_boot_partitions_deps_folder_is_replaced_whole(tmp_path):
    image = build_pi_image(tmp_path / "pi.img", size="80M", boot_size="40M", kernel_size=64 * 1024).path
    seed = Seed("#cloud-config\n", "instance-id: m-1\n", "network:\n  version: 2\n", "m-1")
    first = {"pibake/pibake-0.1.0-py3-none-any.whl": b"PK pibake", "pibake/deps/requirements.txt": b"a==1\n",
             "pibake/deps/a-1-py3-none-any.whl": b"PK a1", "pibake/deps/b-1-py3-none-any.whl": b"PK b1"}
    bootpart.write_seed(image, seed, extra_files=first)
    second = {"pibake/pibake-0.1.0-py3-none-any.whl": b"PK pibake", "pibake/deps/requirements.txt": b"a==2\n",
              "pibake/deps/a-2-py3-none-any.whl": b"PK a2"}
    result = bootpart.write_seed(image, seed, extra_files=second)
    part = bootpart.find_boot_partition(image)
    assert sorted(bootpart.list_files(part, "pibake/deps")) == ["a-2-py3-none-any.whl", "requirements.txt"]
    assert sorted(result["removed_files"]) == ["pibake/deps/a-1-py3-none-any.whl", "pibake/deps/b-1-py3-none-any.whl"]
    assert bootpart.read_files(part, ["pibake/deps/requirements.txt"])["pibake/deps/requirements.txt"] == b"a==2\n"


# --------------------------------------------------------------------------- the manager's venv, for real

DEBIAN_PYTHON = "/usr/bin/python3"


def _debian_kasa_base_missing():
    probe = ("import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in "
             "('aiohttp', 'cryptography', 'click', 'yaml', 'jsonschema', 'requests', 'rich', 'ensurepip')) else 1)")
    if not os.path.exists(DEBIAN_PYTHON) or subprocess.run([DEBIAN_PYTHON, "-c", probe]).returncode:
        return ("Debian's python3 lacks the manager's packages for Kasa (scripts/setup installs them: "
                "python3-aiohttp, python3-cryptography, python3-venv, ...)")
    return None


@needs_program("node", "npm")
@pytest.mark.skipif(bool(_debian_kasa_base_missing()), reason=_debian_kasa_base_missing() or "ok")
def test_the_seeds_pibake_install_builds_a_manager_venv_that_drives_a_kasa_plug(tmp_path):
    """pibake's wheel and python-kasa's deps/ as burn lays them out, the seed's own pibake-install (rendered
    from templates/install-pibake.sh.j2) with Debian's python3 first on PATH: no index, no network; then the
    venv's own `pibake switch on/status/off` drive the npm plug simulator and read its state back."""
    boot = tmp_path / "boot" / "pibake"
    (boot / mw.DEPS_DIR).mkdir(parents=True)
    shutil.copy(burn.manager_wheel(), boot)
    deps = mw.kasa_wheels()  # the machine's cache, filled from the configured index the first time
    assert deps.missing == [] and deps.debian == ["python3-aiohttp", "python3-cryptography"]
    for wheel in deps.wheels:
        shutil.copy(wheel.path, boot / mw.DEPS_DIR)
    (boot / mw.DEPS_DIR / mw.REQUIREMENTS).write_text(mw.requirements_text(deps.wheels))
    script = tmp_path / "pibake-install"
    script.write_text(render_template("install-pibake.sh.j2"))
    venv = tmp_path / "venv"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "PIBAKE_VENV": str(venv),
           "PIP_CONFIG_FILE": os.devnull}  # no index, no find-links of this machine: only what is on the card
    proc = subprocess.run(["sh", str(script), f"{boot}/pibake-*.whl"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"pibake-install: installed {len(deps.wheels)} wheels from " \
                                           f"{boot}/{mw.DEPS_DIR} into {venv}"
    where = subprocess.run([venv / "bin" / "python", "-c", "import kasa, aiohttp; print(kasa.__file__); "
                            "print(aiohttp.__file__)"], capture_output=True, text=True, env=env).stdout.split()
    assert where[0].startswith(f"{venv}/") and where[1].startswith("/usr/lib/python3/dist-packages/")

    plug = KasaSimulator()
    try:
        cluster = write_cluster(tmp_path / "cluster", [{"name": "fan", "driver": "kasa", "address": plug.address,
                                                        "thing": "fan"}])
        states = []
        for action in ("on", "status", "off"):
            args = ["switch", action] + (["fan"] if action != "status" else []) + ["--json"]
            run = subprocess.run([venv / "bin" / "pibake", "--cluster", cluster, *args], capture_output=True,
                                 text=True, env=env, timeout=60)
            assert run.returncode == 0, run.stderr
            out = json.loads(run.stdout)
            states.append((out[0] if isinstance(out, list) else out)["state"]["on"])
        assert states == [True, True, False]
    finally:
        plug.stop()


# --------------------------------------------------------------------------- deploy onto a manager

def test_deploy_ships_the_same_deps_beside_the_wheel_it_installs(tmp_path, monkeypatch):
    """`pibake deploy` setting up a Kasa cluster's manager: python-kasa's wheels and requirements file go to
    MANAGER_WHEEL_DIR/deps, beside the pibake wheel its pibake-install line names, so the seed's install
    script finds them as on a card; the packages are the Kasa seed's (python3-aiohttp). A cluster without
    Kasa switches gets no deps/; a Kasa cluster whose wheels cannot be had is one DeployError."""
    from pibake.cluster import load_cluster
    from pibake.deploy import manager as dm
    from pibake.errors import DeployError

    cache = tmp_path / "cache"
    kasa_index(cache)  # the machine's wheel cache, already filled: deploy downloads nothing
    monkeypatch.setattr(mw, "cache_dir", lambda: cache)
    wheel = tmp_path / "pibake-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 stand-in")
    cases = [("kasa", True), ("tasmota", False)]
    for driver, shipped in cases:
        cdir = write_cluster(tmp_path / driver, [{"name": "fan", "driver": driver, "address": "127.0.0.1:9",
                                                  "thing": "fan"}])
        plan = dm.manager_plan_for(load_cluster(cdir), cdir, wheel)
        deps = sorted(p for p in plan.files if p.startswith(f"{dm.MANAGER_WHEEL_DIR}/deps/"))
        assert plan.install == [plan.install[0], plan.wheel] and plan.wheel.startswith(dm.MANAGER_WHEEL_DIR + "/")
        assert ("python3-aiohttp" in plan.packages) is shipped, driver
        if not shipped:
            assert deps == [], driver
            continue
        assert [p.rsplit("/", 1)[1] for p in deps] == [
            "asyncclick-8.4.2.1-py3-none-any.whl", "mashumaro-3.23-py3-none-any.whl",
            "python_kasa-0.12.0-py3-none-any.whl", "requirements.txt", "typing_extensions-4.16.0-py3-none-any.whl"]
        assert all(plan.files[p][1] == 0o644 for p in deps)
        assert plan.files[f"{dm.MANAGER_WHEEL_DIR}/deps/python_kasa-0.12.0-py3-none-any.whl"][0] == (
            cache / "python_kasa-0.12.0-py3-none-any.whl").read_bytes()
    cdir = tmp_path / "kasa"
    with monkeypatch.context() as m:  # what kasa_wheels reports offline with an empty cache (tested above)
        m.setattr(mw, "kasa_wheels", lambda **kw: mw.Selection(missing=[("python-kasa>=0.10", "offline")]))
        with pytest.raises(DeployError, match=r"^cluster.yaml has Kasa switches, but the manager cannot get "
                                              r"python-kasa: python-kasa>=0.10 \(offline\)\. "):
            dm.manager_plan_for(load_cluster(cdir), cdir, wheel)


# --------------------------------------------------------------------------- pibake burn, through the CLI

@needs_program("sfdisk", "mkfs.vfat", "mke2fs", "mcopy", "ssh-keygen")
def test_burn_puts_the_deps_on_a_kasa_managers_card_or_refuses_in_one_line(tmp_path):
    """`pibake burn` of a Kasa cluster's manager with no index (PIP_NO_INDEX) and an empty wheel cache: one line
    naming what is missing, nothing written; with the cache filled: the card's pibake/deps/ holds the
    wheels and the requirements file, and its seed installs python3-aiohttp."""
    import sys

    image = build_pi_image(tmp_path / "raspios.img", size="96M", boot_size="40M", kernel_size=64 * 1024).path
    cdir = write_cluster(tmp_path / "cluster", [{"name": "fan", "driver": "kasa", "address": "127.0.0.1:9",
                                                  "thing": "fan"}], image=str(image), family="raspios")
    cache_home = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "",
           "PIP_CONFIG_FILE": os.devnull}
    args = [sys.executable, "-m", "pibake", "--cluster", cdir, "burn", "--hostname", "red00", "--ip", "10.1.1.10",
            "--role", "manager", "--output", tmp_path / "out" / "red00.img"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("pibake: error: cluster.yaml has Kasa switches, but the manager cannot get "
                           "python-kasa: python-kasa"), line
    assert not (tmp_path / "out").exists()

    kasa_index(cache_home / "pibake" / "pypi-wheels")  # what a burn with the index reachable leaves there
    proc = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    part = bootpart.find_boot_partition(tmp_path / "out" / "red00.img")
    on_card = sorted(bootpart.list_files(part, "pibake/deps"))
    assert on_card == ["asyncclick-8.4.2.1-py3-none-any.whl", "mashumaro-3.23-py3-none-any.whl",
                       "python_kasa-0.12.0-py3-none-any.whl", "requirements.txt",
                       "typing_extensions-4.16.0-py3-none-any.whl"]
    requirements = bootpart.read_files(part, ["pibake/deps/requirements.txt"])["pibake/deps/requirements.txt"]
    assert b"python-kasa==0.12.0 --hash=sha256:" in requirements
    import yaml

    assert "python3-aiohttp" in yaml.safe_load(bootpart.read_seed(tmp_path / "out" / "red00.img").user_data)["packages"]
