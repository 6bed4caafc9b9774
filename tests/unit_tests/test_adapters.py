"""AdapterRegistry: candidates, promotion, rollback history, and bad adapters refused before anything changes.

The history tests use tiny fake adapter directories (file-level checks only, no model). The last group
promotes real adapters through ``MetaClawChatModel.promote``, whose validator loads them against the base
model: a corrupt file, pickled weights, another rank or another base model is refused with an
``AdapterError`` that says what is wrong, the version is marked ``rejected``, and serving does not change.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from langchain_metaclaw.adapters import AdapterRegistry, validate_adapter_dir
from langchain_metaclaw.errors import AdapterError
from langchain_metaclaw.store.trace_store import TraceStore
from tests.fixtures.adapters import tiny_lora
from tests.fixtures.chat import (  # noqa: F401 (serving_engine is a fixture)
    ADAPTER_PROMPT,
    copy_adapter,
    corrupt,
    edit_config,
    pickle_only,
    serving_engine,
)


def fake_adapter(path: Path, *, r: int = 2) -> Path:
    """A small LoRA that passes the whole validator against the embedded model (no model is loaded)."""
    return tiny_lora(path, r=r)


@pytest.fixture
def registry() -> AdapterRegistry:
    return AdapterRegistry(TraceStore("sqlite://"))


def _statuses(registry: AdapterRegistry) -> dict[str, str]:
    return {a.version: a.status for a in registry.versions()}


# ---------------------------------------------------------------------------------------------- history


def test_register_makes_numbered_candidates_and_nothing_serves(registry, tmp_path) -> None:
    v1 = registry.register(fake_adapter(tmp_path / "a"), base_model="SmolLM2-135M-Instruct", metrics={"reward": 0.4})
    v2 = registry.register(fake_adapter(tmp_path / "b"), parent_version=v1.version)
    assert (v1.version, v2.version) == ("v1", "v2")
    assert v1.status == v2.status == "candidate"
    assert registry.get("v2").parent_version == "v1"
    assert registry.get("v1").metrics == {"reward": 0.4}
    assert registry.current() is None
    with pytest.raises(AdapterError, match="no adapter version 'v9'"):
        registry.get("v9")


def test_promote_retires_the_previous_version_and_rollback_walks_back(registry, tmp_path) -> None:
    for name in "abc":
        registry.register(fake_adapter(tmp_path / name))
    registry.promote("v1")
    assert registry.current().version == "v1"
    assert registry.get("v1").promoted_at is not None
    registry.promote("v2")
    registry.promote("v3", notes="reward 0.61 vs 0.55")
    assert _statuses(registry) == {"v1": "retired", "v2": "retired", "v3": "serving"}
    assert registry.get("v3").notes == "reward 0.61 vs 0.55"

    assert registry.rollback().version == "v2"  # the most recently serving one before v3
    assert _statuses(registry) == {"v1": "retired", "v2": "serving", "v3": "rolled_back"}
    assert registry.rollback().version == "v1"
    assert _statuses(registry) == {"v1": "serving", "v2": "rolled_back", "v3": "rolled_back"}
    assert registry.rollback() is None  # nothing before v1: the base model serves
    assert registry.current() is None
    assert _statuses(registry) == {"v1": "rolled_back", "v2": "rolled_back", "v3": "rolled_back"}


def test_rollback_to_a_named_version_and_promote_after_a_rollback(registry, tmp_path) -> None:
    for name in "abc":
        registry.register(fake_adapter(tmp_path / name))
    registry.promote("v1")
    registry.promote("v2")
    registry.promote("v3")
    assert registry.rollback(to="v1").version == "v1"
    assert _statuses(registry) == {"v1": "serving", "v2": "retired", "v3": "rolled_back"}
    registry.promote("v3")  # a rolled-back version can be promoted again
    assert registry.current().version == "v3"
    assert registry.rollback().version == "v1"  # v1 served last before v3


def test_rollback_refuses_a_rejected_version(registry, tmp_path) -> None:
    registry.register(fake_adapter(tmp_path / "a"))
    registry.register(fake_adapter(tmp_path / "b"))
    registry.promote("v1")

    def refuse(adapter) -> None:
        raise ValueError("reward dropped from 0.6 to 0.2")

    with pytest.raises(AdapterError, match="adapter v2 failed validation: reward dropped from 0.6 to 0.2"):
        registry.promote("v2", validator=refuse)
    assert registry.get("v2").status == "rejected"
    assert "reward dropped" in registry.get("v2").notes
    with pytest.raises(AdapterError, match="cannot roll back to adapter v2: it was rejected"):
        registry.rollback(to="v2")
    assert registry.current().version == "v1"


def test_concurrent_registrations_get_distinct_versions(tmp_path) -> None:
    store = TraceStore(f"sqlite:///{tmp_path / 'metaclaw.db'}")
    paths = [fake_adapter(tmp_path / f"a{i}") for i in range(6)]
    got: list[str] = []
    errors: list[BaseException] = []

    def register(path: Path) -> None:
        try:
            got.append(AdapterRegistry(store).register(path).version)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(got) == [f"v{i}" for i in range(1, 7)]


def test_remote_adapters_skip_the_file_checks(registry) -> None:
    v = registry.register("tinker://run-1/sampler_weights/000100", backend="tinker")
    registry.promote(v.version)
    assert registry.current().uri == "tinker://run-1/sampler_weights/000100"


# ---------------------------------------------------------------------------------------------- file checks


def test_register_refuses_pickled_weights_a_broken_file_and_non_lora(registry, tmp_path) -> None:
    with pytest.raises(AdapterError, match=r"no adapter_model.safetensors \(found pickled weights: adapter_model.bin\); "
                                           "only safetensors adapters are loaded"):
        registry.register(pickle_only(fake_adapter(tmp_path / "bin")))
    with pytest.raises(AdapterError, match="are corrupt"):
        registry.register(corrupt(fake_adapter(tmp_path / "corrupt")))
    with pytest.raises(AdapterError, match="only LoRA adapters can be served"):
        registry.register(edit_config(fake_adapter(tmp_path / "ia3"), peft_type="IA3"))
    with pytest.raises(AdapterError, match="does not exist"):
        registry.register(tmp_path / "missing")
    assert registry.versions() == []
    assert validate_adapter_dir(fake_adapter(tmp_path / "ok"))["peft_type"] == "LORA"


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (corrupt, r"adapter weights at .*adapter_model.safetensors are corrupt"),
        (pickle_only, r"has no adapter_model.safetensors \(found pickled weights: adapter_model.bin\)"),
    ],
    ids=["corrupt", "bin-only"],
)
def test_files_broken_after_registration_are_refused_at_promotion(registry, tmp_path, damage, match) -> None:
    registry.register(fake_adapter(tmp_path / "good"))
    registry.promote("v1")
    path = fake_adapter(tmp_path / "bad")
    registry.register(path)
    damage(path)
    with pytest.raises(AdapterError, match=match):
        registry.promote("v2")
    assert registry.current().version == "v1"
    assert _statuses(registry) == {"v1": "serving", "v2": "rejected"}


def test_a_serving_version_that_fails_revalidation_keeps_serving(registry, tmp_path) -> None:
    path = fake_adapter(tmp_path / "a")
    registry.register(path)
    registry.promote("v1")
    corrupt(path)
    with pytest.raises(AdapterError, match="corrupt"):
        registry.promote("v1")
    assert registry.current().version == "v1"  # marking it rejected would switch every model to the base


# ---------------------------------------------------------------------------------------------- against the model


@pytest.mark.model
@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("corrupt", r"adapter weights at .* are corrupt"),
        ("bin_only", "only safetensors adapters are loaded"),
        ("wrong_rank", r"does not fit base model .*wrong shape \(rank r=4 in the config\)"),
        ("wrong_base", "was trained on base model 'Qwen/Qwen2.5-0.5B-Instruct', but this engine serves"),
    ],
)
def test_bad_adapters_are_refused_at_promotion_and_serving_is_unchanged(
    serving_engine, two_adapters, tmp_path, case, match  # noqa: F811
) -> None:
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

    store = TraceStore("sqlite://")
    registry = AdapterRegistry(store)
    registry.register(two_adapters[0])
    llm = MetaClawChatModel(store=store, temperature=0, max_tokens=4)
    try:
        llm.promote("v1")
        before = llm.invoke(ADAPTER_PROMPT)
        assert before.response_metadata["adapter_version"] == "v1"

        path = copy_adapter(two_adapters[1], tmp_path / case)
        if case == "wrong_rank":
            edit_config(path, r=4)  # the tensors are rank 8
        elif case == "wrong_base":
            edit_config(path, base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
        registry.register(path)  # passes the file checks; the damage below comes after registration
        if case == "corrupt":
            corrupt(path)
        elif case == "bin_only":
            pickle_only(path)

        with pytest.raises(AdapterError, match=match):
            llm.promote("v2")
        assert registry.get("v2").status == "rejected"
        assert registry.current().version == "v1"
        assert llm.refresh() == "v1" == llm.serving_version
        after = llm.invoke(ADAPTER_PROMPT)
        assert after.response_metadata["adapter_version"] == "v1"
        assert after.content == before.content
        assert (after.response_metadata["metaclaw"]["completion_token_ids"]
                == before.response_metadata["metaclaw"]["completion_token_ids"])
    finally:
        llm.close()


def test_concurrent_promotions_leave_exactly_one_serving(store, tmp_path):
    """Many promotions racing on one store (SQLite, and PostgreSQL under READ COMMITTED) never leave two
    versions serving."""
    registry = AdapterRegistry(store)
    versions = [registry.register(fake_adapter(tmp_path / f"a{i}")).version for i in range(6)]
    threads = [threading.Thread(target=registry.promote, args=(v,)) for v in versions for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.adapters(status="serving")) == 1


# ---------------------------------------------------------------------------------------------- wrong shapes


def test_cli_refuses_a_wrong_shape_adapter_with_one_line_and_marks_it_rejected(tmp_path) -> None:
    """No model is loaded: the registry builds the base on the meta device and dry-runs the tensors."""
    from click.testing import CliRunner

    from langchain_metaclaw.cli import cli

    url = f"sqlite:///{tmp_path / 'metaclaw.db'}"
    registry = AdapterRegistry(TraceStore(url))
    registry.register(fake_adapter(tmp_path / "good"))
    registry.register(tiny_lora(tmp_path / "wide", hidden_size=1024))  # trained for another model width
    runner = CliRunner()
    assert runner.invoke(cli, ["adapters", "promote", "v1", "--store", url]).exit_code == 0
    refused = runner.invoke(cli, ["adapters", "promote", "v2", "--store", url])
    assert refused.exit_code == 1
    assert "Traceback" not in refused.output
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: Adapter 'v2'")
    assert "does not fit base model 'SmolLM2-135M-Instruct'" in lines[0]
    assert "(1024, 2)" in lines[0] or "(2, 1024)" in lines[0]  # says which shape is wrong
    assert "trained on another base model" in lines[0]  # and what to look at
    assert registry.get("v2").status == "rejected"
    assert "does not fit base model" in registry.get("v2").notes
    assert registry.current().version == "v1"
    assert registry.get("v1").status == "serving"


def test_a_rank_that_disagrees_with_the_config_is_refused_without_a_model(registry, tmp_path) -> None:
    registry.register(edit_config(fake_adapter(tmp_path / "r2"), r=4))  # tensors are rank 2
    with pytest.raises(AdapterError, match=r"wrong shape \(rank r=4 in the config\)"):
        registry.promote("v1")
    assert registry.get("v1").status == "rejected"
    assert registry.current() is None


@pytest.mark.model
def test_a_model_started_after_a_refused_promotion_serves_the_previous_version(
    serving_engine, two_adapters, tmp_path  # noqa: F811
) -> None:
    """The bug as a user met it: the CLI promoted a wrong-shape adapter, and every agent process started
    afterwards failed its first request. Now the CLI refuses it and a new model serves v1 from the start."""
    from click.testing import CliRunner

    from langchain_metaclaw.chat_model.base import MetaClawChatModel
    from langchain_metaclaw.cli import cli

    url = f"sqlite:///{tmp_path / 'metaclaw.db'}"
    registry = AdapterRegistry(TraceStore(url))
    registry.register(two_adapters[0])
    registry.register(tiny_lora(tmp_path / "wide", hidden_size=1024))
    runner = CliRunner()
    assert runner.invoke(cli, ["adapters", "promote", "v1", "--store", url]).exit_code == 0
    assert runner.invoke(cli, ["adapters", "promote", "v2", "--store", url]).exit_code == 1
    assert registry.get("v2").status == "rejected"

    llm = MetaClawChatModel(store=TraceStore(url), temperature=0, max_tokens=4)
    try:
        first = llm.invoke(ADAPTER_PROMPT)
        second = llm.invoke(ADAPTER_PROMPT)
    finally:
        llm.close()
    assert first.response_metadata["adapter_version"] == second.response_metadata["adapter_version"] == "v1"
    assert first.content == second.content


@pytest.mark.model
def test_a_registry_version_that_does_not_load_never_fails_a_request_nor_loops(
    serving_engine, two_adapters, tmp_path, monkeypatch, caplog  # noqa: F811
) -> None:
    """A store written before validation existed (or by hand) names a bad serving version: the follower keeps
    serving what it has, logs once, and does not re-read the same bad file every poll."""
    import time

    from langchain_metaclaw.chat_model.backends.local import LocalServingBackend
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

    store = TraceStore(f"sqlite:///{tmp_path / 'metaclaw.db'}")
    registry = AdapterRegistry(store)
    registry.register(two_adapters[0])
    registry.promote("v1")
    store.add_adapter("v2", backend="local", uri=str(tiny_lora(tmp_path / "wide", hidden_size=1024)))
    attempts: list[str] = []
    load = LocalServingBackend.load_adapter

    def counting(self, version, uri):
        attempts.append(version)
        return load(self, version, uri)

    monkeypatch.setattr(LocalServingBackend, "load_adapter", counting)
    llm = MetaClawChatModel(store=store, temperature=0, max_tokens=4, poll_interval=0.02,
                            preload_candidates=False)
    try:
        assert llm.invoke(ADAPTER_PROMPT).response_metadata["adapter_version"] == "v1"
        store.switch_serving_adapter("v2", retire_as="retired")  # bypasses the registry's checks
        time.sleep(0.5)  # ~25 polls
        assert llm.invoke(ADAPTER_PROMPT).response_metadata["adapter_version"] == "v1"
    finally:
        llm.close()
    assert sum(1 for name in attempts if name.startswith("v2-")) == 1
    errors = [r for r in caplog.records if "could not switch to the registry's adapter" in r.getMessage()]
    assert len(errors) == 1 and "still serving v1" in errors[0].getMessage()


# ---------------------------------------------------------------------------------------------- holds


class _RecordingBackend:
    """A serving backend's adapter half that records its loads and unloads."""

    name = "fake"

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.calls: list[tuple[str, str]] = []
        self.refuse = refuse

    def load_adapter(self, version: str, uri: str) -> None:
        if version in self.refuse:
            raise AdapterError(f"{version} does not fit")
        self.calls.append(("load", version))

    def unload_adapter(self, version: str) -> None:
        self.calls.append(("unload", version))


