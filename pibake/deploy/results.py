"""What a deploy reports: one HostResult per host, the DeployReport, the summary line and the table (pure)."""

import json
from dataclasses import asdict, dataclass, field

from pibake.tables import text_table

STEPS = ("connect", "facts", "packages", "files", "agent", "idle")
MANAGER_STEPS = ("connect", "facts", "packages", "files", "install", "registry", "agent", "ready")


@dataclass
class HostResult:
    """What happened on one host (the manager too: role "manager", last step "ready")."""

    host: str  # as given in --hosts (name or IP): what ssh connects to
    hostname: str | None = None  # the machine's hostname (what it enrolled as)
    role: str = "worker"  # worker, or manager (set up first when its registry does not answer)
    step: str = "connect"  # the last step reached: one of STEPS (MANAGER_STEPS for the manager)
    status: str = "pending"  # changed | unchanged | failed (pending/running while deploy runs)
    duration_s: float = 0.0
    changes: list = field(default_factory=list)  # what was changed, e.g. "installed slurmd", "/etc/hosts"
    error: str | None = None
    slurm_state: str | None = None
    timings: dict = field(default_factory=dict)  # seconds spent in each step that ran

    def to_dict(self):
        d = asdict(self)
        d["duration_s"] = round(self.duration_s, 3)
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d


@dataclass
class DeployReport:
    """The result of one deploy: one HostResult per host, in the order given."""

    hosts: list
    manager: str
    registry: str
    parallel: int
    started_at: str
    duration_s: float

    @property
    def failed(self):
        return [h for h in self.hosts if h.status == "failed"]

    @property
    def ok(self):
        return not self.failed

    @property
    def exit_code(self):
        return 0 if self.ok else 1

    def summary(self):
        return summarize(self.hosts)

    def to_dict(self):
        return {
            "manager": self.manager,
            "registry": self.registry,
            "parallel": self.parallel,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "summary": self.summary(),
            "hosts": [h.to_dict() for h in self.hosts],
        }

    def to_json(self):
        """Exactly what ``pibake deploy --json`` prints on stdout."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def summarize(results):
    """{"hosts": N, "changed": a, "unchanged": b, "failed": c} (pure)."""
    out = {"hosts": len(results), "changed": 0, "unchanged": 0, "failed": 0}
    for r in results:
        if r.status in out:
            out[r.status] += 1
    return out


def format_table(results):
    """The per-host table (text, one line per host), like pyinfra's results."""
    rows = [("HOST", "HOSTNAME", "STEP", "STATUS", "TIME", "DETAIL")]
    for r in results:
        detail = r.error if r.status == "failed" else (", ".join(r.changes) if r.changes else "-")
        rows.append((r.host, r.hostname or "-", r.step, r.status, f"{r.duration_s:.1f}s", detail or "-"))
    s = summarize(results)
    summary = f"{s['hosts']} host(s): {s['changed']} changed, {s['unchanged']} unchanged, {s['failed']} failed"
    return "\n".join([*text_table(rows), summary]) + "\n"


def final_status(result):
    """changed / unchanged for a host that reached ``idle`` (pure)."""
    return "changed" if result.changes else "unchanged"


def manager_not_ready(manager_result):
    """The one-line error of a worker that was not started because the manager failed (pure)."""
    return f"manager not ready: {manager_result.host} failed at {manager_result.step}"
