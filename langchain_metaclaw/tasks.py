"""Small built-in tasks with programmatic rewards, for the demo and the learning benchmark.

``ToolCallFormatTask``: the agent must answer a request with exactly one JSON tool call,
``{"name": "<tool>", "arguments": {"<arg>": "<value>"}}`` and nothing else, choosing the tool from the
list in its system prompt (as an agent sees its tools), and, once the tool has answered, reply in text.
Out of the box SmolLM2-135M copies the request's example (wrong tool, wrong value) and keeps talking
after it. Train and held-out prompts use different cities, dishes and phrases, so the held-out reward
measures the behaviour learned, not memorised answers.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SYSTEM = "You are a tool-calling assistant."

EXAMPLE = {"name": "get_time", "arguments": {"city": "Berlin"}}
INSTRUCTION = f" Reply with the tool call as JSON, e.g. {json.dumps(EXAMPLE)}"
"""Appended to every request: the example's city (Berlin) is in neither the train nor the held-out set."""

TOOLS = {
    "get_weather": ("city", "What's the weather like in {}?"),
    "get_time": ("city", "What time is it in {}?"),
    "find_recipe": ("dish", "Find me a recipe for {}."),
    "translate": ("text", "Translate '{}' into French."),
}
TOOL_LIST = "Tools: " + ", ".join(f"{name}({arg})" for name, (arg, _) in TOOLS.items()) + "."
TRAIN_VALUES = {
    "city": ["Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Delhi", "Quito", "Rome"],
    "dish": ["pancakes", "risotto", "ramen", "tacos", "falafel", "paella"],
    "text": ["good morning", "thank you", "see you soon", "where is the station"],
}
HELD_OUT_VALUES = {
    "city": ["Madrid", "Nairobi", "Seoul", "Lisbon", "Denver", "Hanoi"],
    "dish": ["lasagna", "sushi", "curry", "goulash"],
    "text": ["good night", "how are you", "I am hungry"],
}


@dataclass(frozen=True)
class TaskPrompt:
    messages: list[dict[str, str]]
    tool: str
    argument: str
    value: str


def _prompts(values: dict[str, list[str]]) -> list[TaskPrompt]:
    out = []
    for tool, (arg, template) in TOOLS.items():
        for value in values[arg]:
            out.append(TaskPrompt([{"role": "system", "content": f"{SYSTEM} {TOOL_LIST}"},
                                   {"role": "user", "content": template.format(value) + INSTRUCTION}],
                                  tool, arg, value))
    return out


class ToolCallFormatTask:
    """Prompts plus a reward in [0, 1]: 1 for one valid call with the right tool and argument value."""

    name = "tool_call_format"

    def __init__(self, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.train = _prompts(TRAIN_VALUES)
        self.held_out = _prompts(HELD_OUT_VALUES)
        rng.shuffle(self.train)
        rng.shuffle(self.held_out)
        self._by_user = {p.messages[-1]["content"]: p for p in self.train + self.held_out}

    def lookup(self, messages: Sequence[dict[str, Any]]) -> TaskPrompt | None:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        return self._by_user.get(users[-1]) if users else None

    def score_turns(self, store: Any, source: str = "rule:tool_call_format") -> int:
        """Score every captured llm turn of this task in ``store``; returns how many got a score.

        A turn whose answer was parsed into tool calls (an agent with tools bound) is scored on its first
        call, written back as the JSON the task asks for; one that did not parse, on its raw text.
        """
        from langchain_core.messages import messages_from_dict

        from langchain_metaclaw.messages import content_text, convert_messages

        scored = 0
        for turn in store.turns(kind="llm"):
            if turn.output_message is None:
                continue
            out = turn.output_message["data"]
            text = content_text(out.get("content"))
            if out.get("tool_calls"):
                call = out["tool_calls"][0]
                text = json.dumps({"name": call["name"], "arguments": call["args"]})
            elif out.get("invalid_tool_calls"):
                text = f"<tool_call>{out['invalid_tool_calls'][0].get('args') or ''}</tool_call>"
            reward = self.reward(convert_messages(messages_from_dict(turn.input_messages or [])), text)
            if reward is not None:
                store.add_score(turn.id, reward, source=source)
                scored += 1
        return scored

    def reward(self, messages: Sequence[dict[str, Any]], text: str) -> float | None:
        """``None`` for prompts that are not this task's (not applicable, never 0).

        An agent's turn after the tool result is scored too, and a call there earns 0: paid for the first
        call alone, RL carried the call into the turns after it (nothing told it to stop), and the demo's
        agent then called its tool again after every result until LangGraph's recursion limit, on every
        held-out request (measured).
        """
        prompt = self.lookup(messages)
        if prompt is None:
            return None
        if _answered_by_tool(messages):
            return 0.0 if _opens_with_call(text) or not text.strip() else 1.0
        return score_tool_call(text, prompt.tool, prompt.argument, prompt.value)


def _answered_by_tool(messages: Sequence[dict[str, Any]]) -> bool:
    """True when a tool result follows the last user message (the agent's turn after its call)."""
    for message in reversed(messages):
        if message.get("role") == "tool":
            return True
        if message.get("role") == "user":
            return False
    return False


def _opens_with_call(text: str) -> bool:
    """True for an answer that is (or starts as) a tool call, valid or not, in any form the task accepts."""
    return "<tool_call>" in text or _opening_call(text) is not None


def _opening_call(text: str) -> tuple[dict[str, Any], str] | None:
    """(call object, what follows it) when ``text`` opens with a JSON ``{"name", "arguments"}`` object, bare,
    in a ``<tool_call>`` wrapper or in a json code fence."""
    candidate = text.strip()
    if candidate.startswith("<tool_call>"):
        candidate = candidate.removeprefix("<tool_call>").strip()
        candidate = candidate.replace("</tool_call>", "", 1)
    if candidate.startswith("```"):
        candidate = candidate.removeprefix("```json").removeprefix("```").strip()
        candidate = candidate.replace("```", "", 1)
    try:
        data, end = json.JSONDecoder().raw_decode(candidate)
    except ValueError:
        return None
    if not isinstance(data, dict) or "name" not in data or not isinstance(data.get("arguments"), dict):
        return None
    return data, candidate[end:]


def score_tool_call(text: str, tool: str, argument: str, value: str) -> float:
    """Graded, so that a group of mostly-wrong answers still has a gradient, 0.25 for each of:
    the answer opens with a JSON call object (``{"name", "arguments"}``; a ``<tool_call>`` wrapper or a
    json code fence is accepted), the tool is right, the argument value is right, and nothing follows it,
    that last one only for a call that answers this request (right tool or right value).

    Why the condition: RL found two ways to be paid without reading the request. One answer for every
    request (``get_weather`` / ``Berlin``) collected "a call and nothing after it" everywhere, and, when
    the request's example copied verbatim was paid less, near-copies (``"Berl"``, ``"AMEX"``) were found
    within 20 steps (measured). A call that answers no part of the request now earns 0.25 at most.
    """
    opening = _opening_call(text)
    if opening is None:
        return 0.0
    data, rest = opening
    got = data["arguments"].get(argument)
    right_tool = data["name"] == tool
    right_value = isinstance(got, str) and got.strip().lower() == value.lower()
    reward = 0.25 + 0.25 * right_tool + 0.25 * right_value
    if (right_tool or right_value) and not rest.strip():
        reward += 0.25
    return reward


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval, clipped to [0, 1] (rewards here are in [0, 1])."""
    n = len(values)
    if n == 0:
        return (float("nan"),) * 3
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)
