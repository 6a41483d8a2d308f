"""Starting slurmd without systemd: it exits when the controller is not reachable yet, so the agent
retries with backoff until the deadline (a real child process each time; an injected clock)."""

import pytest

from pibake.firstboot import agent
from tests.firstboot.conftest import FakeTime

FLAKY = ("n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; "
         "[ $n -ge {ok} ] || {{ echo 'slurmd: error: slurmd initialization failed' >&2; exit 1; }}")


def services(t, deadline, **kw):
    return agent.Services("sysv", deadline=deadline, backoff_base=1.0, backoff_max=4.0, sleep=t.sleep,
                          clock=t.clock, rand=lambda: 1.0, **kw)


def test_slurmd_start_is_retried_until_it_works(tmp_path):
    t = FakeTime()
    services(t, deadline=100)._start_slurmd(["sh", "-c", FLAKY.format(f=tmp_path / "n", ok=3)])
    assert (tmp_path / "n").read_text().strip() == "3"
    assert t.sleeps == [1.0, 2.0]


def test_slurmd_start_gives_up_at_the_deadline_with_the_reason(tmp_path):
    t = FakeTime()
    with pytest.raises(agent.AgentError, match=r"failed \(exit 1\): slurmd: error: slurmd initialization failed "
                                               r"\(gave up after 4 attempts\)"):
        services(t, deadline=7)._start_slurmd(["sh", "-c", FLAKY.format(f=tmp_path / "n", ok=99)])
    assert t.sleeps == [1.0, 2.0, 4.0] and t.now == 7


def test_slurmd_start_once(tmp_path):
    t = FakeTime()
    with pytest.raises(agent.AgentError, match="initialization failed$"):
        services(t, deadline=100, once=True)._start_slurmd(["sh", "-c", FLAKY.format(f=tmp_path / "n", ok=2)])
    assert t.sleeps == []


def test_mode_none_touches_nothing():
    assert agent.Services("none").ensure("slurmd", restart=True) == "skipped"


def test_auto_mode_follows_pid1(monkeypatch):
    monkeypatch.setattr(agent, "systemd_is_pid1", lambda: True)
    assert agent.Services("auto").mode == "systemd"
    monkeypatch.setattr(agent, "systemd_is_pid1", lambda: False)
    assert agent.Services("auto").mode == "sysv"
