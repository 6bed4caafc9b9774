"""Serving backends behind MetaClawChatModel: ``local`` (transformers + peft), ``openai``, ``tinker``."""

from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest, ServingBackend

__all__ = ["Completion", "CompletionRequest", "ServingBackend"]
