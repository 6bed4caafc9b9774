"""Adapter versions: the one validator, the registry in the store, and the one follower per process.

- :mod:`~langchain_metaclaw.adapters.validate`: files, LoRA config, dry run against the base model;
- :mod:`~langchain_metaclaw.adapters.registry`: :class:`AdapterRegistry` (candidates, promotion, rollback);
- :mod:`~langchain_metaclaw.adapters.follower`: :class:`AdapterFollower` (which versions this process holds).

Importing this package does not import torch.
"""

from langchain_metaclaw.adapters.follower import AdapterFollower, RegistryWatch
from langchain_metaclaw.adapters.registry import AdapterRegistry, Validator, check_adapter
from langchain_metaclaw.adapters.validate import REMOTE_SCHEMES, validate_adapter_dir

__all__ = [
    "REMOTE_SCHEMES",
    "AdapterFollower",
    "AdapterRegistry",
    "RegistryWatch",
    "Validator",
    "check_adapter",
    "validate_adapter_dir",
]
