"""TraceStore: the one database every stage of the loop reads from and writes to.

SQLite (WAL, ``synchronous=NORMAL``) on one machine, PostgreSQL (``postgresql+psycopg://``) beyond it;
the same code and the same tests run on both. The store migrates on construction and replays any spool
that a killed process left behind, so opening it is all a user does.

Capture writes go through :meth:`TraceStore.write_records` (or :meth:`TraceStore.write_records_json`,
the same rows from the JSON text), which is idempotent (upserts keyed by run id), so a record replayed
from the spool after a crash is never stored twice.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from operator import eq, ge
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from langchain_metaclaw.config import get_settings, metaclaw_home
from langchain_metaclaw.errors import StoreError
from langchain_metaclaw.store import schema, sqlite_json
from langchain_metaclaw.store.adapters import AdapterStatements
from langchain_metaclaw.store.base import StoreBase
from langchain_metaclaw.store.health import HealthMixin
from langchain_metaclaw.store.leases import LeaseQueries
from langchain_metaclaw.store.migrations import migrate
from langchain_metaclaw.store.records import Episode, Turn, TurnKind
from langchain_metaclaw.store.schedule import ScheduleQueries
from langchain_metaclaw.store.scores import ScoresMixin
from langchain_metaclaw.store.spool import orphan_segments, read_segment
from langchain_metaclaw.store.training_queries import TrainingQueriesMixin

logger = logging.getLogger(__name__)

_TIME_FIELDS = ("started_at", "ended_at", "created_at")


def _record_time(value: Any) -> datetime | None:
    """A capture record's time (epoch seconds, an ISO string or a datetime) as a datetime.

    Naive values need no repair here: :class:`~langchain_metaclaw.store.schema.UTCDateTime` stores them as UTC.
    """
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


_TURN_COLUMNS = tuple(c.name for c in schema.turns.columns)


def _episode_row(rec: dict[str, Any]) -> dict[str, Any]:
    ended = _record_time(rec.get("ended_at"))
    return {
        "id": rec["id"],
        "thread_id": rec.get("thread_id"),
        "root_run_id": rec.get("root_run_id"),
        "graph_name": rec.get("graph_name"),
        "started_at": _record_time(rec.get("started_at")) or ended,
        "ended_at": ended,
        "status": rec.get("status", "running"),
        "error": rec.get("error"),
        "metadata": rec.get("metadata") or {},
    }


def _turn_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = {c: rec.get(c) for c in _TURN_COLUMNS}
    for f in _TIME_FIELDS:
        row[f] = _record_time(row[f])
    row["created_at"] = row["created_at"] or row["ended_at"] or row["started_at"]
    return row


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class _OneThreadStaticPool(StaticPool):
    """``StaticPool`` that hands its one connection to one thread at a time.

    An in-memory SQLite database lives in a single connection, which ``StaticPool`` gives to every thread
    at once: one thread returning it (a rollback) undoes another thread's open transaction (seen: a scheduler
    event written by the watchdog thread vanished when a reader closed its connection). Here a second thread
    waits for the connection instead. A thread nesting connections keeps going (it already holds it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn = threading.Lock()
        self._holder: int | None = None

    def _do_get(self):
        me = threading.get_ident()
        if self._holder != me:
            self._turn.acquire()
            self._holder = me
        return super()._do_get()

    def _do_return_conn(self, record) -> None:
        super()._do_return_conn(record)
        if self._holder is not None:  # any thread may return it (garbage collection), so a plain Lock
            self._holder = None
            self._turn.release()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _in(column: Any, values: list[str]) -> Any:
    return column.in_(values)


def _where_given(stmt: Any, limit: int | None, *filters: tuple[Any, Callable[[Any, Any], Any], Any]) -> Any:
    """``stmt`` narrowed by ``op(column, value)`` for each filter whose value was given (not ``None``), then limited."""
    for column, op, value in filters:
        if value is not None:
            stmt = stmt.where(op(column, value))
    return stmt if limit is None else stmt.limit(limit)


class TraceStore(
    ScoresMixin, TrainingQueriesMixin, HealthMixin, LeaseQueries, ScheduleQueries, AdapterStatements, StoreBase
):
    """Episodes, turns, scores, feedback, adapters and training runs of a learning agent.

    Capture writes, episode and turn reads live here; the adapter table's statements in
    :class:`~langchain_metaclaw.store.adapters.AdapterStatements`; scores, feedback and judge calls in
    :class:`~langchain_metaclaw.store.scores.ScoresMixin`, train runs and training data in
    :class:`~langchain_metaclaw.store.training_queries.TrainingQueriesMixin`, counts and checks in
    :class:`~langchain_metaclaw.store.health.HealthMixin`, the scheduler's lease, events and job table in
    :class:`~langchain_metaclaw.store.leases.LeaseQueries` and :class:`~langchain_metaclaw.store.schedule.ScheduleQueries`.

    >>> store = TraceStore("sqlite:///metaclaw.db")          # doctest: +SKIP
    >>> store.turns(kind="llm")[0].completion_token_ids      # doctest: +SKIP

    Args:
        url: SQLAlchemy URL. ``None`` uses ``METACLAW_STORE_URL`` or ``$METACLAW_HOME/metaclaw.db``.
        engine: an existing SQLAlchemy engine instead of ``url``.
        replay_spool: replay capture spools left by dead processes (default ``True``).
        spool_dir: where capture spools for this store live (default under ``$METACLAW_HOME/spool``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: Engine | None = None,
        replay_spool: bool = True,
        spool_dir: str | Path | None = None,
    ) -> None:
        if engine is None:
            url = url or get_settings().resolved_store_url()
            engine = self._create_engine(url)
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.spool_dir = Path(spool_dir) if spool_dir else metaclaw_home() / "spool" / digest
        try:
            migrate(engine)
        except SQLAlchemyError as exc:
            msg = f"could not open or migrate the trace store at {self.url}: {exc}"
            raise StoreError(msg) from exc
        self.replayed = self.replay_spool() if replay_spool else 0

    @staticmethod
    def _create_engine(url: str) -> Engine:
        parsed = make_url(url)
        json_kwargs = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
        if parsed.get_backend_name() != "sqlite":
            return create_engine(url, pool_pre_ping=True, **json_kwargs)
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}, **json_kwargs}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = _OneThreadStaticPool
        else:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceStore({self.url!r})"

    # ------------------------------------------------------------------ capture writes

    def write_records(self, records: Sequence[dict[str, Any]]) -> None:
        """Store a batch of capture records in one transaction (idempotent: safe to replay)."""
        if records:
            with self.engine.begin() as conn:
                self._write_records_in_transaction(conn, records)

    def write_records_json(self, batch: str) -> None:
        """Store a batch given as the JSON text of an array of capture records (what the spool holds).

        On SQLite the database reads the text itself (:mod:`~langchain_metaclaw.store.sqlite_json`): the
        capture writer then spends no Python time per record, time it would take from the agent's thread.
        Elsewhere the text is parsed and written as :meth:`write_records` does. Times are epoch seconds.
        """
        if self.dialect != "sqlite" or not sqlite_json.AVAILABLE:
            self.write_records(orjson.loads(batch))
            return
        with self.engine.begin() as conn:
            for statement in sqlite_json.STATEMENTS:
                conn.exec_driver_sql(statement, (batch,))

    @cached_property
    def _capture_statements(self):
        """Upserts for capture records, built once (building them costs more than executing them)."""
        starts = self._insert(schema.episodes).on_conflict_do_nothing(index_elements=["id"])
        ends = self._insert(schema.episodes)
        ends = ends.on_conflict_do_update(
            index_elements=["id"],
            set_={"ended_at": ends.excluded.ended_at, "status": ends.excluded.status, "error": ends.excluded.error},
        )
        turns = self._insert(schema.turns)
        turns = turns.on_conflict_do_update(
            index_elements=["id"], set_={c: turns.excluded[c] for c in _TURN_COLUMNS if c != "id"}
        )
        return starts, ends, turns

    def _write_records_in_transaction(self, conn: Connection, records: Sequence[dict[str, Any]]) -> None:
        episodes: dict[str, dict] = {}
        ended: dict[str, None] = {}  # ordered
        turn_rows: dict[str, dict] = {}
        for rec in records:
            kind = rec.get("type")
            if kind in ("episode_start", "episode_end"):
                # An end (or a start that carries its end: an episode that ended in the event it started)
                # folds into the batch's first start of the episode: one row, not two.
                row = _episode_row(rec)
                first = episodes.setdefault(rec["id"], row)
                if rec.get("ended_at") is not None:
                    if first is not row:
                        first.update(ended_at=row["ended_at"], status=row["status"], error=row["error"])
                    ended[rec["id"]] = None
            elif kind == "turn":
                turn_rows[rec["id"]] = _turn_row(rec)  # a later copy of the same run wins
            else:
                logger.warning("ignoring capture record of unknown type %r", kind)
        start_stmt, end_stmt, turn_stmt = self._capture_statements
        if starts := [row for key, row in episodes.items() if key not in ended]:
            conn.execute(start_stmt, starts)
        if ends := [episodes[key] for key in ended]:
            conn.execute(end_stmt, ends)
        if turn_rows:
            conn.execute(turn_stmt, list(turn_rows.values()))

    def replay_spool(self) -> int:
        """Write records left in the spool by processes that died; returns how many were replayed."""
        total = 0
        for path in orphan_segments(self.spool_dir):
            records, _bad = read_segment(path)
            for start in range(0, len(records), 500):
                self.write_records(records[start : start + 500])
            total += len(records)
            path.unlink(missing_ok=True)
            logger.info("replayed %d record(s) from spool %s", len(records), path.name)
        return total

    # ------------------------------------------------------------------ reads

    def episodes(
        self,
        *,
        thread_id: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[Episode]:
        """Episodes, oldest first."""
        t = schema.episodes
        stmt = _where_given(select(t).order_by(t.c.started_at, t.c.id), limit,
                            (t.c.thread_id, eq, thread_id), (t.c.status, eq, status), (t.c.started_at, ge, since))
        return self._select(Episode, stmt)

    def episode(self, episode_id: str) -> Episode | None:
        return self._select_one(Episode, select(schema.episodes).where(schema.episodes.c.id == episode_id))

    def turns(
        self,
        episode_id: str | None = None,
        kind: TurnKind | None = None,
        since: datetime | None = None,
        *,
        ids: Iterable[str] | None = None,
        node: str | None = None,
        root_run_id: str | None = None,
        limit: int | None = None,
    ) -> list[Turn]:
        """Turns in the order they started (ties broken by completion order)."""
        t = schema.turns
        stmt = _where_given(
            select(t).order_by(t.c.started_at, t.c.seq, t.c.id), limit,
            (t.c.episode_id, eq, episode_id), (t.c.kind, eq, kind), (t.c.created_at, ge, since),
            (t.c.id, _in, None if ids is None else [str(i) for i in ids]), (t.c.node, eq, node),
            (t.c.root_run_id, eq, None if root_run_id is None else str(root_run_id)),
        )
        return self._select(Turn, stmt)

    def turn(self, run_id: str | uuid.UUID) -> Turn | None:
        found = self.turns(ids=[str(run_id)])
        return found[0] if found else None

    def requests_per_minute(self, window_s: float = 300.0) -> float:
        """LLM calls per minute over the last ``window_s`` seconds (the MadMax serving-load signal)."""
        since = datetime.now(UTC) - timedelta(seconds=window_s)
        t = schema.turns
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(t).where(t.c.kind == "llm", t.c.created_at >= since)).scalar_one()
        return n * 60.0 / window_s
