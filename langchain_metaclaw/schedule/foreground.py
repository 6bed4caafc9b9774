"""``metaclaw schedule start``: MadMax in the foreground of its own process until SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langchain_metaclaw.schedule.clock import Clock
from langchain_metaclaw.schedule.scheduler import MadMaxScheduler
from langchain_metaclaw.schedule.session import TrainingSession, default_trainer_factory
from langchain_metaclaw.schedule.windows import SignalProvider, WindowPolicy, WindowSignals

if TYPE_CHECKING:
    from langchain_metaclaw.training.trainer import TrainerConfig

__all__ = ["run_schedule"]

logger = logging.getLogger("langchain_metaclaw.schedule.scheduler")  # the scheduler's log, as before the split


def run_schedule(
    store_url: str | None,
    policy: WindowPolicy,
    *,
    trainer_config: TrainerConfig | None = None,
    trainer_factory: Callable[[], Any] | None = None,
    score_fn: Callable[..., Any] | None = None,
    signals: SignalProvider | WindowSignals | None = None,
    check_interval: float = 5.0,
    holder: str | None = None,
    lease_ttl: float | None = None,
    session_cooldown: float | None = 900.0,
    stop_timeout: float = 300.0,
    handle_signals: bool = True,
    clock: Clock | None = None,
) -> TrainingSession | None:
    """Run MadMax in the foreground until SIGINT / SIGTERM (``metaclaw schedule start``).

    Opens the store at ``store_url`` (``None``: ``METACLAW_STORE_URL`` or the default under
    ``$METACLAW_HOME``), trains with ``trainer_factory`` or ``Trainer(store, trainer_config)``, and blocks.
    The first SIGINT/SIGTERM stops the checks and the running session at its next step boundary (it
    checkpoints), releases the lease and returns the last session; a second one interrupts the wait.
    """
    from langchain_metaclaw.store import TraceStore

    store = TraceStore(store_url)
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)  # one line per check
    scheduler = MadMaxScheduler(
        store,
        policy,
        trainer_factory=trainer_factory or default_trainer_factory(store, trainer_config),
        score_fn=score_fn,
        signals=signals,
        clock=clock,
        check_interval=check_interval,
        blocking=True,
        holder=holder,
        lease_ttl=lease_ttl,
        session_cooldown=session_cooldown,
        stop_timeout=stop_timeout,
    )
    previous: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("madmax: %s received; stopping at the next step boundary", signal.Signals(signum).name)
        for sig, handler in previous.items():  # a second signal is not caught here again
            signal.signal(sig, handler)
        threading.Thread(target=scheduler.request_stop, name="madmax-stop", daemon=True).start()

    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        scheduler.start()
        return scheduler.last_session
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
