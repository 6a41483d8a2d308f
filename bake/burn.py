"""Burning cards and image files: the orchestration the CLI and the REST API call.

``burn()`` does, in this order, and touches no target before every check has passed:

1. load cluster.yaml, plan the nodes (hostlist + IP list, or an inventory);
2. render and lint every node's seed (one bad seed: nothing is written);
3. for a manager, get the pibake wheel it installs from its boot partition;
4. record the plan (a hostname keeps its IP);
5. resolve the image (catalog download with sha256, or a local file) and, when it is
   compressed, decompress it once into a raw spool file, so a corrupt or truncated
   download is found before any card is touched;
6. check every target with the wrong-disk guard and ask for confirmation (model, size,
   serial) unless the caller confirmed already (``--yes``);
7. per card/file: append ``started`` to the manifest, write the image (sparse, hashed,
   read back), write the seed to the boot partition and read it back, append ``complete``.

Targets: ``output="out/{hostname}.img"`` writes one image file per node; ``devices=[dev]``
with several nodes burns them one after the other and asks for the next card between
burns (checking it is a different card); ``devices=[a, b]`` writes cards in parallel
threads, in rounds of ``len(devices)``.

The seams for what cannot exist in a test (a person swapping cards) are thin:
``ask(message)`` waits for the person, ``probe(device)`` reads the card's identity, and
``next_card_verdict`` is the pure decision between them.

Test hook: the environment variable ``PIBAKE_TEST_WRITE_DELAY`` (seconds, float) makes
every progress step of the writer sleep that long. Tests use it to kill a burn mid-write;
it has no other effect and is never set by pibake itself.
"""

import base64
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from pibake.bake import bootpart, devices, golden, images, manifest, writer
from pibake.bake.golden import read_marker
from pibake.bake.seed import ROLE_BOOT_CONFIG, render_checked

import pibake
from pibake.cluster import load_cluster
from pibake.errors import BakeError, BurnError, PibakeError, PlanError
from pibake.files import atomic_write
from pibake.layout import cluster_role_packages
from pibake.model import ROLES
from pibake.plan import record_plan, resolve_plan
from pibake.run import run

LOG = logging.getLogger(__name__)

WRITE_DELAY_ENV = "PIBAKE_TEST_WRITE_DELAY"
WHEEL_DIR_ON_BOOT = "pibake"  # /boot/firmware/pibake/pibake-<version>-py3-none-any.whl
_WHEEL_RE = re.compile(r"^pibake-[0-9][A-Za-z0-9_.+!-]*-py3-none-any\.whl$")
_SOURCE_PARTS = ("pibake", "bake", "templates", "firstboot", "registry")
_SOURCE_FILES = ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "LICENSE")


# --------------------------------------------------------------------------- results


@dataclass
class BurnResult:
    """One card or image file. ``error`` is None when the burn completed."""

    hostname: str
    ip: str
    role: str
    target: str
    target_kind: str  # "block" or "file"
    instance_id: str
    action: str = "burn"  # or "reseed"
    burn_id: str | None = None
    manifest_status: str | None = None  # complete / failed
    image: dict = field(default_factory=dict)  # name, path, sha256 (as stored), raw_sha256
    bytes_written: int = 0
    bytes_skipped: int = 0
    written_sha256: str | None = None
    verified: bool = False
    seed: dict = field(default_factory=dict)  # files (sha256), cmdline (removed tokens), partition
    card: dict = field(default_factory=dict)  # model, serial, size, disk_id (before the burn)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self):
        return self.error is None

    def to_json(self):
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- pure helpers


def output_paths(template, nodes):
    """{hostname: path} from an ``--output`` template such as ``out/{hostname}.img`` (pure)."""
    paths = {}
    for node in nodes:
        try:
            path = str(template).format_map({"hostname": node.hostname, "ip": node.ip, "role": node.role})
        except (KeyError, IndexError, ValueError) as exc:
            raise BurnError(f"--output {template}: only {{hostname}}, {{ip}} and {{role}} can be filled in "
                            f"({exc})") from None
        paths[node.hostname] = path
    if len(set(paths.values())) < len(paths):
        raise BurnError(f"--output {template} names the same file for several hosts: put {{hostname}} in it, "
                        "e.g. --output 'out/{hostname}.img'")
    return paths


def rounds(nodes, n_devices):
    """Split nodes into rounds of at most ``n_devices`` (one card per device per round)."""
    return [nodes[i:i + n_devices] for i in range(0, len(nodes), n_devices)]


