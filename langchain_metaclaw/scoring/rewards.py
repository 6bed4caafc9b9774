"""Programmatic rewards: plain callables registered by name, stored as ``source="rule:<name>"``.

A reward is ``fn(turn: Turn, episode: Episode | None) -> float | None``; ``None`` means "not applicable"
(no score row is written, and the rule is asked again on a later run, when more of the episode may have
been captured). A rule that also needs the rest of the episode declares a keyword-only ``context``
parameter and receives a :class:`RuleContext`. Rules run on llm (assistant) turns, the turns training
learns from.

>>> @register_reward("short_answer")
... def short_answer(turn, episode):
...     text = (turn.output_message or {}).get("data", {}).get("content") or ""
...     return 1.0 if len(text) < 400 else -1.0
>>> score_pending(store, rules=["short_answer", "tool_call_succeeded"])      # doctest: +SKIP

Built-ins use the judge's scale (+1 good, -1 bad): ``tool_call_succeeded``, ``json_valid`` (and
:func:`json_valid_reward` for a JSON-schema variant registered under your own name), ``no_error``.
A rule that raises, or returns something that is not a finite number or ``None``, is logged and counted by
the scorer and never stops it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from langchain_metaclaw._compat import accepts_keyword
from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.messages import content_text

if TYPE_CHECKING:
    from langchain_metaclaw.store.records import Episode, Turn

__all__ = [
    "RewardFn",
    "RuleContext",
    "evaluate_reward",
    "get_reward",
    "json_valid_reward",
    "list_rewards",
    "register_reward",
    "rule_source",
    "unregister_reward",
]

RewardFn: TypeAlias = Callable[..., float | None]
"""``(turn, episode) -> float | None``, optionally with a keyword-only ``context: RuleContext``."""

UNKNOWN_REWARD_ERROR = "unknown reward rule {name!r}; registered: {known}"
BAD_RETURN_ERROR = "reward rule {name!r} returned {value!r}: expected a finite number or None"


@dataclass(frozen=True)
class RuleContext:
    """The rest of the episode, for rules that declare a ``context`` keyword."""

    episode_turns: tuple[Turn, ...] = ()
    """Every turn of the episode, in store order (llm and tool)."""
    tool_turns: tuple[Turn, ...] = field(default=())
    """The tool turns that answered this turn's tool calls (matched by ``tool_call_id``)."""


@dataclass(frozen=True)
class _Rule:
    fn: RewardFn
    wants_context: bool


_REGISTRY: dict[str, _Rule] = {}


def rule_source(name: str) -> str:
    """The ``scores.source`` of a rule: ``rule:<name>``."""
    return f"rule:{name}"


@overload
def register_reward(name: str, fn: RewardFn, *, replace: bool = False) -> RewardFn: ...
@overload
def register_reward(name: str, fn: None = None, *, replace: bool = False) -> Callable[[RewardFn], RewardFn]: ...


