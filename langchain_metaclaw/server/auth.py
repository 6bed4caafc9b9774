"""Who may use the server: loopback binding without a key, and the bearer-token ASGI middleware."""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from pydantic import SecretStr

from langchain_metaclaw.errors import ConfigurationError
from langchain_metaclaw.server.protocol import APIError

__all__ = ["BearerAuth", "check_bind", "is_loopback", "secret_value"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def secret_value(api_key: str | SecretStr | None) -> str | None:
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    return api_key or None


def check_bind(host: str, api_key: str | SecretStr | None) -> None:
    """Refuse to serve on a non-loopback address without an API key (raises ``ConfigurationError``)."""
    if not is_loopback(host) and secret_value(api_key) is None:
        msg = (
            f"Refusing to bind {host!r} without an API key: anyone who can reach it could use the model and "
            "load adapters. Set METACLAW_API_KEY (or pass api_key=/--api-key), or bind 127.0.0.1."
        )
        raise ConfigurationError(msg)


class BearerAuth:
    """Pure ASGI middleware: every HTTP request needs ``Authorization: Bearer <key>`` (constant-time compare)."""

    def __init__(self, app: Any, key: SecretStr) -> None:  # a SecretStr, so no repr shows it
        self.app = app
        self._key = key.get_secret_value().encode()

    def __repr__(self) -> str:  # never show the key
        return "BearerAuth(key=***)"

    def _ok(self, scope: dict[str, Any]) -> bool:
        value = b""
        for name, raw in scope.get("headers", ()):
            if name == b"authorization":
                value = raw
                break
        scheme, _, token = value.strip().partition(b" ")
        # compare even when the scheme is wrong, so timing does not tell which part failed
        good_token = hmac.compare_digest(token.strip(), self._key)
        return good_token and scheme.lower() == b"bearer"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self._ok(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = json.dumps(
                APIError(401, "Unauthorized: send 'Authorization: Bearer <api key>'.", "AuthenticationError").body()
            ).encode()
            await send({
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer")],
            })
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
