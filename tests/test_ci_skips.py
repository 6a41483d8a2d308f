"""The CI rule of tests/conftest.py: with CI set, a skip for something missing fails, naming it; without
CI it stays a skip; a not-applicable skip stays a skip either way."""

from pathlib import Path

import pytest

from tests.conftest import running_as_root

pytest_plugins = ["pytester"]

INNER = '''
import pytest
from conftest import needs_program, needs_root, not_applicable

@needs_program("pibake-no-such-program")
def test_needs_a_missing_program():
    pass

@pytest.fixture
def lab():
    pytest.skip("namespaces: the kernel has no overlayfs")

def test_fixture_skips_for_a_missing_capability(lab):
    pass

def test_does_not_apply_here():
    pytest.skip(not_applicable("systemd is PID 1 here"))

@needs_root()
def test_runs_when_it_can():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
'''


@pytest.fixture
def suite(pytester, monkeypatch):
    # the real conftest (it registers tests.fixtures_plugin, importable from the checkout)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER,
                        test_extra='import pytest\npytest.importorskip("pibake_no_such_module")\n')
    return pytester


def test_without_ci_missing_things_skip(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("-rs")
    root = int(running_as_root())
    result.assert_outcomes(passed=root, skipped=5 - root, xfailed=1)
    result.stdout.fnmatch_lines(["*not installed: pibake-no-such-program*"])


def test_with_ci_missing_things_fail_naming_what_is_missing(suite, monkeypatch):
    monkeypatch.setenv("CI", "1")
    result = suite.runpytest_subprocess("-rfEs", "--continue-on-collection-errors")
    root = int(running_as_root())
    # skips in setup (marks, fixtures) and at import become errors: the run fails, each naming what is
    # missing; the not-applicable skip stays a skip
    result.assert_outcomes(passed=root, skipped=1, xfailed=1, errors=3 + (1 - root))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "*CI is set, so this skip fails: not installed: pibake-no-such-program*",
        "*CI is set, so this skip fails: namespaces: the kernel has no overlayfs*",
        "*CI is set, so this skip fails: could not import 'pibake_no_such_module'*",
    ], consecutive=False)
    assert "systemd is PID 1 here" in result.stdout.str()