def register_reward(name: str, fn: RewardFn | None = None, *, replace: bool = False):
    """Register ``fn`` as the reward rule ``name`` (scores get ``source="rule:<name>"``).

    Use it as a call, ``register_reward("json_ok", fn)``, or as a decorator, ``@register_reward("json_ok")``.
    Registering a different function under a taken name raises ``ConfigurationError`` unless
    ``replace=True``.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,58}", name):
        msg = f"reward rule names are 1-58 characters of letters, digits, '_', '.', '-': got {name!r}"
        raise ConfigurationError(msg)

    def add(func: RewardFn) -> RewardFn:
        if not callable(func):
            msg = f"reward rule {name!r} must be callable, got {type(func).__name__}"
            raise ConfigurationError(msg)
        current = _REGISTRY.get(name)
        if current is not None and current.fn is not func and not replace:
            msg = f"a different reward rule is already registered as {name!r} (pass replace=True to replace it)"
            raise ConfigurationError(msg)
        _REGISTRY[name] = _Rule(fn=func, wants_context=accepts_keyword(func, "context"))
        return func

    return add if fn is None else add(fn)


def unregister_reward(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_reward(name: str) -> RewardFn:
    """The rule registered as ``name``."""
    rule = _REGISTRY.get(name)
    if rule is None:
        msg = UNKNOWN_REWARD_ERROR.format(name=name, known=", ".join(sorted(_REGISTRY)) or "none")
        raise ConfigurationError(msg)
    return rule.fn


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def evaluate_reward(name: str, turn: Turn, episode: Episode | None, context: RuleContext | None = None) -> float | None:
    """Run rule ``name`` on ``turn``: its float, or ``None`` (not applicable). Raises what the rule raises,
    and ``ValueError`` for a return value that is not a finite number or ``None``."""
    get_reward(name)
    rule = _REGISTRY[name]
    if rule.wants_context:
        value = rule.fn(turn, episode, context=context or RuleContext())
    else:
        value = rule.fn(turn, episode)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(BAD_RETURN_ERROR.format(name=name, value=value))
    return float(value)


# ---------------------------------------------------------------------------------------------- built-ins


def _output(turn: Turn) -> Mapping[str, Any]:
    message = turn.output_message or {}
    return message.get("data", message) if isinstance(message, Mapping) else {}


def tool_call_succeeded(turn: Turn, episode: Episode | None, *, context: RuleContext) -> float | None:
    """+1 when every tool call of the turn ran without error, -1 when one failed or was malformed.

    ``None`` (not applicable) for a turn without tool calls, and while a call's tool turn is not captured.
    """
    data = _output(turn)
    calls = [c for c in data.get("tool_calls") or [] if isinstance(c, Mapping)]
    if data.get("invalid_tool_calls"):
        return -1.0
    if not calls:
        return None
    by_id = {t.tool_call_id: t for t in context.tool_turns if t.tool_call_id}
    ran = [by_id.get(c.get("id")) for c in calls]
    if any(t is None for t in ran):
        return None
    return 1.0 if all(t.status == "ok" for t in ran) else -1.0


_FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", re.DOTALL)


def json_valid_reward(schema: Mapping[str, Any] | None = None) -> RewardFn:
    """A rule: +1 when the turn's text is JSON (matching ``schema``, a JSON Schema, when given), else -1.

    A Markdown code fence around the JSON is accepted. ``None`` for a turn with no text (e.g. only tool
    calls). Register it under your own name: ``register_reward("order_json", json_valid_reward(schema))``.
    """
    validator = None
    if schema is not None:
        try:
            import jsonschema
        except ImportError as exc:  # pragma: no cover - jsonschema ships with the dev and local extras
            msg = "json_valid_reward(schema=...) needs the jsonschema package: pip install jsonschema"
            raise ConfigurationError(msg) from exc
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            msg = f"invalid JSON schema for json_valid_reward: {exc.message}"
            raise ConfigurationError(msg) from exc
        validator = cls(schema)

    def json_valid(turn: Turn, episode: Episode | None) -> float | None:
        text = content_text(_output(turn).get("content")).strip()
        if not text:
            return None
        fenced = _FENCE_RE.match(text)
        if fenced:
            text = fenced.group(1).strip()
        try:
            value = json.loads(text)
        except ValueError:
            return -1.0
        if validator is not None and not validator.is_valid(value):
            return -1.0
        return 1.0

    json_valid.__doc__ = json_valid_reward.__doc__
    return json_valid


def no_error(turn: Turn, episode: Episode | None) -> float:
    """+1 when the call succeeded and produced no malformed tool call, -1 otherwise."""
    if turn.status != "ok" or _output(turn).get("invalid_tool_calls"):
        return -1.0
    return 1.0


register_reward("tool_call_succeeded", tool_call_succeeded)
register_reward("json_valid", json_valid_reward())
register_reward("no_error", no_error)
