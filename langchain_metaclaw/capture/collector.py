"""TurnCollector: capture records kept in memory, for tests (langchain-core's ``RunCollectorCallbackHandler``).

The same hooks and core as :class:`~langchain_metaclaw.capture.handler.MetaClawCallbackHandler`, persisted to
a list: a test of what capture records needs no database, no spool and no writer thread.
"""

from __future__ import annotations

import copy

from langchain_metaclaw.capture._core import Record, with_message_dicts
from langchain_metaclaw.capture.base import BaseCaptureHandler


class TurnCollector(BaseCaptureHandler):
    """Keep every capture record, in the order the callback events came, in :attr:`records`.

    Example:
        .. code-block:: python

            collector = TurnCollector()
            agent.invoke(inputs, config={"callbacks": [collector]})
            [turn["kind"] for turn in collector.turns()]
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []

    def _persist(self, records: list[Record]) -> None:
        # A copy with the input messages as dicts: the history as the model saw it at this call.
        self.records.extend(copy.deepcopy(with_message_dicts(record)) for record in records)

    def turns(self, kind: str | None = None, episode_id: str | None = None) -> list[Record]:
        """Turn records in the order the store reads them (start time, then sequence)."""
        turns = [r for r in self.records if r["type"] == "turn" and (kind is None or r["kind"] == kind)
                 and (episode_id is None or r["episode_id"] == episode_id)]
        return sorted(turns, key=lambda r: (r["started_at"], r["seq"]))

    def episodes(self) -> dict[str, Record]:
        """Episodes by id, folded as the store folds them: the first record's fields, the latest end."""
        episodes: dict[str, Record] = {}
        for record in self.records:
            if record["type"] == "turn":
                continue
            episode = episodes.setdefault(record["id"], {"status": "running", "ended_at": None, "error": None,
                                                         **record})
            if record.get("ended_at") is not None:
                episode.update(ended_at=record["ended_at"], status=record["status"], error=record["error"])
        return episodes
