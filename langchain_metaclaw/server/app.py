"""The FastAPI app of ``metaclaw serve`` and the uvicorn server that runs it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from langchain_metaclaw._compat import require
from langchain_metaclaw.server.auth import BearerAuth, check_bind, secret_value
from langchain_metaclaw.server.handler import ChatServer
from langchain_metaclaw.server.protocol import (
    DEFAULT_MAX_TOKENS,
    APIError,
    ChatCompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    as_api_error,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

logger = logging.getLogger(__name__)


def create_app(
    backend: LocalServingBackend | None = None,
    *,
    api_key: str | SecretStr | None = None,
    served_model_name: str | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """The FastAPI app: vLLM-shaped chat completions, models listing and dynamic LoRA over ``backend``.

    Args:
        backend: a :class:`~langchain_metaclaw.chat_model.backends.local.LocalServingBackend`; ``None`` builds
            one on the embedded SmolLM2.
        api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise). Only
            what is passed counts here; :func:`serve` falls back to ``METACLAW_API_KEY``.
        served_model_name: the ``model`` name of the base (default: the backend's base model name; that
            name is accepted too).
        default_max_tokens: new tokens when a request sets no limit.
    """
    fastapi = require("fastapi", backend="serve", extra="serve")
    if backend is None:
        from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

        backend = LocalServingBackend()
    server = ChatServer(backend, served_model_name or backend.model_name, default_max_tokens)
    app = fastapi.FastAPI(title="metaclaw serve", version="1")
    app.state.metaclaw = server
    _add_error_handlers(app)
    _add_routes(app, server)
    key = secret_value(api_key)
    if key is not None:
        app.add_middleware(BearerAuth, key=SecretStr(key))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors in vLLM's shape; FastAPI's 422 for invalid fields becomes vLLM's 400."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(APIError)
    async def _api_error(request: Any, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
            for err in exc.errors()
        )
        return JSONResponse(APIError(400, problems or "Invalid request.", "InvalidUserInput").body(),
                            status_code=400)


def _add_routes(app: FastAPI, server: ChatServer) -> None:
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    def list_models() -> JSONResponse:
        return JSONResponse(server.models())

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(server.load_adapter(body))

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        return PlainTextResponse(server.unload_adapter(body))

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatCompletionRequest) -> Any:
        request, adapter, options = server.prepare(body)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(server.stream(request, adapter, options, include_usage),
                                     media_type="text/event-stream")
        try:
            completion = server.backend.complete(request, adapter)
        except Exception as exc:
            raise as_api_error(exc) from exc
        return JSONResponse(server.response(completion, options))


def make_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | SecretStr | None = None,
    base_model: str | None = None,
    *,
    backend: LocalServingBackend | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> Any:
    """A ready ``uvicorn.Server`` (call ``.run()``; tests run it in a thread and set ``should_exit``).

    ``api_key=None`` falls back to ``METACLAW_API_KEY``. Raises ``ConfigurationError`` before loading any
    model when ``host`` is not loopback and there is no key.
    """
    from langchain_metaclaw.config import get_settings

    key = secret_value(api_key) or secret_value(get_settings().api_key)
    check_bind(host, key)
    uvicorn = require("uvicorn", backend="serve", extra="serve")
    require("fastapi", backend="serve", extra="serve")
    if backend is None:
        from langchain_metaclaw.chat_model.backends.local import LocalServingBackend

        backend = LocalServingBackend(base_model)
    app = create_app(backend, api_key=key, served_model_name=served_model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=True,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | SecretStr | None = None,
    base_model: str | None = None,
    *,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve the local backend over HTTP until interrupted (what ``metaclaw serve`` runs).

    Binds ``127.0.0.1:8000`` by default. Any other address needs an API key (``api_key=`` or
    ``METACLAW_API_KEY``), else ``ConfigurationError``; with a key every request needs
    ``Authorization: Bearer <key>``. ``base_model=None`` serves the embedded SmolLM2-135M-Instruct.
    """
    server = make_server(host, port, api_key, base_model, served_model_name=served_model_name,
                         log_level=log_level)
    auth = "API key required" if server.config.app.user_middleware else "no API key (loopback only)"
    logger.info("metaclaw serve on http://%s:%d/v1 (%s)", host, port, auth)
    server.run()
