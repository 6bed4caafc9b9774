"""langchain-tests' standard unit suite for MetaClawChatModel (construction only: no model is loaded)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_metaclaw.chat_model.base import MetaClawChatModel


class TestMetaClawChatModelUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[MetaClawChatModel]:
        return MetaClawChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # the suite adds its standard params (temperature, max_tokens, timeout, stop, max_retries, api_key)
        return {"poll_interval": 0.25}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return (
            {"METACLAW_API_KEY": "env-key"},
            {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "served-model"},
            {"api_key": "env-key", "base_url": "http://127.0.0.1:9/v1", "model_name": "served-model"},
        )

    @property
    def supports_model_override(self) -> bool:
        # the base model is fixed per instance (local: one engine per base; a per-call model would load another)
        return False
