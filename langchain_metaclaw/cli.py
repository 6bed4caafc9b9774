"""The ``metaclaw`` command: every stage of the loop can be run by hand.

Each command is a thin shell over a Python function (the scheduler and notebooks call the same ones);
expected failures (``MetaClawError``) become readable ``click`` errors, never tracebacks.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from langchain_metaclaw.config import get_settings, metaclaw_home
from langchain_metaclaw.errors import MetaClawError

STORE_OPTION = click.option(
    "--store", "store_url", envvar="METACLAW_STORE_URL", default=None,
    help="SQLAlchemy URL of the trace store (default: $METACLAW_HOME/metaclaw.db).",
)


def _friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MetaClawError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _open_store(url: str | None):
    from langchain_metaclaw.store import TraceStore

    return TraceStore(url)


@click.group()
@click.version_option(package_name="langchain-metaclaw")
def cli() -> None:
    """Capture, score, train and hot-swap: LangChain agents that learn from their own conversations."""


@cli.group()
def store() -> None:
    """Inspect the trace store."""


@store.command("path")
def store_path() -> None:
    """Print where the default store and all state live."""
    click.echo(f"home:  {metaclaw_home()}")
    click.echo(f"store: {get_settings().resolved_store_url()}")


@store.command("verify")
@STORE_OPTION
@_friendly_errors
def store_verify(store_url: str | None) -> None:
    """Check the schema, integrity and leftover spools; exit 1 when something is wrong."""
    problems = _open_store(store_url).verify()
    for problem in problems:
        click.echo(f"problem: {problem}")
    if problems:
        raise SystemExit(1)
    click.echo("ok")


@store.command("counts")
@STORE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly_errors
def store_counts(store_url: str | None, as_json: bool) -> None:
    """Rows per table."""
    counts = _open_store(store_url).counts()
    if as_json:
        click.echo(json.dumps(counts))
    else:
        for table, n in counts.items():
            click.echo(f"{table:<12} {n}")


@cli.command()
@STORE_OPTION
@click.option("--rule", "rules", multiple=True, help="Registered reward rule to run (repeatable).")
@click.option("--judge-model", envvar="METACLAW_JUDGE_MODEL", default=None,
              help="PRM judge: a model name on --judge-base-url (OpenAI-compatible); omit to skip the judge.")
@click.option("--judge-base-url", envvar="METACLAW_JUDGE_BASE_URL", default=None)
@click.option("--votes", default=3, show_default=True)
@_friendly_errors
def score(store_url: str | None, rules: tuple[str, ...], judge_model: str | None, judge_base_url: str | None,
          votes: int) -> None:
    """Score everything not scored yet (feedback, rules, PRM judge); incremental and idempotent."""
    from langchain_metaclaw.scoring import score_pending

    judge = None
    if judge_model:
        from langchain_openai import ChatOpenAI

        judge = ChatOpenAI(model=judge_model, base_url=judge_base_url, temperature=1.0, max_tokens=256)
    report = score_pending(_open_store(store_url), judge=judge, rules=list(rules) or None, votes=votes,
                           progress=True)
    click.echo(report.model_dump_json(indent=2))


@cli.command()
@STORE_OPTION
@click.option("--steps", default=8, show_default=True, help="Maximum optimizer steps.")
@click.option("--backend", type=click.Choice(["local", "tinker", "mint"]), default="local", show_default=True)
@click.option("--model", "base_model", default=None, help="Base model (default: the embedded SmolLM2-135M).")
@click.option("--lr", default=2e-4, show_default=True)
@_friendly_errors
def train(store_url: str | None, steps: int, backend: str, base_model: str | None, lr: float) -> None:
    """Train a candidate adapter from scored traces (captured rewards; promote with `metaclaw adapters`)."""
    from rich.progress import Progress

    from langchain_metaclaw.training.trainer import Trainer, TrainerConfig

    config = TrainerConfig(backend=backend, base_model=base_model, learning_rate=lr, max_steps=steps)
    with Progress() as progress:
        bar = progress.add_task("training", total=steps)
        run = Trainer(_open_store(store_url), config).run(
            progress=lambda step, total, m: progress.update(bar, completed=step,
                                                            description=f"loss {m.get('loss:sum', 0):.3f}"))
    click.echo(f"{run.status}: {run.reason or ''} ({run.steps} steps, candidate {run.candidate_adapter or '-'})")


@cli.group()
def adapters() -> None:
    """List, promote and roll back adapter versions."""


@adapters.command("list")
@STORE_OPTION
@_friendly_errors
def adapters_list(store_url: str | None) -> None:
    """Every version with its status (serving, candidate, retired, rolled_back, rejected)."""
    from langchain_metaclaw.adapters import AdapterRegistry

    for a in AdapterRegistry(_open_store(store_url)).versions():
        click.echo(f"{a.version:<12} {a.status:<12} {a.backend:<7} parent={a.parent_version or '-':<10} {a.uri}")


@adapters.command("promote")
@STORE_OPTION
@click.argument("version")
@_friendly_errors
def adapters_promote(store_url: str | None, version: str) -> None:
    """Serve VERSION (validated first; an invalid adapter is refused and nothing changes)."""
    from langchain_metaclaw.adapters import AdapterRegistry

    AdapterRegistry(_open_store(store_url)).promote(version)
    click.echo(f"{version} is serving")


@adapters.command("rollback")
@STORE_OPTION
@click.option("--to", default=None, help="Version to go back to (default: the previous serving one).")
@_friendly_errors
def adapters_rollback(store_url: str | None, to: str | None) -> None:
    """Go back to the previous serving version (or --to VERSION, or the base model)."""
    from langchain_metaclaw.adapters import AdapterRegistry

    now = AdapterRegistry(_open_store(store_url)).rollback(to)
    click.echo(f"{now.version if now else 'base model'} is serving")


@cli.group()
def schedule() -> None:
    """MadMax: train only in idle windows (keyboard idle, sleep hours, busy calendar, low load)."""


@schedule.command("start")
@STORE_OPTION
@click.option("--idle-minutes", type=float, default=None, help="Open a window after this much keyboard/mouse idle.")
@click.option("--sleep-hours", default=None, help="e.g. 23:00-07:00, in --timezone.")
@click.option("--calendar", "calendar", default=None, help="ICS file or secret ICS link; busy events open a window.")
@click.option("--timezone", default=None, help="IANA zone for sleep hours and all-day events (default: local).")
@click.option("--mode", type=click.Choice(["any", "all"]), default="any", show_default=True)
@click.option("--max-requests-per-minute", type=float, default=None, help="Never train above this serving load.")
@click.option("--check-interval", type=float, default=5.0, show_default=True)
@_friendly_errors
def schedule_start(store_url: str | None, idle_minutes: float | None, sleep_hours: str | None,
                   calendar: str | None, timezone: str | None, mode: str, max_requests_per_minute: float | None,
                   check_interval: float) -> None:
    """Run the scheduler in the foreground: score + train whenever a window opens, stop when it closes."""
    from langchain_metaclaw.schedule.calendar import CalendarSource
    from langchain_metaclaw.schedule.foreground import run_schedule
    from langchain_metaclaw.schedule.signals import SystemSignals
    from langchain_metaclaw.schedule.windows import WindowPolicy

    options = {"idle_minutes": idle_minutes, "sleep_hours": sleep_hours, "timezone": timezone,
               "max_requests_per_minute": max_requests_per_minute}
    policy = WindowPolicy(mode=mode, calendar=calendar is not None,
                          **{k: v for k, v in options.items() if v is not None})
    store = _open_store(store_url)
    signals = SystemSignals(calendar=CalendarSource(calendar) if calendar else None,
                            requests_per_minute=store.requests_per_minute)
    run_schedule(store_url, policy, signals=signals, check_interval=check_interval)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback needs a key.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="METACLAW_API_KEY", default=None, help="Require 'Authorization: Bearer <key>'.")
@click.option("--model", "base_model", default=None, help="Base model (default: the embedded SmolLM2-135M).")
@_friendly_errors
def serve(host: str, port: int, api_key: str | None, base_model: str | None) -> None:
    """OpenAI-compatible server (vLLM shapes, dynamic LoRA endpoints) over the local backend."""
    from langchain_metaclaw.server import serve as run_server

    run_server(host=host, port=port, api_key=api_key, base_model=base_model)


@cli.command()
@click.option("--minutes", default=8.0, show_default=True, help="Length of the (simulated) training window.")
@_friendly_errors
def demo(minutes: float) -> None:
    """Run the whole loop on the embedded default: serve, capture, score, train, hot-swap, measure."""
    from langchain_metaclaw.demo import run_demo

    run_demo(train_minutes=minutes)


@cli.command()
@STORE_OPTION
@_friendly_errors
def status(store_url: str | None) -> None:
    """Traces, scores, judge health, adapters, training runs (and why nothing trained), scheduler windows."""
    from langchain_metaclaw.status import collect_status, render_status

    render_status(collect_status(_open_store(store_url)))


def main() -> None:  # pragma: no cover - console entry point
    cli()
