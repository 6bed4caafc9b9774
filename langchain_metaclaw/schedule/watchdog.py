"""The watchdog: evaluate the window policy on a clock, and tell training to stop when the window closes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from langchain_metaclaw.schedule.clock import Clock, SystemClock
from langchain_metaclaw.schedule.windows import SignalProvider, WindowDecision, WindowPolicy

__all__ = ["Watchdog"]

logger = logging.getLogger("langchain_metaclaw.schedule.windows")  # the window log, as before the split


class Watchdog:
    """Evaluates the policy on a clock and stops training when the window closes.

    Call :meth:`check` every few seconds (phase 2: an APScheduler interval job). When a window that was
    open closes, :attr:`stop_event` is set; the trainer checks it between steps and checkpoints. The event
    stays set until :meth:`reset` (call it when a new training run starts). Each transition (and the first
    decision) is logged with its reasons and passed to ``on_decision``, which must not block for long;
    its errors are logged, never raised. A signal provider that raises counts as a closed window.
    """

    def __init__(
        self,
        policy: WindowPolicy,
        signals: SignalProvider,
        clock: Clock | None = None,
        *,
        on_decision: Callable[[WindowDecision], None] | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.policy = policy
        self.signals = signals
        self.clock = clock or SystemClock()
        self.on_decision = on_decision
        self.stop_event = stop_event or threading.Event()
        self._lock = threading.Lock()
        self._open = False
        self._last: WindowDecision | None = None
        self.transitions = 0

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def last_decision(self) -> WindowDecision | None:
        return self._last

    def reset(self) -> None:
        """Clear :attr:`stop_event` for the next training run (the open/closed state is kept)."""
        self.stop_event.clear()

    def check(self) -> WindowDecision:
        """Evaluate now; on open→closed set :attr:`stop_event` (after ``on_decision``). Returns the decision."""
        with self._lock:
            now = self.clock.now()
            try:
                signals = self.signals(now)
                decision = self.policy.evaluate(now, signals, currently_open=self._open)
            except Exception as exc:  # noqa: BLE001 - the watchdog must keep running, and fail closed
                logger.exception("window check failed")
                decision = WindowDecision(
                    open=False,
                    reasons=[f"signals failed: {type(exc).__name__}: {exc}"],
                    at=now,
                    mode=self.policy.mode,
                )
            first = self._last is None
            changed = decision.open != self._open
            was_open = self._open
            self._open = decision.open
            self._last = decision
            if changed:
                self.transitions += 1
        if first or changed:
            if decision.open:
                until = f" until {decision.closes_at.isoformat()}" if decision.closes_at else ""
                logger.info("training window open%s: %s", until, "; ".join(decision.reasons))
            elif was_open:
                logger.info("training window closed: %s", "; ".join(decision.reasons))
            else:
                logger.info("no training window: %s", "; ".join(decision.reasons))
            if self.on_decision is not None:
                try:
                    self.on_decision(decision)
                except Exception:  # noqa: BLE001
                    logger.exception("on_decision callback failed")
        if was_open and not decision.open:
            # after on_decision: the close is recorded before the trainer can react and record its end
            self.stop_event.set()
        return decision
