"""The wheels a manager installs beside pibake's own: python-kasa, for cluster.yaml's Kasa switches.

No Debian release packages python-kasa, and the manager installs pibake from the wheel on its boot partition
with --no-deps --no-index into a venv over Debian's python3 libraries (templates/install-pibake.sh.j2). So
python-kasa travels with pibake: ``pibake burn`` (and ``pibake deploy`` onto a manager) ship the wheels chosen
here in a ``deps/`` folder beside pibake's wheel, with a requirements file that pins each by version and
sha256, and pibake-install installs exactly those (--no-deps --no-index --require-hashes).

Which dependency comes from where (``select``, pure):

- ``FROM_DEBIAN`` (aiohttp, cryptography) come from Debian's packages (``pibake.layout.KASA_PACKAGES``;
  python3-cryptography is a pibake dependency anyway). cryptography has only platform wheels on PyPI, and a
  card for an arm64 or armhf Pi must not carry a wheel built for one machine kind. aiohttp and its yarl,
  multidict, frozenlist and propcache do have py3-none-any wheels (checked 2026-12: aiohttp 3.14.5), but
  those run without their C speedups and without Debian's security updates, while every release pibake
  burns packages a version python-kasa accepts (aiohttp>=3: bookworm 3.8.4, trixie 3.11.16;
  cryptography>=1.9: bookworm 38, trixie 43);
- every other one is a pure-Python (py3-none-any) wheel. Debian has some of them, but too old: trixie's
  python3-mashumaro 3.15 where python-kasa 0.11+ asks >=3.20, python3-typing-extensions 4.13.2 where
  mashumaro 3.23 asks >=4.14. The wheel's version is the one installed on this machine when it fits (the
  one pibake's tests ran with), else the newest one in the cache.

A dependency with no pure wheel and no Debian package is named in the error: it cannot go on a card.

Where the wheels come from: the cache ``cache_dir()`` (/var/cache/pibake/pypi-wheels), filled on demand by
``pip download --no-deps --only-binary=:all: --platform any --abi none`` from the configured index, so a
burn needs the index once per python-kasa version and never again.
"""

import email.parser
import hashlib
import importlib.metadata
import logging
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from pibake.bake import images
from pibake.errors import BurnError, PibakeError
from pibake.layout import uses_kasa
from pibake.run import run

LOG = logging.getLogger(__name__)

KASA_REQUIREMENT = "python-kasa>=0.10"  # as setup.cfg's install_requires
FROM_DEBIAN = {"aiohttp": "python3-aiohttp", "cryptography": "python3-cryptography"}
# The managers' Pythons: bookworm 3.11, Ubuntu 24.04 3.12, trixie 3.13. A requirement whose marker holds on any
# of them is shipped; a wheel must install on all of them (its Requires-Python).
MANAGER_PYTHONS = ("3.11", "3.12", "3.13")
DEPS_DIR = "deps"  # beside pibake's wheel: /boot/firmware/pibake/deps, or /var/lib/pibake/wheel/deps (deploy)
REQUIREMENTS = "requirements.txt"


def cache_dir():
    """Downloaded wheels, kept: beside the image cache (not in burn's own wheel cache, which it prunes)."""
    return images.default_cache_dir().parent / "pypi-wheels"


@dataclass(frozen=True)
class WheelFile:
    """One wheel file and what its name and METADATA say."""

    path: Path
    name: str  # canonical project name (PEP 503)
    version: object  # packaging.version.Version
    pure: bool  # has a py3-none-any tag
    requires: tuple = ()  # Requires-Dist lines
    requires_python: str = ""

    @property
    def filename(self):
        return self.path.name

    def sha256(self):
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass
class Selection:
    """``wheels``: what goes on the card, dependencies first; ``debian``: the Debian packages the rest needs;
    ``missing``: [(requirement, why)] that neither can give."""

    wheels: list = field(default_factory=list)
    debian: list = field(default_factory=list)
    missing: list = field(default_factory=list)