def test_a_version_is_loaded_on_the_first_hold_and_unloaded_by_the_last_release() -> None:
    from langchain_metaclaw.adapters import AdapterFollower

    backend = _RecordingBackend(refuse={"bad"})
    follower = AdapterFollower.for_backend(backend)
    assert AdapterFollower.for_backend(backend) is follower  # one per process and target
    follower.hold("v1", "/a")  # a chat model serving it
    follower.hold("v1", "/a")  # another one
    follower.pin("v1")  # a request of the first
    follower.release("v1")
    follower.release("v1")  # both models let go: the request still holds it
    assert backend.calls == [("load", "v1")] and follower.holders("v1") == 1
    follower.release("v1")  # the request ends
    assert backend.calls == [("load", "v1"), ("unload", "v1")] and follower.holders("v1") == 0
    with pytest.raises(AdapterError, match="bad does not fit"):
        follower.hold("bad", "/b")
    assert follower.holders("bad") == 0
    with pytest.raises(AdapterError, match="not held"):
        follower.pin("v2")  # a request never loads


def test_a_strict_release_that_cannot_unload_keeps_the_hold_and_says_so() -> None:
    """The server's unload endpoint must not answer "removed" while the engine still holds the adapter."""
    from langchain_metaclaw.adapters import AdapterFollower

    class _Busy(_RecordingBackend):
        def unload_adapter(self, version: str) -> None:
            raise AdapterError(f"Adapter {version!r} is still used by 1 request(s) after 60 s; not unloaded.")

    follower = AdapterFollower.for_backend(_Busy())
    follower.hold("v1", "/a")
    with pytest.raises(AdapterError, match="still used"):
        follower.release("v1", strict=True)
    assert follower.holders("v1") == 1  # still held: a later unload can try again
    follower.release("v1")  # not strict (a chat model letting go): logged, never raised
    assert follower.holders("v1") == 0


