"""Settings: environment variables ``METACLAW_*`` and an optional ``metaclaw.toml``.

One variable, ``METACLAW_HOME``, relocates all state (database, spool, adapters, checkpoints), the way
``LLM_USER_PATH`` does for ``simonw/llm``; tests point it at a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

APP_NAME = "langchain-metaclaw"


def metaclaw_home() -> Path:
    """Directory for all mutable state; ``METACLAW_HOME`` wins over the platform default."""
    env = os.environ.get("METACLAW_HOME")
    path = Path(env) if env else Path(platformdirs.user_data_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """Directory for re-creatable files (the safetensors copy of the embedded model)."""
    env = os.environ.get("METACLAW_CACHE_DIR")
    path = Path(env) if env else Path(platformdirs.user_cache_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_store_url() -> str:
    return f"sqlite:///{metaclaw_home() / 'metaclaw.db'}"


class MetaClawSettings(BaseSettings):
    """Process-wide defaults. Every field can be overridden per object; these are only fallbacks."""

    model_config = SettingsConfigDict(
        env_prefix="METACLAW_", toml_file="metaclaw.toml", extra="ignore", populate_by_name=True
    )

    store_url: str | None = None
    """SQLAlchemy URL of the trace store; ``None`` means ``sqlite:///$METACLAW_HOME/metaclaw.db``."""
    base_model: str | None = None
    """Base model for the local backend; ``None`` means the embedded SmolLM2-135M-Instruct."""
    api_key: SecretStr | None = None
    """Key that ``metaclaw serve`` requires when bound to a non-loopback address."""
    judge_model: str | None = None
    """Model name for the default PRM judge (an OpenAI-compatible chat model)."""
    judge_base_url: str | None = None
    """Base URL of the judge's OpenAI-compatible endpoint."""
    torch_threads: int = Field(default=0, ge=0)
    """Threads for local torch work; 0 means torch's default."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        from pydantic_settings import TomlConfigSettingsSource

        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def resolved_store_url(self) -> str:
        return self.store_url or default_store_url()


def get_settings() -> MetaClawSettings:
    """Fresh settings each call, so tests that change the environment see the change."""
    return MetaClawSettings()
