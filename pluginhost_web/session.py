"""A session kept in an HMAC-signed cookie (pure ASGI middleware, no dependency).

The cookie holds ``base64(json).timestamp.signature``: the client can read it but
not change it. It carries only the user name, the CSRF token and a one-shot flash
message, never a password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from http.cookies import SimpleCookie
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "pluginhost_session"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(data: dict[str, Any], secret: bytes, *, now: float | None = None) -> str:
    """The cookie value for ``data``."""
    body = _b64(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())
    message = f"{body}.{int(time.time() if now is None else now)}"
    return f"{message}.{_mac(message, secret)}"


def unsign(value: str | None, secret: bytes, *, max_age_s: float, now: float | None = None) -> dict[str, Any]:
    """The data in a cookie value, or ``{}`` if it is missing, forged or expired."""
    if not value or value.count(".") != 2:
        return {}
    message, _, mac = value.rpartition(".")
    if not hmac.compare_digest(mac, _mac(message, secret)):
        return {}
    body, _, stamp = message.partition(".")
    try:
        age = (time.time() if now is None else now) - int(stamp)
        data = json.loads(_unb64(body))
    except ValueError:
        return {}
    if not 0 <= age <= max_age_s or not isinstance(data, dict):
        return {}
    return data


def _mac(message: str, secret: bytes) -> str:
    return _b64(hmac.new(secret, message.encode(), hashlib.sha256).digest())


class SignedSessionMiddleware:
    """Loads ``scope["session"]`` from the signed cookie and writes it back when it changed.

    The cookie is ``HttpOnly``, ``SameSite=Lax``, ``Secure`` on https, and scoped
    to the path the console is mounted at.
    """

    def __init__(self, app: ASGIApp, *, secret: bytes, max_age_s: int = 12 * 3600) -> None:
        self.app = app
        self.secret = secret
        self.max_age_s = max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        session = unsign(connection.cookies.get(COOKIE_NAME), self.secret, max_age_s=self.max_age_s)
        scope["session"] = session
        loaded = json.dumps(session, sort_keys=True)

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                current = scope["session"]
                if json.dumps(current, sort_keys=True) != loaded:
                    headers = MutableHeaders(scope=message)
                    headers.append("Set-Cookie", self._cookie(scope, current))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _cookie(self, scope: Scope, session: dict[str, Any]) -> str:
        cookie: SimpleCookie = SimpleCookie()
        cookie[COOKIE_NAME] = sign(session, self.secret) if session else ""
        morsel = cookie[COOKIE_NAME]
        morsel["path"] = scope.get("root_path") or "/"
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"
        morsel["max-age"] = self.max_age_s if session else 0
        if scope.get("scheme") == "https":
            morsel["secure"] = True
        return morsel.OutputString()
