"""``metaclaw serve``: an OpenAI-compatible server over the local backend, with vLLM's request/response shapes.

Any OpenAI client (``ChatOpenAI``, the ``openai`` SDK, ``MetaClawChatModel(backend="openai")``) can talk to it,
and so can tools written for vLLM: the same extension fields and the same dynamic-LoRA endpoints.

Endpoints
---------
``POST /v1/chat/completions``
    OpenAI chat completions, non-streaming or SSE streaming (``data: {...}`` chunks, then ``data: [DONE]``).
    ``model`` picks what answers: the served base name (or the base model id) for the base, or the name of a
    loaded adapter. Supported fields: ``messages``, ``model``, ``max_tokens`` / ``max_completion_tokens``,
    ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``, ``n`` (1 only), ``stream``,
    ``stream_options.include_usage``, ``tools``, ``tool_choice`` (``"auto"``, ``"none"``, ``"required"``
    or a named function: forced calls are decoded under a JSON-schema grammar), ``response_format``
    (``json_object`` / ``json_schema``), ``logprobs`` (``top_logprobs`` must be 0: the engine records the
    sampled token's logprob only). vLLM extensions, with vLLM's current names:

    - ``return_tokens_as_token_ids: true``: logprob tokens are rendered ``"token_id:<id>"``.
    - ``return_token_ids: true``: the response carries ``prompt_token_ids`` at the top level and
      ``choices[0].token_ids`` (every generated id, including a final EOS). When streaming,
      ``prompt_token_ids`` comes in the first chunk, as in vLLM; ``token_ids`` (and ``logprobs``) come
      all together in the chunk that carries ``finish_reason`` (the engine releases text later than tokens,
      so per-delta token alignment is not available; the concatenation over chunks is what vLLM gives).
    - ``structured_outputs: {"json": schema}`` (and the older ``guided_json``) constrain like
      ``response_format`` json_schema.

    The logprobs are the engine's *behaviour* logprobs: of ``softmax(logits / T)`` after top-p truncation
    and any grammar mask (vLLM's ``--logprobs-mode processed_logprobs``); for ``temperature=0`` of the raw
    logits. ``prompt_logprobs`` and ``n > 1`` are refused with 400.

    Tools are rendered into the system prompt exactly as :class:`MetaClawChatModel` does locally
    (:func:`~langchain_metaclaw.messages.convert_messages`), so a request through this server
    gives the same tokens as the same request in process. ``tool_choice="none"`` leaves the tools out of the
    prompt. A tool-call block whose arguments do not parse is returned as a tool call with the raw
    ``arguments`` string (clients such as langchain-openai turn it into an ``invalid_tool_call``); a block
    with no readable name stays in ``content``.
``GET /v1/models``
    ``{"object": "list", "data": [ModelCard, ...]}``: the base (``parent: null``) and every loaded adapter
    (``root``: its path, ``parent``: the base name).
``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``
    Validates and loads a peft LoRA adapter (safetensors only) under its own name. 200 with the text
    ``Success: LoRA adapter '<name>' added successfully.``; 400 (``InvalidUserInput``) when a field is missing,
    the name is taken or ``load_inplace`` is asked (load each version under a new name instead, DESIGN
    decision 6); 400 (``BadRequestError``) with the ``AdapterError`` message when the adapter is refused.
``POST /v1/unload_lora_adapter`` ``{"lora_name"}``
    200 ``Success: LoRA adapter '<name>' removed successfully.`` once no request holds it; 404
    (``NotFoundError``) for an unknown name.
``GET /health``
    200, empty body.

Errors use vLLM's shape: ``{"error": {"message", "type", "param", "code"}}``; an unknown ``model`` is 404,
invalid fields are 400 (not FastAPI's 422).

Security: :func:`serve` binds ``127.0.0.1`` by default and refuses any other address unless an API key is
set (``api_key=`` or ``METACLAW_API_KEY``). With a key, every request (the OpenAPI docs included) needs
``Authorization: Bearer <key>``; anything else gets 401. The comparison is constant-time and the key is
never logged or echoed.
"""

from __future__ import annotations

from langchain_metaclaw.server.app import create_app, make_server, serve
from langchain_metaclaw.server.auth import check_bind, is_loopback

__all__ = ["check_bind", "create_app", "is_loopback", "make_server", "serve"]
