"""pibake.connect's local connector runs programs through pibake.run and reports every end as an Output
(a connector reports a host; it does not raise)."""

from pibake.connect import LocalConnector


def test_exit_code_output_and_stdin():
    out = LocalConnector().run("red00", ["sh", "-c", "cat; echo oops >&2; exit 3"], input="hello\n")
    assert (out.host, out.rc, out.stdout, out.stderr, out.ok) == ("red00", 3, "hello\n", "oops\n", False)
    assert out.reason() == "oops"


def test_a_missing_program_and_a_timeout_are_outputs():
    missing = LocalConnector().run("red00", ["pibake-no-such-program"])
    assert (missing.rc, missing.stderr) == (127, "pibake-no-such-program: command not found")
    slow = LocalConnector().run("red00", ["sleep", "5"], timeout=0.2)
    assert (slow.rc, slow.reason()) == (124, "no answer within 0.2 s")