def next_card_verdict(burned, identity, seed_instance_id):
    """Decide whether the card now in the reader is a new one to burn (pure).

    ``burned``: list of {"identity": CardIdentity, "instance_id": str} for cards burned in this batch.
    ``identity``: the ``devices.CardIdentity`` of the card now in the reader, or None (no card/reader).
    ``seed_instance_id``: the instance-id of the seed on that card's boot partition, or None.
    Returns (verdict, message): "absent", "same" or "new".

    A card pibake just burned carries the seed pibake wrote and read back: its instance-id is the
    strongest proof of "same card", because cards burned from one image share a disk id and a USB
    reader reports its own serial for every card. A card serial from an mmc slot decides too.
    """
    if identity is None or not identity.size:
        return "absent", "no card in the reader"
    for entry in burned:
        before = entry["identity"]
        if before.serial_identifies_card and identity.serial_identifies_card:
            if before.serial == identity.serial:
                return "same", f"this is the card just burned (card serial {identity.serial})"
            continue
        if seed_instance_id and seed_instance_id == entry["instance_id"]:
            return "same", f"this is the card just burned (it carries seed {seed_instance_id})"
    return "new", "a different card"


# --------------------------------------------------------------------------- wheel for the manager


def _source_tree():
    """The checkout pibake runs from (setup.cfg next to the pibake package), or None."""
    root = Path(pibake.__file__).resolve().parent.parent
    if (root / "setup.cfg").is_file() and (root / "bake").is_dir() and (root / "pibake").is_dir():
        return root
    return None


def _source_digest(root):
    digest = hashlib.sha256()
    paths = [root / f for f in _SOURCE_FILES if (root / f).is_file()]
    for part in _SOURCE_PARTS:
        paths += [p for p in sorted((root / part).rglob("*"))
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")]
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def wheel_cache_dir():
    return images.default_cache_dir().parent / "wheels"


def manager_wheel(wheel=None, *, cache_dir=None, source=None):
    """Path of a pibake wheel for the manager's boot partition: the running pibake itself, however it was installed.

    ``wheel``: a given ``pibake-*-py3-none-any.whl``. Otherwise, when pibake runs from a source checkout (an
    editable install, or the checkout on sys.path), one is built from it (``pip wheel --no-deps``, in a copy so
    the checkout stays clean); when it runs from an installed distribution (``pip install .``, a wheel), the
    wheel is put together again from that installation (``wheel_from_installed``). Either is cached by a
    checksum of what goes into it, so it is made once per change. ``source``: another checkout (tests).
    """
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise BurnError(f"--wheel {wheel} does not exist")
        if not _WHEEL_RE.match(path.name):
            raise BurnError(f"--wheel {wheel}: expected a file named pibake-<version>-py3-none-any.whl")
        return path
    root = Path(source) if source else _source_tree()
    if root is None:
        return wheel_from_installed(cache_dir=cache_dir)
    return _wheel_from_checkout(root, cache_dir)


# Files of an installed distribution that describe the installation, not the package: never in a wheel.
_INSTALLER_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "RECORD.jws", "RECORD.p7s"})
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed: the same installation always gives the same wheel, byte for byte


def _running_distribution():
    """The installed distribution ``pibake`` whose files are the modules running now, or None (e.g. an editable
    install, whose RECORD lists a path hook instead of the package files)."""
    try:
        dist = importlib.metadata.distribution("pibake")
    except importlib.metadata.PackageNotFoundError:
        return None
    running = Path(pibake.__file__).resolve()
    for entry in dist.files or ():
        if str(entry) == "pibake/__init__.py" and Path(dist.locate_file(entry)).resolve() == running:
            return dist
    return None


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def installed_wheel_files(dist):
    """[(path in the wheel, bytes)] of an installed pure-Python distribution: the files its RECORD lists inside
    site-packages (no byte code, no console scripts: pip makes those from entry_points.txt on install), its
    .dist-info without the installer's own files. BurnError when it is not a pure wheel."""
    files, info_dir = [], None
    for entry in dist.files or ():
        rel = str(entry)  # PackagePath: always "/"-separated
        parts = rel.split("/")
        if parts[0] == ".." or "__pycache__" in parts or rel.endswith((".pyc", ".pyo")):
            continue
        if parts[0].endswith(".dist-info"):
            info_dir = parts[0]
            if len(parts) == 2 and parts[1] in _INSTALLER_FILES:
                continue
        try:
            data = Path(dist.locate_file(entry)).read_bytes()
        except OSError as exc:
            raise BurnError(f"cannot read {rel} of the installed pibake ({exc.strerror}); reinstall pibake or "
                            "pass --wheel FILE") from None
        files.append((rel, data))
    wheel_meta = dict(files).get(f"{info_dir}/WHEEL", b"").decode("utf-8", "replace")
    if info_dir is None or "Root-Is-Purelib: true" not in wheel_meta or "Tag: py3-none-any" not in wheel_meta:
        raise BurnError("the installed pibake is not a pure-Python py3-none-any installation with a .dist-info "
                        "(RECORD, WHEEL); install it with pip, or pass --wheel FILE")
    return info_dir, files


