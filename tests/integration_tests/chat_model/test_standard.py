"""langchain-tests' standard integration suite against the local backend (in-process SmolLM2, no network).

Greedy decoding with ``max_tokens=16`` keeps it fast; forced tool calls and structured output get the
``constrained_min_tokens`` floor (128), which the grammar ends as soon as the JSON closes (~20-45 tokens).

Expected failures, all limits of a 135M model rather than of the integration (see the reasons below):
``test_agent_loop`` (no unprompted tool call) and the joke-schema structured-output tests (greedy repetition
inside a free-text JSON string until the token budget ends).
"""

from __future__ import annotations

from typing import Any, Literal

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_metaclaw.chat_model.base import MetaClawChatModel
from tests.fixtures.chat import serving_engine  # noqa: F401 (fixture)

pytestmark = pytest.mark.model

JOKE_LOOP = (
    "SmolLM2-135M decoding greedily repeats itself inside a free-text JSON string (the joke's setup: 'The cat "
    "was a cat, and it was a cat, ...') until the token budget ends, so the grammar-constrained call never "
    "closes. Which schema form loops depends on tiny prompt differences (the pydantic Joke closes in 43 "
    "tokens; typeddict, dict-schema, pydantic.v1 and Optional forms loop). Not run: each attempt decodes the "
    "whole budget (~15 s on 2 CPU cores). Structured output itself is covered by "
    "tests/unit_tests/chat_model/test_chat_model.py::test_structured_output."
)
NO_UNPROMPTED_TOOL_CALL = (
    "SmolLM2-135M answers 'What is the weather in San Francisco, CA?' in prose instead of calling the bound "
    "tool when tool_choice is not forced (it has no tool-calling training); forced calls (tool_choice) pass "
    "test_tool_calling, test_tool_choice and test_structured_few_shot_examples."
)


@pytest.fixture(autouse=True)
def _session_engine(serving_engine) -> None:  # noqa: F811
    """Serve from the session's engine: the model is loaded and wrapped once, with one torch thread."""


class TestMetaClawChatModelLocal(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[MetaClawChatModel]:
        return MetaClawChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"backend": "local", "temperature": 0, "max_tokens": 16, "timeout": 60, "max_retries": 2}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True  # name, "any"/"required": grammar-constrained decoding

    @property
    def has_structured_output(self) -> bool:
        return True  # through forced tool calls

    @property
    def supports_json_mode(self) -> bool:
        return False  # no response_format / json_mode method

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # the base model is fixed per instance (one engine per base model)

    @pytest.mark.xfail(reason=JOKE_LOOP, run=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(
        self, model: BaseChatModel, schema_type: Literal["pydantic", "typeddict", "json_schema"]
    ) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=JOKE_LOOP, run=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(
        self, model: BaseChatModel, schema_type: Literal["pydantic", "typeddict", "json_schema"]
    ) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=JOKE_LOOP, run=False)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=JOKE_LOOP, run=False)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=NO_UNPROMPTED_TOOL_CALL)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
