"""The store lease on SQLite and PostgreSQL: one holder at a time, renewal, release, expiry, races."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from langchain_metaclaw.schedule.clock import FakeClock
from langchain_metaclaw.schedule.lease import StoreLease, acquire, current, release, renew
from langchain_metaclaw.store import TraceStore

T0 = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)


def test_one_holder_at_a_time_until_release(store):
    assert acquire(store, "madmax", "A", 10, now=T0)
    assert not acquire(store, "madmax", "B", 10, now=T0 + timedelta(seconds=1))
    info = current(store, "madmax")
    assert (info.holder, info.expires_at) == ("A", T0 + timedelta(seconds=10))
    assert info.active(T0 + timedelta(seconds=9)) and not info.active(T0 + timedelta(seconds=10))
    # re-acquiring our own lease extends it
    assert acquire(store, "madmax", "A", 10, now=T0 + timedelta(seconds=5))
    assert current(store, "madmax").expires_at == T0 + timedelta(seconds=15)
    assert not release(store, "madmax", "B")  # not B's to release
    assert current(store, "madmax").holder == "A"
    assert release(store, "madmax", "A")
    assert current(store, "madmax") is None
    assert acquire(store, "madmax", "B", 10, now=T0 + timedelta(seconds=6))
    assert current(store, "madmax").holder == "B"


def test_leases_are_independent_by_name(store):
    assert acquire(store, "madmax", "A", 10, now=T0)
    assert acquire(store, "other", "B", 10, now=T0)
    assert (current(store, "madmax").holder, current(store, "other").holder) == ("A", "B")


def test_renew_extends_only_the_holders_lease(store):
    assert acquire(store, "madmax", "A", 10, now=T0)
    assert renew(store, "madmax", "A", 10, now=T0 + timedelta(seconds=8))
    assert current(store, "madmax").expires_at == T0 + timedelta(seconds=18)
    assert not renew(store, "madmax", "B", 10, now=T0 + timedelta(seconds=8))
    assert not renew(store, "nothing", "A", 10, now=T0)


def test_a_crashed_holders_lease_expires(store):
    clock = FakeClock(T0)
    crashed = StoreLease(store, "madmax", "crashed", ttl=10, clock=clock)
    other = StoreLease(store, "madmax", "other", ttl=10, clock=clock)
    assert crashed.acquire() and crashed.held()
    clock.advance(seconds=9.9)
    assert not other.acquire()
    clock.advance(seconds=0.1)  # exactly at expiry it is free
    assert not crashed.held()
    assert other.acquire() and other.held()
    # the old holder finds out when it tries to renew
    assert not crashed.renew()
    assert current(store, "madmax").holder == "other"


def test_an_expired_lease_nobody_took_is_still_ours_to_renew(store):
    lease = StoreLease(store, "madmax", "A", ttl=10, clock=FakeClock(T0))
    assert lease.acquire()
    lease.clock.advance(minutes=5)
    assert lease.renew() and lease.held()


def test_racing_acquirers_get_exactly_one_lease(store_url):
    stores = [TraceStore(store_url) for _ in range(4)]
    try:
        for round_ in range(5):
            now = T0 + timedelta(minutes=round_)  # the previous round's lease (10 s) has expired
            barrier = threading.Barrier(len(stores))
            wins: list[str] = []

            def contend(i: int, s: TraceStore, barrier: threading.Barrier, now: datetime, wins: list) -> None:
                barrier.wait()
                if acquire(s, "madmax", f"holder-{i}", 10, now=now):
                    wins.append(f"holder-{i}")

            threads = [threading.Thread(target=contend, args=(i, s, barrier, now, wins))
                       for i, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(wins) == 1, wins
            assert current(stores[0], "madmax").holder == wins[0]
    finally:
        for s in stores:
            s.close()


def test_bad_arguments(store):
    with pytest.raises(ValueError, match="positive"):
        acquire(store, "madmax", "A", 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        acquire(store, "madmax", "A", 10, now=datetime(2025, 1, 1))


def test_accepts_a_bare_engine(store):
    assert acquire(store.engine, "madmax", "A", timedelta(seconds=10), now=T0)
    assert current(store.engine, "madmax").holder == "A"