def build_wheel_bytes(info_dir, files):
    """A wheel (zip bytes) of ``files`` [(path, bytes)] with a fresh ``info_dir/RECORD`` (sha256 + size of
    every file, as the wheel format asks); dist-info files last, RECORD the very last."""
    ordered = sorted(files, key=lambda f: (f[0].startswith(info_dir + "/"), f[0]))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for rel, data in ordered:
        writer.writerow([rel, _record_hash(data), len(data)])
    writer.writerow([f"{info_dir}/RECORD", "", ""])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, data in ordered + [(f"{info_dir}/RECORD", record.getvalue().encode())]:
            info = zipfile.ZipInfo(rel, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


def wheel_from_installed(dist=None, *, cache_dir=None):
    """The wheel of the installed pibake that is running (``pip install .`` or from a wheel), put together again
    from its installed files and metadata (no build tools, no network), cached by its contents."""
    dist = dist or _running_distribution()
    if dist is None:
        raise BurnError("cannot make the pibake wheel the manager installs: this pibake runs neither from a source "
                        "checkout nor from a pip-installed distribution; pass --wheel FILE (in a checkout: "
                        "python3 -m pip wheel --no-deps . -w dist)")
    info_dir, files = installed_wheel_files(dist)
    data = build_wheel_bytes(info_dir, files)
    version = dist.metadata["Version"]
    name = f"pibake-{version}-py3-none-any.whl"
    if not _WHEEL_RE.match(name):
        raise BurnError(f"the installed pibake has an unusable version {version!r}; pass --wheel FILE")
    cache = Path(cache_dir) if cache_dir else wheel_cache_dir()
    key_dir = cache / f"installed-{hashlib.sha256(data).hexdigest()[:16]}"
    target = key_dir / name
    if not target.is_file():
        key_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
        LOG.info("made %s from the installed pibake (%d files) into the cache %s", name, len(files), key_dir)
        _prune_wheel_cache(cache, keep=key_dir)
    return target


def _wheel_from_checkout(root, cache_dir):
    cache = Path(cache_dir) if cache_dir else wheel_cache_dir()
    key_dir = cache / _source_digest(root)
    name = f"pibake-{pibake.__version__}-py3-none-any.whl"
    cached = key_dir / name
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="pibake-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for f in _SOURCE_FILES:
            if (root / f).is_file():
                shutil.copy2(root / f, src / f)
        for part in _SOURCE_PARTS:
            shutil.copytree(root / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(tmp) / "dist"
        last = None
        # The installed setuptools + wheel first (fast, offline); then pip's isolated build environment.
        for extra in (["--no-build-isolation"], []):
            try:
                run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", *extra,
                     str(src), "-w", str(out)], timeout=600)
                break
            except PibakeError as exc:
                last = exc
        else:
            raise BurnError(f"cannot build the pibake wheel the manager installs ({last}); build one with "
                            "`python3 -m pip wheel --no-deps . -w dist` and pass --wheel dist/pibake-*.whl")
        built = sorted(out.glob("pibake-*-py3-none-any.whl"))
        if not built:
            raise BurnError("pip built no pibake-*-py3-none-any.whl; pass --wheel FILE")
        key_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(key_dir / built[0].name, built[0].read_bytes())
        LOG.info("built %s into the cache %s", built[0].name, key_dir)
        _prune_wheel_cache(cache, keep=key_dir)
        return key_dir / built[0].name


