"""Scoring: turn captured traces into rewards, from evidence (DESIGN decision 4).

Three sources of reward, all stored as ``scores`` rows with their source:

- ``prm``: a judge model grades each assistant turn from its output, its tool results, the context and the
  user's *next* message; majority of N votes with a timeout each (:func:`create_prm_graph`);
- ``feedback``: explicit user feedback (``store.add_feedback`` / ``store.thumbs``);
- ``rule:<name>``: programmatic rewards registered with :func:`register_reward`.

:func:`score_pending` runs all three once over whatever is not scored yet (``metaclaw score`` and the
scheduler call it); :func:`rollup` and :func:`judge_health` read the results back.

Importing this package is cheap; LangGraph is imported when the graph is first built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from langchain_metaclaw._compat import lazy_exports

if TYPE_CHECKING:
    from langchain_metaclaw.scoring.evidence import gather_evidence
    from langchain_metaclaw.scoring.graph import PRMInput, PRMOutput, PRMState, create_prm_graph
    from langchain_metaclaw.scoring.judge import DEFAULT_RUBRIC, build_judge_messages, parse_judge_answer
    from langchain_metaclaw.scoring.rewards import (
        RuleContext,
        get_reward,
        json_valid_reward,
        list_rewards,
        register_reward,
    )
    from langchain_metaclaw.scoring.scorer import (
        ScoringReport,
        ascore_pending,
        judge_health,
        rollup,
        score_pending,
    )
    from langchain_metaclaw.scoring.types import JUDGE_TAG, TurnEvidence

_dynamic_imports = {
    "TurnEvidence": "types",
    "gather_evidence": "evidence",
    "PRMInput": "graph",
    "PRMOutput": "graph",
    "PRMState": "graph",
    "create_prm_graph": "graph",
    "DEFAULT_RUBRIC": "judge",
    "JUDGE_TAG": "types",
    "build_judge_messages": "judge",
    "parse_judge_answer": "judge",
    "RuleContext": "rewards",
    "get_reward": "rewards",
    "json_valid_reward": "rewards",
    "list_rewards": "rewards",
    "register_reward": "rewards",
    "ScoringReport": "scorer",
    "ascore_pending": "scorer",
    "judge_health": "scorer",
    "rollup": "scorer",
    "score_pending": "scorer",
}

__all__ = [
    "DEFAULT_RUBRIC",
    "JUDGE_TAG",
    "PRMInput",
    "PRMOutput",
    "PRMState",
    "RuleContext",
    "ScoringReport",
    "TurnEvidence",
    "ascore_pending",
    "build_judge_messages",
    "create_prm_graph",
    "gather_evidence",
    "get_reward",
    "json_valid_reward",
    "judge_health",
    "list_rewards",
    "parse_judge_answer",
    "register_reward",
    "rollup",
    "score_pending",
]


__getattr__, __dir__ = lazy_exports(__name__, _dynamic_imports)