def test_a_version_without_local_weights_is_retried_on_the_next_poll(tmp_path) -> None:
    """A remote backend's load that fails once (a network error) is not remembered as a refusal."""
    from langchain_metaclaw.adapters import RegistryWatch

    class _Flaky(_RecordingBackend):
        name = "openai"
        failures = 1

        def load_adapter(self, version: str, uri: str) -> None:
            if self.failures:
                self.failures -= 1
                raise AdapterError("connection refused")
            super().load_adapter(version, uri)

    class _Settings:
        adapter = None
        poll_interval = 60.0
        preload_candidates = False

    store = TraceStore(f"sqlite:///{tmp_path / 'metaclaw.db'}")
    store.add_adapter("v1", backend="openai", uri="/models/on-the-vllm-host/v1")
    AdapterRegistry(store).promote("v1")  # another backend's path: no local file checks
    settings = _Settings()
    watch = RegistryWatch(_Flaky(), store, settings)
    with pytest.raises(AdapterError, match="connection refused"):
        watch.sync()
    watch.sync()  # tried again, and served
    assert watch.serving == ("v1", "v1")


def test_a_promotion_this_environment_cannot_check_does_not_reject_the_version(registry, tmp_path) -> None:
    """An unreadable base model (offline, no config) is the environment's problem, not the adapter's."""
    from langchain_metaclaw.errors import ConfigurationError

    registry.store.add_adapter("v1", backend="local", uri=str(tiny_lora(tmp_path / "a")),
                               base_model=str(tmp_path / "no-such-base"))
    with pytest.raises(ConfigurationError, match="Cannot read the structure of base model"):
        registry.promote("v1")
    assert _statuses(registry) == {"v1": "candidate"}
