"""The engine's sampling parameters, per-token rules and decode loop, on a scripted model (no weights).

The fake model always predicts "the next letter": after token ``t`` comes ``t + 1``, and token ``EOS`` ends.
So a prompt ending in ``c`` greedily completes ``d e f ...`` and each row's end is known in advance, which
lets the tests check each rule (EOS, stop strings with holdback, budget) and that one row decoded alone
records exactly what it records inside a batch, with finished rows dropped or kept.
"""

from __future__ import annotations

import string

import pytest

from langchain_metaclaw.engine.decoding import Row, TokenRules, decode, find_stop
from langchain_metaclaw.engine.sampling import SamplingParams
from langchain_metaclaw.errors import ConfigurationError

torch = pytest.importorskip("torch")

VOCAB = 12
EOS = VOCAB - 1  # "l" never shows: EOS is special


def _text(ids) -> str:
    return "".join(string.ascii_lowercase[t] for t in ids if t != EOS)


class _Cache:
    """Stands in for a transformers cache: only the batch operations the loop calls."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def batch_repeat_interleave(self, n: int) -> None:
        self.rows *= n

    def batch_select_indices(self, index) -> None:
        self.rows = len(index)


def _forward(input_ids, cache=None, logits_to_keep=1, **extra):
    """Logits that make ``last token + 1`` the clear favourite at every position."""
    nxt = (input_ids + 1).clamp(max=EOS)
    logits = torch.full((*input_ids.shape, VOCAB), -5.0).scatter(-1, nxt[..., None], 5.0)
    assert cache is None or cache.rows == input_ids.shape[0]
    return logits, cache if cache is not None else _Cache(input_ids.shape[0])


def _row(prompt: list[int], budget: int = 8) -> Row:
    return Row(prompt=prompt, generator=torch.Generator().manual_seed(0), matcher=None, record={},
               max_new_tokens=budget)


def _decode(rows: list[Row], params: SamplingParams, *, drop_finished: bool = True, track: bool = False) -> list[Row]:
    rules = TokenRules(frozenset({EOS}), params.stop, _text, track_text=track)
    for _ in decode(_forward, rows, params, rules, None, pad_token_id=0, drop_finished=drop_finished):
        pass
    for row in rows:
        row.text = rules.final_text(row)
    return rows


def _summary(row: Row) -> tuple:
    return row.completion, row.text, row.finish, row.stop_hit, len(row.logprobs)


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("inf")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_sampling_params_refuse_out_of_range_values(kwargs, message) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_and_record() -> None:
    params = SamplingParams(temperature=1, top_k=5, stop=["", "ab", "x"], seed=[3, 4], json_schema={"type": "object"})
    assert params.stop == ("ab", "x") and params.seed == (3, 4) and params.holdback == 1
    assert isinstance(params.temperature, float) and not params.greedy
    assert params.row_seeds(2) == [3, 4]
    with pytest.raises(ConfigurationError, match="2 seeds for 3 rows"):
        params.row_seeds(3)
    assert SamplingParams(seed=7).row_seeds(3) == SamplingParams(seed=7).row_seeds(3) != SamplingParams(seed=8).row_seeds(3)
    assert params.record(9, 4) == {"temperature": 1.0, "top_p": 1.0, "top_k": 5, "greedy": False,
                                   "constrained": True, "seed": 9, "max_new_tokens": 4,
                                   "json_schema": {"type": "object"}}


# ---------------------------------------------------------------------------------------------- rules


def test_find_stop_takes_the_earliest_match() -> None:
    assert find_stop("abcdef", ["ef", "cd"], 0) == (2, "cd")
    assert find_stop("abcdef", ["cd"], 3) is None


def test_rules_end_rows_by_eos_stop_string_and_budget() -> None:
    rows = _decode([_row([7]), _row([1]), _row([0], budget=3)], SamplingParams(stop=["efg"]))
    eos, stop, length = rows
    assert _summary(eos) == ([8, 9, 10, EOS], "ijk", "stop", None, 4)  # EOS kept in the ids, not the text
    assert _summary(stop) == ([2, 3, 4, 5, 6], "cd", "stop", "efg", 5)  # trimmed text, every id kept
    assert _summary(length) == ([1, 2, 3], "bcd", "length", None, 3)


def test_a_stop_string_across_tokens_is_found_with_holdback() -> None:
    # "de" completes only when "e" arrives; the search restarts holdback (1) character before the new text
    (row,) = _decode([_row([1])], SamplingParams(stop=["de"]), track=True)
    assert (row.text, row.stop_hit, row.completion) == ("c", "de", [2, 3, 4])


# ---------------------------------------------------------------------------------------------- the loop


def test_a_row_records_the_same_alone_and_in_a_batch_dropped_or_kept() -> None:
    params = SamplingParams(stop=["gh"])
    prompts = [[7], [1, 2], [4], [0]]  # EOS at step 4, "gh" at step 5, "gh" at step 3, budget at step 5
    alone = [_summary(_decode([_row(p, budget=5)], params, track=True)[0]) for p in prompts]
    dropped = [_summary(r) for r in _decode([_row(p, budget=5) for p in prompts], params)]
    kept = [_summary(r) for r in _decode([_row(p, budget=5) for p in prompts], params, drop_finished=False)]
    assert alone == dropped == kept
    assert [(s[2], s[3]) for s in alone] == [("stop", None), ("stop", "gh"), ("stop", "gh"), ("length", None)]


def test_sampled_rows_draw_from_their_own_generator() -> None:
    params = SamplingParams(temperature=50.0, max_new_tokens=5)  # near-uniform: the draws decide

    def rows():
        return [Row(prompt=[0], generator=torch.Generator().manual_seed(s), matcher=None, record={},
                    max_new_tokens=5) for s in (1, 2, 1)]

    first, second = _decode(rows(), params), _decode(rows(), params)
    assert [r.completion for r in first] == [r.completion for r in second]
    assert first[0].completion == first[2].completion
    assert all(lp <= 0.0 for r in first for lp in r.logprobs)