def read_wheel(path):
    """The WheelFile of ``path`` (name, version and tags from its file name, requirements from METADATA)."""
    from packaging.utils import parse_wheel_filename  # optional package: only burn/deploy read wheels

    path = Path(path)
    name, version, _build, tags = parse_wheel_filename(path.name)
    pure = any(t.interpreter.startswith("py3") and t.abi == "none" and t.platform == "any" for t in tags)
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    return WheelFile(path=path, name=name, version=version, pure=pure,
                     requires=tuple(meta.get_all("Requires-Dist") or ()),
                     requires_python=meta.get("Requires-Python") or "")


def _applies(requirement):
    """Whether a requirement counts on a manager: no marker, or one that holds for one of MANAGER_PYTHONS on
    Linux without extras."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({
        "python_version": v, "python_full_version": f"{v}.0", "platform_system": "Linux", "sys_platform": "linux",
        "os_name": "posix", "platform_machine": "aarch64", "implementation_name": "cpython",
        "platform_python_implementation": "CPython", "extra": ""}) for v in MANAGER_PYTHONS)


def _installs_everywhere(wheel):
    from packaging.specifiers import SpecifierSet  # optional package: only burn/deploy read wheels

    spec = SpecifierSet(wheel.requires_python)
    return all(spec.contains(f"{v}.0", prereleases=True) for v in MANAGER_PYTHONS)


def select(pool, root=KASA_REQUIREMENT, *, preferred=None, from_debian=None):
    """The Selection for ``root`` from ``pool`` (WheelFiles), following requirements breadth first (pure).

    ``preferred``: {canonical name: version string} to take when it fits (this machine's installed versions);
    else the newest fitting wheel. ``from_debian``: {canonical name: Debian package}, default FROM_DEBIAN."""
    from packaging.requirements import Requirement  # optional package: only burn/deploy read wheels
    from packaging.utils import canonicalize_name  # optional package: only burn/deploy read wheels

    from_debian = FROM_DEBIAN if from_debian is None else from_debian
    preferred = preferred or {}
    by_name = {}
    for wheel in pool:
        by_name.setdefault(wheel.name, []).append(wheel)
    chosen, order, debian, missing = {}, [], [], []
    queue = [Requirement(root)]
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in from_debian:
            if from_debian[name] not in debian:
                debian.append(from_debian[name])
            continue
        if name in chosen:
            if not req.specifier.contains(chosen[name].version, prereleases=True):
                missing.append((str(req), f"conflicts with {chosen[name].filename}, chosen for another requirement"))
            continue
        fitting = [w for w in by_name.get(name, ()) if req.specifier.contains(w.version, prereleases=True)]
        usable = [w for w in fitting if w.pure and _installs_everywhere(w)]
        if not usable:
            why = ("only platform wheels (no py3-none-any): the manager must get it from a Debian package"
                   if fitting and not any(w.pure for w in fitting) else
                   f"no wheel for Python {', '.join(MANAGER_PYTHONS)}" if fitting else "no wheel")
            missing.append((str(req), why))
            continue
        want = preferred.get(name)
        pick = next((w for w in usable if want is not None and str(w.version) == want),
                    max(usable, key=lambda w: w.version))
        chosen[name] = pick
        order.append(pick)
        queue += [r for r in map(Requirement, pick.requires) if _applies(r)]
    # dependencies before their dependents: the reverse of the breadth-first order
    return Selection(wheels=order[::-1], debian=debian, missing=missing)


def requirements_text(wheels):
    """The requirements file pibake-install reads: one pinned line with its sha256 per wheel (pure)."""
    lines = ["# written by pibake (bake/manager_wheels.py); pibake-install installs these with --no-deps "
             "--no-index --require-hashes"]
    lines += [f"{w.name}=={w.version} --hash=sha256:{w.sha256()}" for w in wheels]
    return "\n".join(lines) + "\n"


def installed_versions():
    """{canonical name: version} of the distributions installed with the running pibake."""
    from packaging.utils import canonicalize_name  # optional package: only burn/deploy read wheels

    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def pip_download(spec, dest):
    """Download one pure-Python wheel of ``spec`` (no dependencies) into ``dest`` from the configured index."""
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--platform", "any", "--implementation", "py", "--abi", "none",
         "--python-version", MANAGER_PYTHONS[0], "--dest", str(dest), spec], timeout=300)


def cached_pool(directory):
    pool = []
    for path in sorted(Path(directory).glob("*.whl")):
        try:
            pool.append(read_wheel(path))
        except (ValueError, KeyError, StopIteration, zipfile.BadZipFile, OSError) as exc:
            LOG.warning("wheel cache: ignoring %s (%s)", path, exc)
    return pool


def kasa_wheels(*, cache=None, download=pip_download, preferred=None):
    """The Selection of python-kasa's wheels for a manager, downloading into the cache what it lacks.

    Each round selects from the cache and downloads what is missing (at this machine's installed version when
    that fits the requirement); it stops when nothing more can be had. ``download(spec, dest)``: the seam for
    tests (default: pip from the configured index)."""
    from packaging.requirements import Requirement  # optional package: only burn/deploy read wheels
    from packaging.utils import canonicalize_name  # optional package: only burn/deploy read wheels

    cache = Path(cache) if cache else cache_dir()
    preferred = installed_versions() if preferred is None else preferred
    failed, tried = {}, set()
    while True:
        selection = select(cached_pool(cache) if cache.is_dir() else [], preferred=preferred)
        todo = [(req, why) for req, why in selection.missing if req not in tried and why == "no wheel"]
        if not todo:
            break
        cache.mkdir(parents=True, exist_ok=True)
        for text, _why in todo:
            tried.add(text)  # once each: a download that brings no fitting wheel is not repeated
            req = Requirement(text)
            want = preferred.get(canonicalize_name(req.name))
            fits = want and req.specifier.contains(want, prereleases=True)
            spec = f"{req.name}=={want}" if fits else f"{req.name}{req.specifier}"
            try:
                download(spec, cache)
                LOG.info("downloaded %s into the wheel cache %s", spec, cache)
            except PibakeError as exc:
                detail = (getattr(exc, "stderr", "") or str(exc)).strip().splitlines()
                failed[text] = detail[-1] if detail else str(exc)
    selection.missing = [(req, failed.get(req, why)) for req, why in selection.missing]
    return selection


def missing_error(selection, cache):
    """The BurnError for a Kasa cluster's manager whose wheels cannot all be had."""
    items = "; ".join(f"{req} ({why})" for req, why in selection.missing)
    return BurnError(
        f"cluster.yaml has Kasa switches, but the manager cannot get python-kasa: {items}. Fill the wheel cache "
        f"{cache} while the PyPI index is reachable (burn does it by itself then, or: python3 -m pip download "
        f"--no-deps --only-binary=:all: --platform any --abi none --implementation py -d {cache} "
        f"python-kasa mashumaro asyncclick typing-extensions), or take the Kasa switches out of cluster.yaml")


def manager_deps(cluster, *, cache=None, download=pip_download, preferred=None):
    """{file name: bytes} for the manager's ``deps/`` folder (the wheels + requirements file), or {} when
    cluster.yaml has no Kasa switch. BurnError naming what is missing when a wheel cannot be had."""
    if not uses_kasa(cluster):
        return {}
    cache = Path(cache) if cache else cache_dir()
    selection = kasa_wheels(cache=cache, download=download, preferred=preferred)
    if selection.missing:
        raise missing_error(selection, cache)
    files = {w.filename: w.path.read_bytes() for w in selection.wheels}
    files[REQUIREMENTS] = requirements_text(selection.wheels).encode()
    return files