def _prune_wheel_cache(cache, keep, newest=4):
    """Every source change builds a wheel: keep the ``newest`` few, delete older ones."""
    try:
        entries = sorted((d for d in cache.iterdir() if d.is_dir() and d != keep),
                         key=lambda d: d.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in entries[newest - 1:]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """Everything checked and rendered before any target is touched."""

    cluster: object
    nodes: list
    seeds: dict  # hostname -> Seed
    wheel: Path | None
    family: str
    image: object = None  # images.LocalImage
    raw_path: Path | None = None  # raw (decompressed) image to write
    raw_size: int = 0
    spool_dir: str | None = None
    image_from_raw_cache: bool = False
    raw_sha256: str | None = None  # of raw_path, from the per-identity cache: hashed once for a batch


def _image_family(cluster, image_name):
    try:
        catalog = images.load_catalog()
    except PibakeError:
        return cluster.family
    entry = catalog.get(str(image_name))
    return entry.family if entry else cluster.family


def render_checked_seeds(cluster, cluster_dir, nodes, family, baked=None):
    """{hostname: Seed}, every seed linted; SeedError naming each failing host, nothing written. ``baked``: the
    image's bake marker (nodes of its role get seeds without the packages it holds)."""
    return {node.hostname: seed
            for node, seed, _ in render_checked(cluster, cluster_dir, nodes, family=family, baked=baked)}


def _seeds_for_baked_image(cluster_dir, prepared):
    """A baked image (``pibake image bake``) already holds its role's packages: render the seeds of that role
    again without them (no apt at first boot). A plain image keeps the seeds rendered by ``prepare``."""
    baked = golden.read_marker(prepared.raw_path)
    if not any(golden.baked_packages(baked, node.role) for node in prepared.nodes):
        return None
    LOG.info("the image is baked for %s: the seeds leave out its packages", baked["role"])
    cluster = prepared.cluster
    seed_cluster = replace(cluster, family=prepared.family) if prepared.family != cluster.family else cluster
    prepared.seeds = render_checked_seeds(seed_cluster, cluster_dir, prepared.nodes, prepared.family, baked=baked)
    return baked


def prepare(cluster_dir, *, hostnames=None, ips=None, role=None, inventory=None, image=None, wheel=None):
    """Plan, render and lint (steps 1-3). No target, no download."""
    cluster = load_cluster(cluster_dir)
    if not inventory and not (hostnames and ips):
        raise PlanError("say which nodes: --hostname HOSTLIST and --ip IPLIST (or --inventory FILE)")
    nodes = resolve_plan(cluster, hostnames=hostnames, ips=ips, role=role, inventory=inventory)
    family = _image_family(cluster, image or cluster.image)
    seed_cluster = replace(cluster, family=family) if family != cluster.family else cluster
    seeds = render_checked_seeds(seed_cluster, cluster_dir, nodes, family)
    wheel_path = manager_wheel(wheel) if any(n.role == "manager" for n in nodes) else None
    return Prepared(cluster=cluster, nodes=nodes, seeds=seeds, wheel=wheel_path, family=family)


def _raw_image(prepared, image_name, *, sha256=None, progress=None, cache_dir=None):
    """Resolve the image and make sure a raw (decompressed) file of it exists (step 5)."""
    local = images.resolve_image(image_name, sha256=sha256, cache_dir=cache_dir,
                                 progress=(lambda d, t: progress("download", d, t)) if progress else None)
    prepared.image = local
    if local.format == "none":
        prepared.raw_path = Path(local.path)
    else:
        # An image whose sha256 is known (catalog, or --sha256) is decompressed once and kept, sparse, in
        # the raw cache; any other compressed file goes to a scratch folder removed after the burn.
        cached = raw_cache_dir(cache_dir) / f"{local.sha256}.img" if local.sha256 else None
        if cached is not None and cached.is_file():
            LOG.info("using the decompressed image %s", cached)
            prepared.raw_path = cached
            prepared.image_from_raw_cache = True
        else:
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                scratch = cached.parent
            else:
                prepared.spool_dir = tempfile.mkdtemp(prefix="pibake-raw-", dir=os.environ.get("TMPDIR"))
                scratch = Path(prepared.spool_dir)
            raw = scratch / f".image-{os.getpid()}-{uuid.uuid4().hex[:8]}.raw"
            LOG.info("decompressing %s into %s", local.path, raw)
            total = images.uncompressed_size(local)
            try:
                with images.open_image_stream(local) as stream:
                    writer.spool_stream(stream, raw, progress=(lambda d, t=None: progress("decompress", d, total or d))
                                        if progress else None)
                final = cached if cached is not None else scratch / "image.raw"
                os.replace(raw, final)  # not atomic_write: the image was streamed (GBs); just rename it
            except BaseException:
                raw.unlink(missing_ok=True)
                raw.with_name(raw.name + ".partial").unlink(missing_ok=True)
                raise
            prepared.raw_path = final
    prepared.raw_size = os.path.getsize(prepared.raw_path)
    if prepared.raw_size == 0:
        raise BurnError(f"image {local.path} is empty")
    prepared.raw_sha256 = images.raw_sha256(prepared.raw_path, cache_dir=cache_dir)
    return prepared


def raw_cache_dir(cache_dir=None):
    """Where decompressed images of known sha256 are kept (sparse files; delete them any time)."""
    images_dir = Path(cache_dir) if cache_dir else images.default_cache_dir()
    return images_dir.parent / "raw"


def _cleanup(prepared):
    if prepared.spool_dir:
        shutil.rmtree(prepared.spool_dir, ignore_errors=True)
        prepared.spool_dir = None


# --------------------------------------------------------------------------- one card


def _progress_hook(progress, hostname):
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    if not progress and not delay:
        return None

    def hook(done, total):
        if progress:
            progress(hostname, done, total)
        if delay:
            time.sleep(delay)

    return hook


def _wheel_files(prepared, node):
    if node.role != "manager" or prepared.wheel is None:
        return {}
    return {f"{WHEEL_DIR_ON_BOOT}/{prepared.wheel.name}": prepared.wheel.read_bytes()}


def _card_facts(target):
    if target.kind != "block":
        return {}
    try:
        ident = devices.card_identity(target)
    except OSError as exc:
        raise BurnError(f"cannot read {target.path}: {exc.strerror}") from None
    return {"model": ident.model, "serial": ident.serial, "size": ident.size, "disk_id_before": ident.disk_id,
            "serial_identifies_card": ident.serial_identifies_card}


def burn_one(cluster_dir, prepared, node, target, *, verify=True, sparse=True, progress=None,
             facts_provider=None):
    """Write image + seed to one checked ``devices.Target``; record it in the manifest. Returns a BurnResult."""
    seed = prepared.seeds[node.hostname]
    started = time.monotonic()
    image_info = {"name": prepared.image.name, "path": str(prepared.image.path), "sha256": prepared.image.sha256,
                  "format": prepared.image.format, "raw_cached": prepared.image_from_raw_cache}
    result = BurnResult(hostname=node.hostname, ip=node.ip, role=node.role, target=target.path,
                        target_kind=target.kind, instance_id=seed.instance_id, image=image_info)
    result.card = _card_facts(target)
    result.burn_id = manifest.start(
        cluster_dir, action="burn", hostname=node.hostname, ip=node.ip, role=node.role,
        instance_id=seed.instance_id, image=image_info, target=target.path, target_kind=target.kind,
        card=result.card, mode="sparse" if sparse else "full")
    fd = None
    try:
        if target.kind == "block":
            fd = devices.open_target(target, facts_provider=facts_provider)
            dest = fd
        else:
            dest = target.path
        written = writer.write_image(str(prepared.raw_path), dest, sparse=sparse, verify=verify,
                                     progress=_progress_hook(progress, node.hostname),
                                     image_sha256=prepared.raw_sha256)
        result.image["raw_sha256"] = written.image_sha256
        result.bytes_written, result.bytes_skipped = written.bytes_written, written.bytes_skipped
        result.written_sha256, result.verified = written.written_sha256, written.verified
        # The exclusive fd stays open while the seed is written: nothing can mount the card meanwhile.
        if target.kind == "block":
            bootpart.flush_block_device(target.path)  # no page cached before the write may answer a read now
        seeded = bootpart.write_seed(target.path, seed, extra_files=_wheel_files(prepared, node),
                                     config_lines=ROLE_BOOT_CONFIG.get(node.role, ()))
        result.seed = {"files": seeded["files"], "cmdline": seeded["cmdline"], "config_txt": seeded["config_txt"],
                       "partition": seeded["partition"]["number"], "verified": seeded["verified"]}
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, PibakeError) else (
            "interrupted" if isinstance(exc, KeyboardInterrupt) else f"internal error: {exc.__class__.__name__}")
        result.error = reason
        result.manifest_status = "failed"
        result.seconds = round(time.monotonic() - started, 3)
        manifest.finish(cluster_dir, result.burn_id, "failed", reason=reason, seconds=result.seconds)
        if not isinstance(exc, PibakeError):
            raise
        return result
    finally:
        if fd is not None:
            os.close(fd)
    result.seconds = round(time.monotonic() - started, 3)
    result.manifest_status = "complete"
    manifest.finish(cluster_dir, result.burn_id, "complete", written_sha256=result.written_sha256,
                    raw_sha256=result.image.get("raw_sha256"), bytes_written=result.bytes_written,
                    bytes_skipped=result.bytes_skipped, verified=result.verified,
                    seed_files=result.seed["files"], seconds=result.seconds)
    LOG.info("burned %s to %s in %.1f s", node.hostname, target.path, result.seconds)
    return result


