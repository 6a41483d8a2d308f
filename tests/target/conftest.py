"""The target tests run last, and the arm64 image they boot is built in the background from the start of the
session: its first build (maintainer scripts under qemu-user) takes far longer than the rest of the suite,
and it needs mostly one CPU, so the other tests run meanwhile. The tests' `target_image` fixture then waits
on the build's lock (pibake.lab.target.ensure_target_image). The build's output: <cache>/build.log."""

import os
import shutil
import subprocess
import sys

from tests.conftest import running_as_root

BACKGROUND = {}


def _can_build():
    tools = ("mmdebstrap", "arch-test", "qemu-system-aarch64", "debootstrap")
    return running_as_root() and all(shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in tools)


def pytest_collection_modifyitems(session, config, items):
    target = [item for item in items if item.get_closest_marker("target")]
    if not target:
        return
    items[:] = [item for item in items if not item.get_closest_marker("target")] + target
    from pibake.lab.target import DEFAULT_CACHE_DIR, cached_target_image

    if "PIBAKE_NO_BACKGROUND_BUILD" in os.environ or not _can_build() or cached_target_image():
        return
    DEFAULT_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    log = open(DEFAULT_CACHE_DIR / "build.log", "ab")
    # nice: the tests running meanwhile come first; the fixture waits on the build's lock
    BACKGROUND["proc"] = subprocess.Popen(
        ["nice", "-n", "10", sys.executable, "-m", "pibake", "lab", "target-image"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    print(f"target image: building in the background (log: {DEFAULT_CACHE_DIR / 'build.log'})", file=sys.stderr)


def pytest_sessionfinish(session, exitstatus):
    proc = BACKGROUND.get("proc")
    if proc is not None and proc.poll() is None:
        proc.terminate()  # an interrupted session: the build leaves no stamp and is redone next time
