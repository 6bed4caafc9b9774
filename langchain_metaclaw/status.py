"""One view of the whole loop, for ``metaclaw status`` and notebooks: what was captured, scored, trained,
served, and, when nothing trained, why.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from langchain_metaclaw.store.records import AdapterVersion, TrainRun
from langchain_metaclaw.store.trace_store import TraceStore


class StatusReport(BaseModel):
    counts: dict[str, int]
    turns_by_source: dict[str, int]
    """llm turns by ``tokens_source`` (engine tokens vs re-tokenized text)."""
    scores_by_source: dict[str, dict[str, int]]
    """per score source: scored / unscored counts."""
    judge_calls: dict[str, int]
    """judge votes by outcome (ok, unparseable, refused, timeout, error)."""
    judge_latency_ms: float | None
    adapters: list[AdapterVersion]
    train_runs: list[TrainRun]
    schedule_events: list[dict[str, Any]]
    scheduler: dict[str, Any] | None = None
    """Next expected window, detectors in use, lease and liveness (when a scheduler has run on this store)."""
    problems: list[str]


def collect_status(store: TraceStore, *, limit: int = 5) -> StatusReport:
    """Gather the status of ``store`` (cheap aggregate queries only)."""
    return StatusReport(
        scheduler=_scheduler_section(store),
        counts=store.counts(),
        **store.status_counts(limit),
        adapters=store.adapters(),
        train_runs=store.train_runs(limit=limit),
        problems=store.verify(),
    )


def _scheduler_section(store: TraceStore) -> dict[str, Any] | None:
    """The MadMax view for the policy the last scheduler ran with (``None`` if none ever ran here)."""
    from langchain_metaclaw.schedule.events import recent_events

    started = recent_events(store, 1, event="scheduler_started")
    if not started:
        return None
    from langchain_metaclaw.schedule.report import scheduler_status
    from langchain_metaclaw.schedule.windows import WindowPolicy

    try:
        policy = WindowPolicy(**(started[0].details.get("policy") or {}))
        return scheduler_status(store, policy)
    except Exception as exc:  # status must always render
        return {"error": f"{type(exc).__name__}: {exc}"}


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def render_status(report: StatusReport, console: Any = None) -> None:
    """Print ``report`` as rich tables: traces and scores, adapters, training runs, then the scheduler."""
    from rich.console import Console

    console = console or Console()
    for table in (_overview(report), _adapters(report), _runs(report)):
        console.print(table)
    if report.schedule_events:
        table = _table("Scheduler decisions", "when", "event", "why")
        for e in report.schedule_events:
            table.add_row(_ago(e["at"]), e["event"], "; ".join(e.get("reasons") or []))
        console.print(table)
    if report.scheduler is not None:
        console.print(_scheduler_line(report.scheduler))
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}")


def _table(title: str, *columns: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def _overview(report: StatusReport) -> Any:
    from rich.table import Table

    overview = Table(title="Traces and scores", show_header=True)
    overview.add_column("what")
    overview.add_column("count", justify="right")
    overview.add_column("detail")
    overview.add_row("episodes", str(report.counts["episodes"]), "")
    llm = sum(report.turns_by_source.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(report.turns_by_source.items()))
    overview.add_row("turns", str(report.counts["turns"]), f"llm {llm} ({detail})" if llm else "")
    for source, by_status in sorted(report.scores_by_source.items()):
        overview.add_row(f"scores: {source}", str(sum(by_status.values())),
                         ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
    overview.add_row("feedback", str(report.counts["feedback"]), "")
    total_votes = sum(report.judge_calls.values())
    failures = {k: v for k, v in report.judge_calls.items() if k != "ok"}
    judge = ", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "no failures"
    latency = f", mean {report.judge_latency_ms:.0f} ms" if report.judge_latency_ms is not None else ""
    overview.add_row("judge votes", str(total_votes), judge + latency if total_votes else "")
    return overview


def _adapters(report: StatusReport) -> Any:
    adapters = _table("Adapters", "version", "status", "backend", "parent", "created", "promoted", "notes")
    for a in reversed(report.adapters[-10:]):
        adapters.add_row(a.version, a.status, a.backend, a.parent_version or "-", _ago(a.created_at),
                         _ago(a.promoted_at), (a.notes or "")[:60])
    if not report.adapters:
        adapters.add_row("(base model)", "serving", "", "", "", "", "no adapter trained yet")
    return adapters


def _runs(report: StatusReport) -> Any:
    runs = _table("Training runs", "started", "status", "steps", "samples", "candidate", "reason / metrics")
    for r in report.train_runs:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in list(r.metrics.items())[:4] if isinstance(v, int | float))
        runs.add_row(_ago(r.started_at), r.status, str(r.steps), str(len(r.samples)), r.candidate_adapter or "-",
                     r.reason or metrics)
    if not report.train_runs:
        runs.add_row("-", "-", "", "", "", "no training run yet")
    return runs


def _scheduler_line(sched: dict[str, Any]) -> str:
    if "error" in sched:
        return f"MadMax: could not evaluate the scheduler: {sched['error']}"
    window = sched.get("window")
    detectors = [d for d in sched.get("detectors") or [] if d.get("available")]
    return (f"MadMax: scheduler {'alive' if sched.get('scheduler_alive') else 'not running'}; "
            f"window now: {getattr(window, 'summary', window)}; next expected window: "
            f"{sched.get('next_window') or sched.get('next_window_note') or 'unknown'}; idle detectors in use: "
            f"{', '.join(d['detector'] for d in detectors) or 'none available'}")