# --------------------------------------------------------------------------- targets


def check_write_target(path, prepared, *, allow_non_removable=False, max_bytes=devices.DEFAULT_MAX_BYTES,
                       facts=None):
    """The guard (E) plus: the image must fit, and an output file must not be the image itself."""
    target = devices.check_target(path, allow_non_removable=allow_non_removable, max_bytes=max_bytes, facts=facts)
    if target.kind == "block" and target.size is not None and target.size < prepared.raw_size:
        raise BurnError(f"refusing {target.path}: it holds {devices.human_size(target.size)} but the image needs "
                        f"{devices.human_size(prepared.raw_size)}; use a larger card")
    if target.kind == "file" and target.exists:
        for src in {Path(prepared.raw_path), Path(prepared.image.path)}:
            if os.path.samefile(target.path, src):
                raise BurnError(f"refusing {path}: it is the image itself; choose another --output")
    return target


def default_probe(device, *, allow_non_removable=False, max_bytes=devices.DEFAULT_MAX_BYTES):
    """(CardIdentity or None, seed instance-id or None) of the card now in ``device``."""
    try:
        target = devices.check_target(device, allow_non_removable=allow_non_removable, max_bytes=max_bytes)
    except devices.GuardError as exc:
        if "no card" in str(exc) or "size 0" in str(exc):
            return None, None
        raise
    try:
        ident = devices.card_identity(target)
    except OSError:
        return None, None
    try:
        seed = bootpart.read_seed(target.path)
    except PibakeError:
        seed = None
    return ident, (seed.instance_id if seed else None)


