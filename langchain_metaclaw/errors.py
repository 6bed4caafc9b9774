"""Exceptions raised by langchain-metaclaw.

One root, :class:`MetaClawError`; each category also inherits the stdlib exception it replaces so that
existing ``except ValueError`` / ``except ImportError`` clauses keep working. Only ``cli.py`` turns these
into ``click.ClickException``.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "BackendUnavailableError",
    "ConfigurationError",
    "JudgeError",
    "MetaClawError",
    "StoreError",
    "TrainingError",
]


class MetaClawError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigurationError(MetaClawError, ValueError):
    """Options that contradict each other or name something that does not exist."""


class StoreError(MetaClawError, RuntimeError):
    """The trace store could not be opened, migrated, read or written."""


class AdapterError(MetaClawError, ValueError):
    """An adapter is corrupt, incompatible with the base model, or not in safetensors format."""


class JudgeError(MetaClawError, RuntimeError):
    """A judge call failed in a way that is not a single bad vote."""


class TrainingError(MetaClawError, RuntimeError):
    """A training backend refused or failed a step."""


class BackendUnavailableError(MetaClawError, ImportError):
    """An optional backend was requested but its extra is not installed."""

    def __init__(self, backend: str, extra: str, missing: str | None = None) -> None:
        self.backend = backend
        self.extra = extra
        self.missing = missing
        detail = f" (missing module: {missing})" if missing else ""
        super().__init__(
            f"The {backend!r} backend needs optional dependencies{detail}: "
            f"pip install 'langchain-metaclaw[{extra}]'"
        )

    def __reduce__(self):  # keep it picklable across process pools
        return (type(self), (self.backend, self.extra, self.missing))
