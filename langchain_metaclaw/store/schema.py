"""The trace store's tables: the single source of truth for the current schema.

Every stage of the loop reads its input from these tables and writes its output to them (DESIGN: data
flows one way), so each stage can crash and restart without losing work. Upgrades of an existing
database go through ``migrations.py``; a new database is created from these definitions directly.

Times are stored in UTC and read back as aware UTC datetimes (:class:`UTCDateTime`), on SQLite as on
PostgreSQL, so no reader has to repair a naive value. JSON columns hold LangChain-serialised messages, token ids and logprobs.
Turns reference episodes by id without a foreign-key constraint on purpose: capture writes are
idempotent upserts that may arrive in any order after a spool replay.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA_VERSION = 1
"""Bumped with every migration in ``migrations.MIGRATIONS``."""

metadata = MetaData()

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that writes UTC and always reads back an aware UTC datetime.

    SQLite has no time zone type: SQLAlchemy stores the wall time and drops the offset, so an aware value
    in another zone would be stored wrong and every value comes back naive. PostgreSQL returns aware values
    in the session's zone. Here every bound value is converted to UTC first (which also keeps SQLite's
    text comparison in time order) and every result is aware UTC. A naive value is taken to be UTC already
    (what ``datetime.utcnow()`` and older SQLite rows hold) rather than refused, so existing callers that
    bind the naive UTC wall time keep working. The DDL is the one ``DateTime(timezone=True)`` emits.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            msg = f"expected a datetime for a UTCDateTime column, got {type(value).__name__}"
            raise TypeError(msg)
        if value.tzinfo is None or value.utcoffset() is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


episodes = Table(
    "episodes",
    metadata,
    Column("id", String(128), primary_key=True, doc="thread id when LangGraph gave one, else the root run id"),
    Column("thread_id", String(128), index=True),
    Column("root_run_id", String(64), doc="first root run seen for this episode"),
    Column("graph_name", String(256)),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("status", String(16), nullable=False, default="running", doc="running | ok | error"),
    Column("error", Text),
    Column("metadata", JSONType),
)

turns = Table(
    "turns",
    metadata,
    Column("id", String(64), primary_key=True, doc="LangChain run id"),
    Column("seq", Integer, doc="order of completion within the capturing process"),
    Column("parent_run_id", String(64)),
    Column("root_run_id", String(64), index=True),
    Column("episode_id", String(128), index=True, nullable=False),
    Column("kind", String(8), nullable=False, doc="llm | tool"),
    Column("name", String(256), doc="model class or tool name"),
    Column("node", String(256), doc="LangGraph node (langgraph_node)"),
    Column("step", Integer, doc="LangGraph superstep (langgraph_step)"),
    Column("checkpoint_ns", String(512), doc="sub-graph namespace (checkpoint_ns)"),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("latency_ms", Float),
    Column("status", String(8), nullable=False, doc="ok | error"),
    Column("error", Text),
    Column("input_messages", JSONType, doc="llm: messages sent to the model (LangChain dicts)"),
    Column("output_message", JSONType, doc="llm: the AIMessage, tool calls included"),
    Column("tool_name", String(256)),
    Column("tool_call_id", String(128)),
    Column("tool_args", JSONType),
    Column("tool_result", Text),
    Column("usage", JSONType, doc="input_tokens / output_tokens / total_tokens"),
    Column("model_name", String(256)),
    Column("adapter_version", String(128), index=True),
    Column("prompt_token_ids", JSONType),
    Column("completion_token_ids", JSONType),
    Column("logprobs", JSONType, doc="behaviour (sampling) logprobs of completion_token_ids"),
    Column("tokens_source", String(16), doc="engine | retokenized (llm only)"),
    Column("sampling", JSONType, doc="temperature / top_p / constrained: what the logprobs are of"),
    Column("invocation_params", JSONType),
    Column("tags", JSONType),
    Column("metadata", JSONType),
    Column("created_at", UTCDateTime, nullable=False),
)
Index("ix_turns_episode_started", turns.c.episode_id, turns.c.started_at)
Index("ix_turns_kind_created", turns.c.kind, turns.c.created_at)

scores = Table(
    "scores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("turn_id", String(64), index=True, nullable=False),
    Column("episode_id", String(128), index=True),
    Column("source", String(64), nullable=False, doc="prm | feedback | rule:<name>"),
    Column("key", String(128), nullable=False, default="reward"),
    Column("value", Float, doc="None while unscored"),
    Column("confidence", Float),
    Column("status", String(16), nullable=False, default="scored", doc="scored | unscored"),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=1),
    Column("details", JSONType, doc="votes, judge model, rubric, ..."),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("turn_id", "source", "key", name="uq_scores_turn_source_key"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("run_id", String(64), index=True, nullable=False),
    Column("key", String(128), nullable=False, default="user_score"),
    Column("score", Float),
    Column("value", JSONType),
    Column("comment", Text),
    Column("correction", JSONType),
    Column("source_info", JSONType),
    Column("created_at", UTCDateTime, nullable=False),
)

adapters = Table(
    "adapters",
    metadata,
    Column("version", String(128), primary_key=True),
    Column("parent_version", String(128)),
    Column("backend", String(32), nullable=False, doc="local | openai | tinker | mint"),
    Column("base_model", String(512)),
    Column("uri", Text, nullable=False, doc="local safetensors dir, tinker:// path, or served model name"),
    Column("status", String(16), nullable=False, doc="candidate | serving | retired | rolled_back | rejected"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("promoted_at", UTCDateTime),
    Column("metrics", JSONType),
    Column("notes", Text),
)

train_runs = Table(
    "train_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("status", String(16), nullable=False, doc="running | ok | skipped | stopped | interrupted | error"),
    Column("reason", Text, doc="why it did nothing / stopped / failed"),
    Column("backend", String(32)),
    Column("base_adapter", String(128)),
    Column("candidate_adapter", String(128)),
    Column("steps", Integer, nullable=False, default=0),
    Column("samples", JSONType, doc="turn ids trained on"),
    Column("metrics", JSONType),
    Column("config", JSONType),
)

judge_calls = Table(
    "judge_calls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("turn_id", String(64), index=True),
    Column("judge", String(256)),
    Column("outcome", String(16), nullable=False, doc="ok | unparseable | refused | timeout | error"),
    Column("latency_ms", Float),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("created_at", UTCDateTime, nullable=False),
)

schedule_events = Table(
    "schedule_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False, index=True),
    Column("event", String(32), nullable=False, doc="opened | closed | skipped | run_started | run_ended"),
    Column("reasons", JSONType),
    Column("details", JSONType),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
)

migrations_table = Table(
    "_metaclaw_migrations",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", UTCDateTime, nullable=False),
)