def wait_for_next_card(device, hostname, burned, *, ask, probe):
    """Ask for the next card until one that was not burned in this batch is in ``device``."""
    message = f"Insert the card for {hostname} into {device}, then press Enter"
    while True:
        ask(message)
        try:
            identity, iid = probe(device)
        except PibakeError as exc:  # e.g. the desktop mounted the new card: say so and let the person fix it
            message = f"{exc}; fix that, then press Enter"
            continue
        verdict, why = next_card_verdict(burned, identity, iid)
        LOG.info("card check on %s: %s (%s)", device, verdict, why)
        if verdict == "new":
            return identity
        message = f"{why} in {device}: insert the card for {hostname}, then press Enter"


# --------------------------------------------------------------------------- burn


def burn(cluster_dir, *, hostnames=None, ips=None, role=None, inventory=None, devices_=(), output=None,
         image=None, sha256=None, verify=True, sparse=True, allow_non_removable=False,
         max_bytes=devices.DEFAULT_MAX_BYTES, wheel=None, confirm=None, ask=None, probe=None, progress=None,
         facts_provider=None, cache_dir=None, board=None, bake=False, bake_mirror=None, bake_progress=None):
    """Burn one or more nodes; return a list of ``BurnResult`` (one per card or file).

    ``bake``: first bake the nodes' role's packages into the image (``pibake.bake.golden.bake_image``, cached;
    apt fetches from ``bake_mirror``; ``bake_progress(line)`` gets its messages), then burn the baked image.
    A baked image (given, or made here) gets seeds that install nothing at first boot.
    ``confirm(prompt) -> bool`` is asked before erasing each card (None: confirmed, i.e. --yes).
    ``ask(message)`` waits for a person to swap cards between rounds (None: a batch that needs a card
    swap is refused). ``probe(device)`` reads the card identity (default ``default_probe``).
    ``progress(label, done, total)`` reports download, decompression and per-host write progress.
    ``board`` (``pibake.model.BOARDS``: zero, zero-w, zero2-w, pi3, pi4, pi5) picks the catalog image of
    the cluster's family built for that board (armhf for a Pi Zero / Zero W) when no ``image`` is given.
    Raises PibakeError before anything is written when a check fails.
    """
    devices_ = [d for d in (devices_ or ()) if d]
    if board is not None:
        image = images.image_for_board(image or load_cluster(cluster_dir).image, board)
    elif inventory or (hostnames and ips):
        image = boards_image(cluster_dir, image, hostnames=hostnames, ips=ips, role=role, inventory=inventory)
    if bool(devices_) == bool(output):
        raise BurnError("say where to write: --device /dev/sdX (cards) or --output 'out/{hostname}.img' (files), "
                        "not both")
    if len(set(devices_)) != len(devices_):
        raise BurnError(f"--device names the same device twice: {','.join(devices_)}")
    prepared = prepare(cluster_dir, hostnames=hostnames, ips=ips, role=role, inventory=inventory, image=image,
                       wheel=wheel)
    nodes = prepared.nodes
    if devices_ and len(devices_) > len(nodes):
        raise BurnError(f"{len(devices_)} devices for {len(nodes)} host(s): give one device per card to burn")
    if devices_ and len(nodes) > len(devices_) and ask is None:
        raise BurnError(f"{len(nodes)} hosts on {len(devices_)} device(s) needs a card swap between burns: "
                        "run interactively, or give one --device per host")
    paths = output_paths(output, nodes) if output else None

    try:
        if bake:
            roles = sorted({node.role for node in nodes})
            if len(roles) != 1:
                raise BurnError(f"--bake bakes one role's image: these hosts have roles {', '.join(roles)}; "
                                "burn one role at a time")
            baked = bake_image(image or prepared.cluster.image, cluster_dir, roles[0], sha256=sha256,
                                      image_cache_dir=cache_dir, mirror=bake_mirror, progress=bake_progress)
            image, sha256 = str(baked.path), None
        _raw_image(prepared, image or prepared.cluster.image, sha256=sha256, progress=progress, cache_dir=cache_dir)
        _seeds_for_baked_image(cluster_dir, prepared)
        facts = facts_provider() if facts_provider else None
        guard = {"allow_non_removable": allow_non_removable, "max_bytes": max_bytes}
        write = {"verify": verify, "sparse": sparse, "progress": progress, "facts_provider": facts_provider}
        if paths:
            created = _make_parents(paths.values())
            try:
                targets = {h: check_write_target(p, prepared, facts=facts, **guard) for h, p in paths.items()}
            except BaseException:
                for folder in reversed(created):
                    try:
                        folder.rmdir()  # only folders this call created, and only while empty
                    except OSError:
                        pass
                raise
            record_plan(cluster_dir, nodes)  # every check passed: from here on things are written
            return [burn_one(cluster_dir, prepared, node, targets[node.hostname], **write) for node in nodes]
        return _burn_devices(cluster_dir, prepared, devices_, guard, write, confirm=confirm, ask=ask,
                             probe=probe or (lambda d: default_probe(d, **guard)), facts=facts,
                             before_first_write=lambda: record_plan(cluster_dir, nodes))
    finally:
        _cleanup(prepared)


