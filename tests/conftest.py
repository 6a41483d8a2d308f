"""Skips for what a machine lacks, and the CI rule for them.

On a developer's machine a test that needs root, namespaces, cloud-init, Slurm, Chromium, a Debian package
or a test extra skips, its reason naming what is missing (``needs_root``, ``needs_program``, or
``pytest.skip("...")`` in a fixture). When the environment variable ``CI`` is set (non-empty), such a skip
FAILS instead, with the same reason: CI must prove everything, so a missing package there is a broken
set-up, not a pass.

Fail closed: every skip counts as "something is missing" unless its reason starts with NOT_APPLICABLE
(``not_applicable(why)``), for a test that does not apply to this kind of machine at all and never will
(it would start real units where systemd is PID 1; it checks behaviour off a Raspberry Pi). xfail is not
affected.
"""

import os
import shutil

import pytest

NOT_APPLICABLE = "not applicable here: "
pytest_plugins = ["tests.fixtures_plugin"]  # the shared fixtures: cluster dir, ssh key, lab rootfs, labs


def running_as_root():
    """The one root check of the suite (also for a test whose expected outcome depends on it)."""
    return os.geteuid() == 0


def needs_root(reason="needs root"):
    return pytest.mark.skipif(not running_as_root(), reason=reason)


def needs_program(*names):
    missing = [n for n in names if not (shutil.which(n) or shutil.which(n, path="/usr/sbin:/sbin"))]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def not_applicable(why):
    """A skip reason the CI rule leaves alone: the test does not apply to this machine (see above)."""
    return NOT_APPLICABLE + why


def _missing_under_ci(report):
    """Turn a skip for something missing into a failure when CI is set (report changed in place)."""
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")
    if reason.startswith(NOT_APPLICABLE):
        return
    report.outcome = "failed"
    report.longrepr = (f"CI is set, so this skip fails: {reason}\n"
                       "(install or enable it on the CI machine: scripts/setup; see tests/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
    report = yield
    _missing_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):  # pylint: disable=unused-argument
    report = yield  # a module-level skip or importorskip
    _missing_under_ci(report)
    return report
