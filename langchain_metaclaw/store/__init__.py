"""The trace store: schema, migrations, typed records and the crash-safe capture spool."""

from langchain_metaclaw.store.records import (
    AdapterVersion,
    Episode,
    Feedback,
    Score,
    TrainRun,
    Turn,
)
from langchain_metaclaw.store.trace_store import TraceStore

__all__ = ["AdapterVersion", "Episode", "Feedback", "Score", "TraceStore", "TrainRun", "Turn"]