def boards_image(cluster_dir, image, *, hostnames=None, ips=None, role=None, inventory=None):
    """The image to burn when no --board is given: the one the ``board`` of cluster.yaml's ``nodes:`` needs for
    the nodes of this burn (armhf for a Pi Zero / Zero W), ``image`` when none of them has a board. One burn
    writes one image: nodes that need different images are a BurnError naming them."""
    cluster = load_cluster(cluster_dir)
    if not cluster.boards:
        return image
    base = image or cluster.image
    nodes = resolve_plan(cluster, hostnames=hostnames, ips=ips, role=role, inventory=inventory)
    wanted = {}  # image -> [hostname (board)]
    for node in nodes:
        node_board = cluster.board_of(node.hostname)
        name = images.image_for_board(base, node_board)
        wanted.setdefault(name, []).append(f"{node.hostname} ({node_board or 'no board'})")
    if len(wanted) > 1:
        needs = "; ".join(f"{', '.join(hosts)} need{'s' if len(hosts) == 1 else ''} {name}"
                          for name, hosts in sorted(wanted.items()))
        raise BurnError(f"one burn writes one image, and the boards in cluster.yaml's nodes: need more: {needs}; "
                        "burn them in separate runs, or give --board")
    (name,) = wanted
    return image if name == base else name


def _make_parents(paths):
    """Create the missing folders of output paths; return the folders created, outermost first."""
    created = []
    for path in paths:
        missing = []
        folder = Path(path).absolute().parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            created.append(folder)
    return created


def _burn_devices(cluster_dir, prepared, device_paths, guard, write, *, confirm, ask, probe, facts,
                  before_first_write=None):
    results, burned = [], {d: [] for d in device_paths}
    for number, batch in enumerate(rounds(prepared.nodes, len(device_paths))):
        pairs = list(zip(device_paths, batch))
        try:
            if number > 0:
                for device, node in pairs:
                    wait_for_next_card(device, node.hostname, burned[device], ask=ask, probe=probe)
                facts = None  # new cards: read this machine's facts again
            targets = {}
            for device, node in pairs:
                targets[device] = check_write_target(device, prepared, facts=facts, **guard)
            if confirm is not None:
                for device, node in pairs:
                    question = devices.confirmation_prompt(targets[device]).replace(
                        "Continue?", f"Burn {node.hostname} ({node.ip}) on it?")
                    if not confirm(question):
                        raise BurnError(f"not confirmed: nothing written to {device}")
        except PibakeError as exc:
            if not results:
                raise
            done = ", ".join(r.hostname for r in results if r.ok)
            left = ", ".join(n.hostname for n in prepared.nodes[len(results):])
            raise BurnError(f"{exc} (burned: {done}; not burned: {left})") from None
        if number == 0 and before_first_write is not None:
            before_first_write()
        if len(pairs) == 1:
            device, node = pairs[0]
            round_results = [burn_one(cluster_dir, prepared, node, targets[device], **write)]
        else:
            with ThreadPoolExecutor(max_workers=len(pairs), thread_name_prefix="pibake-burn") as pool:
                futures = [pool.submit(burn_one, cluster_dir, prepared, node, targets[device], **write)
                           for device, node in pairs]
                round_results = [f.result() for f in futures]
        results.extend(round_results)
        for (device, node), res in zip(pairs, round_results):
            if res.ok:
                burned[device].append({"identity": devices.card_identity(targets[device]),
                                       "instance_id": res.instance_id})
        if any(not r.ok for r in round_results):
            left = prepared.nodes[len(results):]
            if left:
                LOG.warning("stopping the batch: %d host(s) not burned: %s", len(left),
                            ", ".join(n.hostname for n in left))
            break
    return results


# --------------------------------------------------------------------------- reseed


def detect_family(target, default):
    """The image family of a burned card or image, from its boot partition's files; ``default`` if unsure."""
    part = bootpart.find_boot_partition(target)
    names = set(bootpart.list_files(part))
    if "vmlinuz" in names or "initrd.img" in names:
        return "ubuntu"
    if "kernel8.img" in names or "kernel_2712.img" in names or "issue.txt" in names:
        return "raspios"
    return default


