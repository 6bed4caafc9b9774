"""LocalEngine on the real embedded SmolLM2: greedy/sampled generation, exact logprobs, stop strings, adapters
pinned per request under concurrency, refused adapters, JSON-schema constrained decoding, and batched decoding
(``sample_group``, ``generate_batch``) checked row by row against ``generate`` and the teacher-forced recompute.

Every generation is at most 16 new tokens (24 in the printed speed comparison, marked slow); the whole file
takes 1-2 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from langchain_metaclaw.engine.local import BASE_ADAPTER, GenerationResult, LocalEngine
from langchain_metaclaw.engine.sampling import SamplingParams, behaviour_logprobs
from langchain_metaclaw.errors import AdapterError, ConfigurationError
from tests.fixtures.model import ADAPTER_PROMPT

pytestmark = pytest.mark.model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(local_engine: LocalEngine, two_adapters: tuple[Path, Path]) -> LocalEngine:
    """The session engine with the two test adapters loaded as ``test-a`` and ``test-b``."""
    for name, path in zip(("test-a", "test-b"), two_adapters, strict=True):
        if name not in local_engine.adapters:
            local_engine.load_adapter(name, path)
    return local_engine


@pytest.fixture(scope="module")
def reference(engine: LocalEngine) -> dict[str | None, GenerationResult]:
    """Single-threaded greedy answers to ``ADAPTER_PROMPT`` for the base model and each adapter."""
    return {
        name: engine.generate(ADAPTER_PROMPT, adapter=name, max_new_tokens=12)
        for name in (None, "test-a", "test-b")
    }


def _assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    assert max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < ATOL, (a, b)


# ---------------------------------------------------------------------------------------------- generation


def test_greedy_answer_mentions_paris(engine: LocalEngine) -> None:
    result = engine.generate(FRANCE, max_new_tokens=16)
    assert "Paris" in result.text
    assert result.finish_reason == "stop" and result.stop_sequence is None
    assert result.completion_token_ids[-1] in engine.eos_token_ids  # EOS kept in the ids, not in the text
    assert len(result.logprobs) == len(result.completion_token_ids)
    assert all(lp <= 0.0 for lp in result.logprobs)
    assert result.prompt_token_ids == engine.encode_prompt(FRANCE)
    assert result.adapter is None
    assert result.sampling["greedy"] is True and result.sampling["constrained"] is False
    assert result.sampling["temperature"] == 0.0
    assert result.usage["output_tokens"] == len(result.completion_token_ids)


def test_greedy_logprobs_equal_teacher_forced_recompute(engine: LocalEngine) -> None:
    result = engine.generate(FRANCE, max_new_tokens=16)
    recomputed = engine.logprobs_of(result.prompt_token_ids, result.completion_token_ids, temperature=0.0)
    _assert_close(result.logprobs, recomputed)
    # messages are accepted too, and give the same prompt
    _assert_close(result.logprobs, engine.logprobs_of(FRANCE, result.completion_token_ids, temperature=0.0))


def test_sampled_logprobs_equal_teacher_forced_recompute_and_seed_reproduces(engine: LocalEngine) -> None:
    first = engine.generate(FRANCE, max_new_tokens=12, temperature=1.0, seed=7)
    again = engine.generate(FRANCE, max_new_tokens=12, temperature=1.0, seed=7)
    assert first.completion_token_ids == again.completion_token_ids
    assert first.sampling["seed"] == 7 and first.sampling["greedy"] is False
    assert len(first.logprobs) == len(first.completion_token_ids)
    recomputed = engine.logprobs_of(first.prompt_token_ids, first.completion_token_ids, temperature=1.0)
    _assert_close(first.logprobs, recomputed)


def test_truncated_sampling_logprobs_match_and_are_renormalised(engine: LocalEngine) -> None:
    result = engine.generate(FRANCE, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    sampling = {k: result.sampling[k] for k in ("temperature", "top_p", "top_k")}
    recomputed = engine.logprobs_of(result.prompt_token_ids, result.completion_token_ids, **sampling)
    _assert_close(result.logprobs, recomputed)
    # the behaviour distribution is the truncated one: it differs from plain softmax(logits / T)
    plain = engine.logprobs_of(result.prompt_token_ids, result.completion_token_ids, temperature=0.7)
    assert all(t >= p - ATOL for t, p in zip(result.logprobs, plain, strict=True))


def test_behaviour_logprobs_truncation_keeps_top_token() -> None:
    import torch

    logits = torch.tensor([5.0, 1.0, 0.0, -1.0])
    lp = torch.exp(_behaviour_logprobs_for(logits, 1.0, top_p=0.01, top_k=0))
    assert lp.tolist() == [1.0, 0.0, 0.0, 0.0]
    lp = torch.exp(_behaviour_logprobs_for(logits, 1.0, top_p=1.0, top_k=2))
    assert lp[2:].sum() == 0 and math.isclose(float(lp.sum()), 1.0, rel_tol=1e-6)


def _behaviour_logprobs_for(logits, temperature, *, top_p, top_k):
    return behaviour_logprobs(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k))


def test_stop_string_trims_text_and_keeps_ids(engine: LocalEngine) -> None:
    result = engine.generate(FRANCE, max_new_tokens=16, stop=["Paris"])
    assert result.finish_reason == "stop" and result.stop_sequence == "Paris"
    assert "Paris" not in result.text and result.text.startswith("The capital of France is")
    completion_text = engine.tokenizer.decode(result.completion_token_ids)
    assert (
        completion_text.endswith("Paris") or "Paris" in completion_text
    )  # ids up to and including the match
    assert len(result.logprobs) == len(result.completion_token_ids)


def test_max_new_tokens_gives_length(engine: LocalEngine) -> None:
    result = engine.generate(FRANCE, max_new_tokens=3)
    assert result.finish_reason == "length"
    assert len(result.completion_token_ids) == 3 == len(result.logprobs)


def test_stream_deltas_add_up_to_the_result(engine: LocalEngine) -> None:
    items = list(engine.stream(FRANCE, max_new_tokens=16, stop=[" Paris"]))
    deltas, final = items[:-1], items[-1]
    assert final[0] == "" and isinstance(final[1], GenerationResult)
    assert all(result is None for _, result in deltas) and len(deltas) >= 2
    assert "".join(delta for delta, _ in deltas) == final[1].text == "The capital of France is"


def test_invalid_arguments(engine: LocalEngine) -> None:
    with pytest.raises(ConfigurationError, match="temperature"):
        engine.generate(FRANCE, temperature=-1.0)
    with pytest.raises(ConfigurationError, match="exactly one"):
        engine.generate(FRANCE, prompt_token_ids=[1, 2])
    with pytest.raises(AdapterError, match="No adapter named 'nope'"):
        engine.generate(FRANCE, adapter="nope", max_new_tokens=1)


# ---------------------------------------------------------------------------------------------- adapters


def test_adapters_change_the_answer(engine: LocalEngine, reference) -> None:
    # sanity check: they're not the same
    base, a, b = (reference[name].completion_token_ids for name in (None, "test-a", "test-b"))
    assert base != a and base != b and a != b
    assert reference["test-a"].adapter == "test-a"
    # loading adapters did not activate them: the base answer is still the base model's
    assert "Paris" in reference[None].text


def test_adapter_logprobs_recompute_under_the_same_adapter(engine: LocalEngine, reference) -> None:
    result = reference["test-a"]
    _assert_close(
        result.logprobs,
        engine.logprobs_of(
            result.prompt_token_ids, result.completion_token_ids, adapter="test-a", temperature=0.0
        ),
    )
    under_base = engine.logprobs_of(result.prompt_token_ids, result.completion_token_ids, temperature=0.0)
    assert max(abs(x - y) for x, y in zip(result.logprobs, under_base, strict=True)) > 0.1


def test_concurrent_generation_pins_each_request_to_its_adapter(engine: LocalEngine, reference) -> None:
    """4 threads, each running base / test-a / test-b in a different rotation: every output must equal that
    adapter's single-threaded output (peft's set_adapter or hook-based adapter_names would mix them)."""
    order = [None, "test-a", "test-b"]
    mismatches: list[tuple[int, str | None, list[int]]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for step in range(3):
                name = order[(index + step) % 3]
                got = engine.generate(ADAPTER_PROMPT, adapter=name, max_new_tokens=12)
                if got.completion_token_ids != reference[name].completion_token_ids or got.adapter != name:
                    mismatches.append((index, name, got.completion_token_ids))
                _assert_close(got.logprobs, reference[name].logprobs)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not mismatches, mismatches


def test_loading_and_unloading_while_generating_mixes_nothing(
    engine, reference, base_model_and_tokenizer, tmp_path
):
    """DESIGN decision 6: a new version is loaded (and an old one unloaded) while other requests generate;
    none of them may see it. Adapter C also targets modules A and B do not (k, o, up projections)."""
    from tests.fixtures.model import save_test_adapter

    path_c = save_test_adapter(
        base_model_and_tokenizer[0],
        tmp_path / "adapter_c",
        seed=3,
        scale=1.3,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"),
    )
    order = [None, "test-a", "test-b"]
    mismatches: list[tuple[int, str | None]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def worker(index: int) -> None:
        step = 0
        try:
            while not done.is_set() or step < 2:
                name = order[(index + step) % 3]
                got = engine.generate(ADAPTER_PROMPT, adapter=name, max_new_tokens=12)
                if got.completion_token_ids != reference[name].completion_token_ids:
                    mismatches.append((index, name))
                step += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            engine.load_adapter("test-c", path_c)
            assert engine.generate(ADAPTER_PROMPT, adapter="test-c", max_new_tokens=2).adapter == "test-c"
            engine.unload_adapter("test-c")
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    assert not mismatches, mismatches


def _copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def _corrupt(path: Path) -> None:
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x07\x00" + data[2 : len(data) // 3])


def _pickle_only(path: Path) -> None:
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("corrupt", "not a valid safetensors file"),
        ("bin", "only safetensors adapters are loaded"),
        ("wrong_rank", r"wrong shape \(rank r=4"),
        ("wrong_base", "trained on base model 'Qwen/Qwen2.5-0.5B-Instruct'"),
        ("missing_modules", "match no module"),
        ("not_lora", "only LoRA adapters"),
        ("dora", "use_dora"),
    ],
)
def test_bad_adapter_is_refused_and_changes_nothing(
    engine, two_adapters, reference, tmp_path, case, match
) -> None:
    path = _copy_adapter(two_adapters[0], tmp_path / case)
    if case == "corrupt":
        _corrupt(path)
    elif case == "bin":
        _pickle_only(path)
    elif case == "wrong_rank":
        _edit_config(path, r=4)
    elif case == "wrong_base":
        _edit_config(path, base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    elif case == "missing_modules":
        _edit_config(path, target_modules=["c_attn"])
    elif case == "not_lora":
        _edit_config(path, peft_type="IA3")
    elif case == "dora":
        _edit_config(path, use_dora=True)
    before = engine.adapters
    modules_before = sum(1 for _ in engine._peft.modules())
    with pytest.raises(AdapterError, match=match):
        engine.load_adapter(f"bad-{case.replace('_', '-')}", path)
    assert engine.adapters == before
    assert sum(1 for _ in engine._peft.modules()) == modules_before
    assert set(engine._peft.peft_config) == {"__metaclaw_wrap__", *before}
    # the engine still serves, unchanged
    still = engine.generate(ADAPTER_PROMPT, adapter="test-a", max_new_tokens=4)
    assert still.completion_token_ids == reference["test-a"].completion_token_ids[:4]


def test_base_model_check_can_be_relaxed(engine, two_adapters, reference, tmp_path) -> None:
    path = _copy_adapter(two_adapters[0], tmp_path / "renamed-base")
    _edit_config(path, base_model_name_or_path="/models/my-copy-of-smollm")
    with pytest.warns(UserWarning, match="trained on base model '/models/my-copy-of-smollm'"):
        engine.load_adapter("test-renamed", path, check_base_model="warn")
    try:
        got = engine.generate(ADAPTER_PROMPT, adapter="test-renamed", max_new_tokens=4)
        assert got.completion_token_ids == reference["test-a"].completion_token_ids[:4]
    finally:
        engine.unload_adapter("test-renamed")


def test_duplicate_and_reserved_names_are_refused(engine, two_adapters) -> None:
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("test-a", two_adapters[0])
    with pytest.raises(AdapterError, match="Invalid adapter name"):
        engine.load_adapter(BASE_ADAPTER, two_adapters[0])
    with pytest.raises(AdapterError, match="Invalid adapter name"):
        engine.load_adapter("v1.2", two_adapters[0])


def test_unload_waits_for_requests_that_hold_the_adapter(engine, two_adapters, reference) -> None:
    engine.load_adapter("test-unload", two_adapters[1])
    assert "test-unload" in engine.adapters
    stream = engine.stream(ADAPTER_PROMPT, adapter="test-unload", max_new_tokens=12)
    next(stream)  # a request now holds the adapter
    with pytest.raises(AdapterError, match="still used by 1 request"):
        engine.unload_adapter("test-unload", timeout=0.1)
    assert "test-unload" in engine.adapters
    *_, (_, result) = stream  # the held request finishes with the adapter it started with
    assert result.completion_token_ids == reference["test-b"].completion_token_ids
    engine.unload_adapter("test-unload")
    assert "test-unload" not in engine.adapters
    assert "test-unload" not in engine._peft.peft_config
    with pytest.raises(AdapterError, match="No adapter named 'test-unload'"):
        engine.generate(ADAPTER_PROMPT, adapter="test-unload", max_new_tokens=1)
    with pytest.raises(AdapterError):
        engine.unload_adapter("test-unload")
    # the other adapters are untouched
    assert engine.generate(ADAPTER_PROMPT, adapter="test-b", max_new_tokens=12).completion_token_ids == (
        reference["test-b"].completion_token_ids
    )


# ---------------------------------------------------------------------------------------------- json schema

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates(engine: LocalEngine) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    result = engine.generate(FRANCE, max_new_tokens=16, json_schema=CITY_SCHEMA)
    value = json.loads(result.text)
    jsonschema.validate(value, CITY_SCHEMA)
    assert result.finish_reason == "stop"
    assert result.sampling["constrained"] is True and result.sampling["json_schema"] == CITY_SCHEMA
    # the recorded logprobs are of the masked distribution; the recompute replays the mask
    masked = engine.logprobs_of(
        result.prompt_token_ids, result.completion_token_ids, temperature=0.0, json_schema=CITY_SCHEMA
    )
    _assert_close(result.logprobs, masked)


def test_json_schema_sampled_under_an_adapter(engine: LocalEngine) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    result = engine.generate(
        ADAPTER_PROMPT, adapter="test-b", max_new_tokens=16, temperature=1.0, seed=11, json_schema=CITY_SCHEMA
    )
    if result.finish_reason == "stop":
        jsonschema.validate(json.loads(result.text), CITY_SCHEMA)
    else:  # cut by max_new_tokens: still a prefix the grammar allows
        assert result.text.startswith('{"city":')
    masked = engine.logprobs_of(
        result.prompt_token_ids,
        result.completion_token_ids,
        adapter="test-b",
        temperature=1.0,
        json_schema=CITY_SCHEMA,
    )
    _assert_close(result.logprobs, masked)


def test_invalid_json_schema_is_a_configuration_error(engine: LocalEngine) -> None:
    with pytest.raises(ConfigurationError, match="json_schema"):
        engine.generate(FRANCE, max_new_tokens=2, json_schema={"type": "no-such-type"})


# ---------------------------------------------------------------------------------------------- batched decoding


def _kind(engine: LocalEngine, result: GenerationResult) -> str:
    if result.completion_token_ids[-1] in engine.eos_token_ids:
        return "eos"
    return result.stop_sequence or result.finish_reason


def _same_as_generate(engine: LocalEngine, got: GenerationResult, **kwargs) -> None:
    """``got`` (a row of a batched decode) is what ``generate`` records for the same request and row seed."""
    one = engine.generate(
        prompt_token_ids=got.prompt_token_ids, adapter=got.adapter, seed=got.sampling["seed"], **kwargs
    )
    assert one.completion_token_ids == got.completion_token_ids
    assert (one.text, one.finish_reason, one.stop_sequence) == (
        got.text,
        got.finish_reason,
        got.stop_sequence,
    )
    assert one.sampling == got.sampling
    _assert_close(one.logprobs, got.logprobs)


def test_sample_group_rows_stop_independently_and_match_generate(engine: LocalEngine) -> None:
    """One group in which rows end by a stop string, by EOS and by max_new_tokens, each at its own step;
    each row equals ``generate`` with its recorded seed and its logprobs equal the teacher-forced recompute."""
    kwargs = {"max_new_tokens": 14, "temperature": 0.8, "stop": ["capital"]}
    group = engine.sample_group(FRANCE, n=8, seed=1, **kwargs)
    assert len(group) == 8
    kinds = [_kind(engine, r) for r in group]
    assert {"capital", "eos", "length"} <= set(kinds), kinds
    assert len({len(r.completion_token_ids) for r in group}) >= 3  # finished at different steps
    assert len({r.sampling["seed"] for r in group}) == 8
    for result in group:
        assert result.prompt_token_ids == engine.encode_prompt(FRANCE) and result.adapter is None
        assert len(result.logprobs) == len(result.completion_token_ids) <= 14
        assert result.sampling["greedy"] is False and result.sampling["temperature"] == 0.8
        if result.finish_reason == "length":
            assert len(result.completion_token_ids) == 14 and result.stop_sequence is None
        if result.stop_sequence:
            assert "capital" not in result.text
        recomputed = engine.logprobs_of(result.prompt_token_ids, result.completion_token_ids, temperature=0.8)
        _assert_close(result.logprobs, recomputed)
    for kind in ("capital", "eos", "length"):  # one row of each kind against generate()
        _same_as_generate(engine, group[kinds.index(kind)], **kwargs)


def test_sample_group_under_an_adapter_with_truncation(engine: LocalEngine) -> None:
    group = engine.sample_group(
        ADAPTER_PROMPT, n=4, adapter="test-a", max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.9, seed=4
    )
    for result in group:
        assert result.adapter == "test-a"
        sampling = {k: result.sampling[k] for k in ("temperature", "top_p", "top_k")}
        recomputed = engine.logprobs_of(
            result.prompt_token_ids, result.completion_token_ids, adapter="test-a", **sampling
        )
        _assert_close(result.logprobs, recomputed)
    _same_as_generate(engine, group[0], max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.9)


def test_sample_group_seed_reproduces_the_group(engine: LocalEngine) -> None:
    first = engine.sample_group(FRANCE, n=4, max_new_tokens=8, seed=123)
    again = engine.sample_group(FRANCE, n=4, max_new_tokens=8, seed=123)
    assert [r.completion_token_ids for r in first] == [r.completion_token_ids for r in again]
    assert [r.sampling for r in first] == [r.sampling for r in again]
    other = engine.sample_group(FRANCE, n=4, max_new_tokens=8, seed=124)
    assert [r.completion_token_ids for r in other] != [r.completion_token_ids for r in first]
    # explicit per-row seeds: a row is reproduced by its seed, whatever group it is in
    seeds = [r.sampling["seed"] for r in first]
    swapped = engine.sample_group(FRANCE, n=2, max_new_tokens=8, seed=[seeds[2], seeds[0]])
    assert [r.completion_token_ids for r in swapped] == [
        first[2].completion_token_ids,
        first[0].completion_token_ids,
    ]
    unseeded = engine.sample_group(FRANCE, n=2, max_new_tokens=2)
    assert all(isinstance(r.sampling["seed"], int) for r in unseeded)


def test_sample_group_greedy_rows_equal_generate(engine: LocalEngine, reference) -> None:
    group = engine.sample_group(ADAPTER_PROMPT, n=2, adapter="test-b", max_new_tokens=12, temperature=0.0)
    for result in group:
        assert result.completion_token_ids == reference["test-b"].completion_token_ids
        assert result.sampling["greedy"] is True
        _assert_close(result.logprobs, reference["test-b"].logprobs)


def test_sample_group_json_schema_has_a_matcher_per_row(engine: LocalEngine) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    group = engine.sample_group(
        FRANCE, n=3, max_new_tokens=16, temperature=1.0, seed=2, json_schema=CITY_SCHEMA
    )
    for result in group:
        assert result.sampling["constrained"] is True
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(result.text), CITY_SCHEMA)
        else:
            assert result.text.startswith('{"city":')
        masked = engine.logprobs_of(
            result.prompt_token_ids, result.completion_token_ids, temperature=1.0, json_schema=CITY_SCHEMA
        )
        _assert_close(result.logprobs, masked)
    assert len({tuple(r.completion_token_ids) for r in group}) > 1


def test_sample_group_invalid_arguments(engine: LocalEngine) -> None:
    with pytest.raises(ConfigurationError, match="n must be"):
        engine.sample_group(FRANCE, n=0)
    with pytest.raises(ConfigurationError, match="2 seeds for 3 rows"):
        engine.sample_group(FRANCE, n=3, seed=[1, 2])
    with pytest.raises(AdapterError, match="No adapter named 'nope'"):
        engine.sample_group(FRANCE, n=2, adapter="nope")
    with pytest.raises(ConfigurationError, match="exactly one"):
        engine.generate_batch(None)
    assert engine.generate_batch([]) == []


def test_batched_requests_pin_their_adapter_under_concurrency(engine: LocalEngine, reference) -> None:
    """Greedy groups and batches under one adapter while other threads generate under the others."""
    errors: list[BaseException] = []
    mismatches: list[tuple[str | None, list[int]]] = []

    def worker(name: str | None, batched: str) -> None:
        try:
            for _ in range(2):
                if batched == "group":
                    got = engine.sample_group(
                        ADAPTER_PROMPT, n=3, adapter=name, max_new_tokens=12, temperature=0.0
                    )
                elif batched == "batch":
                    got = engine.generate_batch([ADAPTER_PROMPT, FRANCE], adapter=name, max_new_tokens=12)[:1]
                else:
                    got = [engine.generate(ADAPTER_PROMPT, adapter=name, max_new_tokens=12)]
                for result in got:
                    if result.completion_token_ids != reference[name].completion_token_ids:
                        mismatches.append((name, result.completion_token_ids))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=args)
        for args in (("test-a", "group"), ("test-b", "batch"), (None, "one"), ("test-b", "group"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not mismatches, mismatches


EVAL_PROMPTS = [
    [{"role": "user", "content": text}]
    for text in (
        "What is the capital of France?",
        "Name a fruit.",
        "Hi",
        "Write one sentence about the sea, the wind, and the boats that sail over the waves at night.",
        "What is 2+2?",
        "Translate 'good morning' into Spanish.",
        "List three colors.",
        "Who wrote Hamlet?",
        "Give me a synonym for happy.",
    )
]


@pytest.mark.parametrize("adapter", [None, "test-b"])
def test_generate_batch_equals_generate_one_by_one(engine: LocalEngine, adapter) -> None:
    """Left-padded batches of different prompts give exactly the greedy tokens of ``generate`` (batch_size 4:
    three batches, the last of one prompt), in the order of the prompts."""
    batch = engine.generate_batch(EVAL_PROMPTS, adapter=adapter, max_new_tokens=16, batch_size=4)
    assert len(batch) == len(EVAL_PROMPTS)
    for prompt, got in zip(EVAL_PROMPTS, batch, strict=True):
        one = engine.generate(prompt, adapter=adapter, max_new_tokens=16)
        assert got.prompt_token_ids == one.prompt_token_ids
        assert got.completion_token_ids == one.completion_token_ids, (prompt, got.text, one.text)
        assert (got.text, got.finish_reason, got.adapter) == (one.text, one.finish_reason, adapter)
        _assert_close(got.logprobs, one.logprobs)


def test_generate_batch_stop_strings(engine: LocalEngine) -> None:
    prompts = [FRANCE, [{"role": "user", "content": "Name a fruit."}]]
    batch = engine.generate_batch(prompts, max_new_tokens=16, stop=["Paris"])
    one = engine.generate(FRANCE, max_new_tokens=16, stop=["Paris"])
    assert batch[0].stop_sequence == "Paris" and batch[0].text == one.text
    assert batch[0].completion_token_ids == one.completion_token_ids
    assert batch[1].stop_sequence is None


@pytest.mark.slow
def test_batched_sampling_speed_is_printed(engine: LocalEngine, capsys) -> None:
    """Not asserted (the machine is shared): tokens/s of 8 sequential generate() calls vs one sample_group."""
    import time

    import torch

    n, tokens = 8, 24
    kwargs = {"max_new_tokens": tokens, "temperature": 1.0}
    started = time.perf_counter()
    sequential = [engine.generate(FRANCE, seed=s, **kwargs) for s in range(n)]
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    group = engine.sample_group(FRANCE, n=n, seed=0, **kwargs)
    group_s = time.perf_counter() - started
    seq_tokens = sum(len(r.completion_token_ids) for r in sequential)
    group_tokens = sum(len(r.completion_token_ids) for r in group)
    with capsys.disabled():
        print(
            f"\n[{torch.get_num_threads()} thread(s)] n={n}, <= {tokens} tokens: sequential "
            f"{seq_tokens / sequential_s:.1f} tok/s, sample_group {group_tokens / group_s:.1f} tok/s "
            f"({(group_tokens / group_s) / (seq_tokens / sequential_s):.1f}x)"
        )
