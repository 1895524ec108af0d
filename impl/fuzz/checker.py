"""The history check: what a fuzz run must never show, whatever was killed when.

:func:`check` reads the evidence a run leaves behind (the planned jobs, the database's
jobs, histories and effects, every worker's history log, and the fenced sink's
executions) and returns one :class:`Violation` per broken rule. The rules are the
contract's invariants, checked from the outside the way Jepsen checks a database: the
sink's fencing is re-verified from its own record rather than trusted, and what workers
were told is compared with what the database kept.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from attrs import field, frozen

from impl.fuzz.history import Entry
from impl.fuzz.sink import Execution
from impl.fuzz.workload import SUCCESS, all_steps
from model.key import op_key
from model.record import EffectInfo, EffectStatus, Event, HistoryEvent, JobInfo
from model.workflow import Workflow

LOST_JOB = "lost-job"
UNEXPECTED_JOB = "unexpected-job"
EFFECT_RESULT = "effect-result"
STALE_EXECUTION = "stale-execution"
SINK_FENCING = "sink-fencing"
UNFENCED_EXECUTION = "unfenced-execution"
ILLEGAL_STATES = "illegal-states"
TOKEN_ORDER = "token-order"  # noqa: S105  (a rule name, not a secret)
LIVENESS = "liveness"
SINK_MISMATCH = "sink-mismatch"
INTEGRITY = "integrity"
WORKER_ERROR = "worker-error"

RULES = (
    LOST_JOB,
    UNEXPECTED_JOB,
    EFFECT_RESULT,
    STALE_EXECUTION,
    SINK_FENCING,
    UNFENCED_EXECUTION,
    ILLEGAL_STATES,
    TOKEN_ORDER,
    LIVENESS,
    SINK_MISMATCH,
    INTEGRITY,
    WORKER_ERROR,
)
"""Every rule the checker knows, by the name a :class:`Violation` carries."""


@frozen
class Violation:
    """One broken rule: which, for which job (if one), and what was seen."""

    rule: str
    job_id: str | None
    message: str

    def __str__(self) -> str:
        where = f" job {self.job_id[:12]}" if self.job_id else ""
        return f"[{self.rule}]{where}: {self.message}"


@frozen(kw_only=True)
class Evidence:
    """Everything a run left behind, as the checker reads it.

    ``drain_started_at`` is the simulated time the drain began and ``step`` the clock
    step of the drain in seconds; a job must be terminal within ``liveness_steps``
    steps of the drain's start. ``integrity`` maps a database file to SQLite's verdict.
    """

    workflow: Workflow
    planned: frozenset[str]
    jobs: Mapping[str, JobInfo]
    history: Mapping[str, Sequence[HistoryEvent]]
    effects: Mapping[str, Sequence[EffectInfo]]
    entries: Sequence[Entry]
    executions: Sequence[Execution]
    drain_started_at: float | None = None
    step: float = 1.0
    liveness_steps: int = 1000
    integrity: Mapping[str, str] = field(factory=dict)
    worker_errors: Sequence[str] = ()


def check(ev: Evidence) -> list[Violation]:
    """Return every violation the evidence shows (empty when the run was correct)."""
    out: list[Violation] = []
    out += _jobs(ev)
    out += _results(ev)
    out += _sink(ev)
    out += _states(ev)
    out += _tokens(ev)
    out += _liveness(ev)
    for name, verdict in sorted(ev.integrity.items()):
        if verdict != "ok":
            out.append(Violation(INTEGRITY, None, f"{name}: integrity_check says {verdict!r}"))
    out += [Violation(WORKER_ERROR, None, text) for text in ev.worker_errors]
    return out


def _str(entry: Entry, key: str) -> str:
    return str(entry.get(key))


def _int(entry: Entry, key: str) -> int:
    value = entry.get(key)
    return value if isinstance(value, int) else -1


def _jobs(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    for job_id in sorted(ev.planned):
        info = ev.jobs.get(job_id)
        if info is None:
            out.append(Violation(LOST_JOB, job_id, "planned but missing from the database"))
        elif not ev.workflow.is_terminal(info.state):
            out.append(
                Violation(LOST_JOB, job_id, f"still in {info.state} after the drain, not terminal")
            )
    seen = set(ev.jobs)
    seen.update(_str(e, "job") for e in ev.entries if "job" in e)
    seen.update(x.job_id for x in ev.executions)
    for job_id in sorted(seen - ev.planned):
        out.append(
            Violation(UNEXPECTED_JOB, job_id, "in the database, a log or the sink, never planned")
        )
    return out


def _results(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    recorded: dict[str, EffectInfo] = {}
    for job_id, effects in ev.effects.items():
        keys = Counter(e.op_key for e in effects)
        for key, count in keys.items():
            if count > 1:
                out.append(
                    Violation(EFFECT_RESULT, job_id, f"op key {key[:12]} recorded {count} times")
                )
        for e in effects:
            if e.status == EffectStatus.DONE:
                recorded[e.op_key] = e
        info = ev.jobs.get(job_id)
        if info is not None and info.state in SUCCESS:
            done = {e.op_key for e in effects if e.status == EffectStatus.DONE}
            for op, extras in all_steps():
                if op_key(job_id, op, extras) not in done:
                    out.append(
                        Violation(
                            EFFECT_RESULT,
                            job_id,
                            f"reached {info.state} without a recorded {op} {dict(extras or {})}",
                        )
                    )
    accepted = {(x.exec_id, x.op_key, x.token) for x in ev.executions if x.accepted}
    for key, e in sorted(recorded.items()):
        result = e.result
        exec_id = result.get("exec") if isinstance(result, dict) else None
        token = result.get("token") if isinstance(result, dict) else None
        if token != e.token or (exec_id, key, token) not in accepted:
            out.append(
                Violation(
                    EFFECT_RESULT,
                    e.job_id,
                    f"{e.op}: recorded result {result!r} (token {e.token}) is not an execution "
                    "the sink accepted under that token",
                )
            )
    for entry in ev.entries:
        if entry.get("ev") != "result":
            continue
        key = _str(entry, "op_key")
        row = recorded.get(key)
        if row is None:
            out.append(
                Violation(
                    EFFECT_RESULT,
                    _str(entry, "job"),
                    f"{entry.get('op')}: worker {entry.get('w')} was returned "
                    f"{entry.get('result')!r} but no result is recorded",
                )
            )
        elif entry.get("result") != row.result:
            out.append(
                Violation(
                    EFFECT_RESULT,
                    _str(entry, "job"),
                    f"{entry.get('op')}: worker {entry.get('w')} (token {entry.get('token')}) was "
                    f"returned {entry.get('result')!r}, the recorded result is {row.result!r}",
                )
            )
    return out


def _sink(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    high: dict[str, int] = {}
    for x in ev.executions:
        top = high.get(x.job_id)
        if x.accepted:
            if top is not None and x.token < top:
                out.append(
                    Violation(
                        STALE_EXECUTION,
                        x.job_id,
                        f"sink accepted {x.op} ({x.exec_id}) with token {x.token} after token "
                        f"{top} had written there",
                    )
                )
            high[x.job_id] = max(x.token, top if top is not None else x.token)
        elif top is None or x.token >= top:
            out.append(
                Violation(
                    SINK_FENCING,
                    x.job_id,
                    f"sink rejected {x.exec_id} with token {x.token}, not lower than {top}",
                )
            )
    # Every execution must be announced to the ledger under the lease it carries: the
    # start is recorded before fn runs, so executions never outnumber starts.
    starts: Counter[tuple[str, str, int]] = Counter()
    for job_id, events in ev.history.items():
        for h in events:
            if h.event == Event.EFFECT_STARTED:
                starts[(job_id, str(h.detail.get("op")), h.token)] += 1
    execs = Counter((x.job_id, x.op, x.token) for x in ev.executions)
    for (job_id, op, token), count in sorted(execs.items()):
        if count > starts[(job_id, op, token)]:
            out.append(
                Violation(
                    UNFENCED_EXECUTION,
                    job_id,
                    f"{op} executed {count} time(s) under token {token} but the ledger recorded "
                    f"{starts[(job_id, op, token)]} start(s) under that token",
                )
            )
    grants = {
        (job_id, h.token): h.worker
        for job_id, events in ev.history.items()
        for h in events
        if h.event == Event.LEASED
    }
    for x in ev.executions:
        holder = grants.get((x.job_id, x.token))
        if not _same_worker(holder, x.worker):
            out.append(
                Violation(
                    UNFENCED_EXECUTION,
                    x.job_id,
                    f"{x.exec_id} ran under token {x.token}, which was granted to {holder}",
                )
            )
    by_exec = {x.exec_id: x for x in ev.executions}
    for entry in ev.entries:
        if entry.get("ev") != "sink":
            continue
        seen = by_exec.get(_str(entry, "exec"))
        if seen is None or seen.accepted != entry.get("ok"):
            found = "nothing" if seen is None else ("accepted" if seen.accepted else "rejected")
            out.append(
                Violation(
                    SINK_MISMATCH,
                    _str(entry, "job"),
                    f"worker {entry.get('w')} saw {entry.get('exec')} ok={entry.get('ok')}, the "
                    f"sink recorded {found}",
                )
            )
    return out


def _states(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    wf = ev.workflow
    edges = wf.transitions
    moves: dict[tuple[str, str], int] = {}
    for job_id, events in ev.history.items():
        state = wf.initial
        visited = {state}
        for h in events:
            if h.event == Event.ADVANCED:
                src, dst = str(h.detail.get("from")), str(h.detail.get("to"))
                problem = None
                if src != state:
                    problem = f"moved from {src} while in {state}"
                elif (src, dst) not in edges:
                    problem = f"{src}->{dst} is not a declared edge"
                elif dst in visited:
                    problem = f"re-entered {dst}"
                if problem:
                    out.append(Violation(ILLEGAL_STATES, job_id, problem))
                moves[(job_id, dst)] = h.token
                state = dst
                visited.add(dst)
            elif h.event in (Event.FAILED, Event.CANCELLED) and "retry_at" not in h.detail:
                if wf.is_terminal(state):
                    out.append(Violation(ILLEGAL_STATES, job_id, f"failed after terminal {state}"))
                state = wf.failed
                visited.add(state)
        info = ev.jobs.get(job_id)
        if info is not None and info.state != state:
            out.append(
                Violation(
                    ILLEGAL_STATES, job_id, f"history ends in {state}, the job is in {info.state}"
                )
            )
    claimed: dict[tuple[str, str], str] = {}
    for entry in ev.entries:
        if entry.get("ev") != "advance" or entry.get("moved") is not True:
            continue
        job_id, dst, who = _str(entry, "job"), _str(entry, "to"), _str(entry, "w")
        if (job_id, dst) in claimed:
            out.append(
                Violation(
                    ILLEGAL_STATES,
                    job_id,
                    f"both {claimed[(job_id, dst)]} and {who} were told they moved it to {dst}",
                )
            )
        claimed[(job_id, dst)] = who
        if moves.get((job_id, dst)) != entry.get("token"):
            out.append(
                Violation(
                    ILLEGAL_STATES,
                    job_id,
                    f"{who} was told it moved it to {dst} with token {entry.get('token')}; the "
                    f"history shows token {moves.get((job_id, dst))}",
                )
            )
    return out


def _tokens(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    granted: dict[tuple[str, int], str | None] = {}
    for job_id, events in ev.history.items():
        current = 0
        for h in events:
            if h.event == Event.LEASED:
                if h.token <= current:
                    out.append(
                        Violation(
                            TOKEN_ORDER, job_id, f"granted token {h.token} after token {current}"
                        )
                    )
                current = max(current, h.token)
                granted[(job_id, h.token)] = h.worker
            elif h.event != Event.PLANNED and h.token != current:
                # Fencing: nothing is written under a token other than the newest grant.
                out.append(
                    Violation(
                        TOKEN_ORDER,
                        job_id,
                        f"{h.event.value} by {h.worker} under token {h.token} while the current "
                        f"token was {current}",
                    )
                )
        info = ev.jobs.get(job_id)
        if info is not None and info.token != current:
            out.append(
                Violation(TOKEN_ORDER, job_id, f"job token {info.token}, last grant {current}")
            )
    holders: dict[tuple[str, int], str] = {}
    for entry in ev.entries:
        if entry.get("ev") != "lease":
            continue
        key = (_str(entry, "job"), _int(entry, "token"))
        who = _str(entry, "w")
        if key in holders and holders[key] != who:
            out.append(
                Violation(
                    TOKEN_ORDER, key[0], f"token {key[1]} held by both {holders[key]} and {who}"
                )
            )
        holders[key] = who
        if key not in granted or not _same_worker(granted[key], who):
            out.append(
                Violation(
                    TOKEN_ORDER,
                    key[0],
                    f"{who} logged a lease with token {key[1]}; the ledger granted it to "
                    f"{granted.get(key, 'nobody')}",
                )
            )
    return out


def _same_worker(holder: str | None, process: str) -> bool:
    """True if the ledger's lease ``holder`` is the worker process named ``process``, or
    one of its handler threads (a ``Worker`` with several threads names each
    ``process/i``; the process's log and its sink executions name the process)."""
    return holder is not None and (holder == process or holder.startswith(process + "/"))


def _liveness(ev: Evidence) -> list[Violation]:
    if ev.drain_started_at is None:
        return []
    out: list[Violation] = []
    deadline = ev.drain_started_at + ev.liveness_steps * ev.step
    for job_id, events in ev.history.items():
        info = ev.jobs.get(job_id)
        if info is None or not ev.workflow.is_terminal(info.state) or not events:
            continue
        at = events[-1].at
        for h in events:
            if _ends_job(ev.workflow, h):
                at = h.at
        if at > deadline:
            steps = (at - ev.drain_started_at) / ev.step
            out.append(
                Violation(
                    LIVENESS,
                    job_id,
                    f"terminal {steps:.0f} clock steps after the drain began; the bound is "
                    f"{ev.liveness_steps}",
                )
            )
    return out


def _ends_job(wf: Workflow, h: HistoryEvent) -> bool:
    if h.event == Event.ADVANCED:
        return wf.is_terminal(str(h.detail.get("to")))
    if h.event == Event.FAILED:
        return "retry_at" not in h.detail
    return h.event == Event.CANCELLED


def summarize(violations: Sequence[Violation]) -> dict[str, int]:
    """Return the number of violations per rule (rules without any omitted)."""
    counts: defaultdict[str, int] = defaultdict(int)
    for v in violations:
        counts[v.rule] += 1
    return dict(counts)