def reseed(cluster_dir, *, device=None, image_file=None, hostname, ip, role=None, confirm=None,
           allow_non_removable=False, max_bytes=devices.DEFAULT_MAX_BYTES, wheel=None):
    """Replace the seed on a burned card (``device``) or image file (``image_file``); the OS is not rewritten.

    A fresh instance-id makes cloud-init run again on the next boot. Returns a ``BurnResult``
    (action "reseed"), recorded in the manifest like a burn.
    """
    if bool(device) == bool(image_file):
        raise BurnError("say what to reseed: --device /dev/sdX or --image FILE.img (one of them)")
    cluster = load_cluster(cluster_dir)
    nodes = resolve_plan(cluster, hostnames=hostname, ips=ip, role=role)
    if len(nodes) != 1:
        raise PlanError(f"reseed writes one card: --hostname {hostname} names {len(nodes)} hosts")
    node = nodes[0]
    if image_file:
        target = devices.check_target(image_file)
        if target.kind != "file" or not target.exists:
            raise BurnError(f"image file {image_file} does not exist: check the path")
    else:
        target = devices.check_target(device, allow_non_removable=allow_non_removable, max_bytes=max_bytes)
        if target.kind != "block":
            raise BurnError(f"{device} is not a block device: use --image for an image file")
    family = detect_family(target.path, cluster.family)
    seed_cluster = replace(cluster, family=family) if family != cluster.family else cluster

    seed = render_checked_seeds(seed_cluster, cluster_dir, [node], family,
                                baked=read_marker(target.path))[node.hostname]
    prepared = Prepared(cluster=cluster, nodes=[node], seeds={node.hostname: seed}, family=family,
                        wheel=manager_wheel(wheel) if node.role == "manager" else None)
    previous = bootpart.read_seed(target.path)
    if confirm is not None and target.kind == "block":
        d = target.device
        model = (d.model or ("loop device" if d.type == "loop" else "unknown model")) if d else "unknown model"
        what = f"{model}, {devices.human_size(target.size)}, serial {(d.serial if d else None) or 'none reported'}"
        if not confirm(f"About to replace the seed on {target.path} ({what}) with {node.hostname} ({node.ip}); "
                       "the OS stays as it is. Continue?"):
            raise BurnError(f"not confirmed: nothing written to {target.path}")
    record_plan(cluster_dir, [node])
    started = time.monotonic()
    result = BurnResult(hostname=node.hostname, ip=node.ip, role=node.role, target=target.path,
                        target_kind=target.kind, instance_id=seed.instance_id, action="reseed")
    result.card = _card_facts(target)
    result.burn_id = manifest.start(
        cluster_dir, action="reseed", hostname=node.hostname, ip=node.ip, role=node.role,
        instance_id=seed.instance_id, previous_instance_id=previous.instance_id if previous else None,
        target=target.path, target_kind=target.kind, card=result.card)
    fd = None
    try:
        if target.kind == "block":
            fd = devices.open_target(target)
        seeded = bootpart.write_seed(target.path, seed, extra_files=_wheel_files(prepared, node),
                                     config_lines=ROLE_BOOT_CONFIG.get(node.role, ()))
    except PibakeError as exc:
        manifest.finish(cluster_dir, result.burn_id, "failed", reason=str(exc))
        raise
    except BaseException as exc:
        manifest.finish(cluster_dir, result.burn_id, "failed", reason=f"interrupted ({exc.__class__.__name__})")
        raise
    finally:
        if fd is not None:
            os.close(fd)
    result.seed = {"files": seeded["files"], "cmdline": seeded["cmdline"], "config_txt": seeded["config_txt"],
                   "partition": seeded["partition"]["number"], "verified": seeded["verified"],
                   "previous_instance_id": previous.instance_id if previous else None}
    result.verified = seeded["verified"]
    result.seconds = round(time.monotonic() - started, 3)
    result.manifest_status = "complete"
    manifest.finish(cluster_dir, result.burn_id, "complete", seed_files=seeded["files"], seconds=result.seconds)
    return result


def bake_image(name_or_path, cluster_dir, role, *, sha256=None, cache_dir=None, image_cache_dir=None, mirror=None,
               offline=False, progress=None):
    """Bake ``role``'s packages (its seed's list, in ``cluster_dir``'s cluster) into a copy of a catalog image
    or an image file; a ``BakedImage`` (cached per image sha256, role and package set)."""
    if role not in ROLES:
        raise BakeError(f"--role {role}: not a role ({', '.join(ROLES)})")
    packages = cluster_role_packages(load_cluster(cluster_dir), role)
    prepared = Prepared(cluster=None, nodes=[], seeds={}, wheel=None, family="")
    try:
        _raw_image(prepared, name_or_path, sha256=sha256, cache_dir=image_cache_dir)
        return golden.bake_raw_image(prepared.raw_path, image_sha256=prepared.raw_sha256,
                                     source_name=prepared.image.name, role=role, packages=packages,
                                     cache_dir=cache_dir, mirror=mirror, offline=offline, progress=progress)
    finally:
        _cleanup(prepared)
