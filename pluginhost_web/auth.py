"""Who may use the console, and the CSRF rule for everything that changes state.

Three ways in:

- a login form (``/login``) that puts the user in the signed session cookie;
- ``Authorization: Bearer <token>`` for scripts (actor ``api-token`` in the audit log);
- with ``WebAuth.local()`` (``pluginhost web --insecure-local``), requests from the
  loopback address to a loopback Host name as user ``local``.

Every POST must come from the console's own origin (``Origin`` or ``Referer``, see
``origin.py``), and every POST that is not Bearer-authenticated needs the session's
CSRF token, in the form field ``csrf_token`` or the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends
from starlette.requests import Request

from .origin import check_origin, is_loopback_host, normalize_origin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
TOKEN_ACTOR = "api-token"
LOCAL_ACTOR = "local"


class NoCredentials(RuntimeError):
    """The console was asked to start without any credentials configured."""


class NotAuthenticated(Exception):
    """The request carries no valid session, token or local access."""


class CsrfFailed(Exception):
    """A state-changing request without the session's CSRF token."""


@dataclass(frozen=True)
class Identity:
    """The authenticated user of one request; ``user`` goes into the audit log."""

    user: str
    via: Literal["session", "token", "local"]


@dataclass(frozen=True)
class WebAuth:
    """The console's credentials.

    ``users`` maps user name to password (login form), ``token`` is the Bearer
    token for the API, ``secret`` signs the session cookie (random per process
    unless configured: set it when several processes serve one console).
    ``origins`` are further origins (``https://console.example``) accepted on
    state-changing requests besides the request's own scheme and Host, e.g. the
    public origin of a proxy that terminates TLS.
    """

    users: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    insecure_local: bool = False
    origins: Iterable[str] = ()

    @classmethod
    def from_app(cls, app: Any, environ: Mapping[str, str] | None = None) -> WebAuth:
        """Read ``app.conf.pluginhost_web_users`` / ``_token`` / ``_secret`` / ``_origins`` and the
        ``PLUGINHOST_WEB_USER`` / ``_PASSWORD`` / ``_TOKEN`` / ``_SECRET`` / ``_ORIGINS`` variables
        (origins: a list, or one comma-separated string)."""
        env = os.environ if environ is None else environ
        users = dict(app.conf.get("pluginhost_web_users") or {})
        if env.get("PLUGINHOST_WEB_USER") and env.get("PLUGINHOST_WEB_PASSWORD"):
            users[env["PLUGINHOST_WEB_USER"]] = env["PLUGINHOST_WEB_PASSWORD"]
        token = app.conf.get("pluginhost_web_token") or env.get("PLUGINHOST_WEB_TOKEN") or None
        secret = app.conf.get("pluginhost_web_secret") or env.get("PLUGINHOST_WEB_SECRET")
        origins = [*_split(app.conf.get("pluginhost_web_origins")), *_split(env.get("PLUGINHOST_WEB_ORIGINS"))]
        if not secret:
            return cls(users=users, token=token, origins=origins)
        return cls(
            users=users,
            token=token,
            origins=origins,
            secret=secret.encode() if isinstance(secret, str) else bytes(secret),
        )

    @classmethod
    def local(cls) -> WebAuth:
        """No credentials: loopback clients only, as user ``local``."""
        return cls(insecure_local=True)

    def __post_init__(self) -> None:
        for user, password in self.users.items():
            if not isinstance(user, str) or not user or not isinstance(password, str) or not password:
                raise NoCredentials(f"pluginhost_web_users: user {user!r} needs a non-empty password")
        if self.token is not None and not isinstance(self.token, str):
            raise NoCredentials("pluginhost_web_token must be a string")
        origins = []
        for origin in [self.origins] if isinstance(self.origins, str) else self.origins:
            normal = normalize_origin(origin) if isinstance(origin, str) else None
            if normal is None:
                raise NoCredentials(f"pluginhost_web_origins: expected scheme://host[:port], got {origin!r}")
            origins.append(normal)
        object.__setattr__(self, "origins", tuple(dict.fromkeys(origins)))  # frozen: normalised once

    @property
    def configured(self) -> bool:
        """Whether any user or token is set."""
        return bool(self.users or self.token)

    def check(self) -> WebAuth:
        """Raise ``NoCredentials`` unless there are credentials or local mode was chosen."""
        if not self.configured and not self.insecure_local:
            raise NoCredentials(
                "no console credentials: set app.conf.pluginhost_web_users / pluginhost_web_token or "
                "PLUGINHOST_WEB_USER + PLUGINHOST_WEB_PASSWORD / PLUGINHOST_WEB_TOKEN "
                "(or serve with --insecure-local on 127.0.0.1)"
            )
        return self

    def check_password(self, user: str, password: str) -> bool:
        """Constant-time check of a user's password (unknown users cost the same)."""
        stored = self.users.get(user)
        ok = hmac.compare_digest(password.encode(), (stored or secrets.token_hex(16)).encode())
        return ok and stored is not None

    def check_token(self, token: str) -> bool:
        return self.token is not None and hmac.compare_digest(token.encode(), self.token.encode())


def auth_of(request: Request) -> WebAuth:
    auth: WebAuth = request.app.state.auth
    return auth


def csrf_token(request: Request) -> str:
    """The session's CSRF token (created on first use)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def authenticate(request: Request) -> Identity | None:
    """The request's identity, or None."""
    auth = auth_of(request)
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return Identity(TOKEN_ACTOR, "token") if auth.check_token(credentials.strip()) else None
    user = request.session.get("user")
    if isinstance(user, str) and user in auth.users:
        return Identity(user, "session")
    if auth.insecure_local and _is_loopback(request) and is_loopback_host(request.headers.get("host", "")):
        return Identity(LOCAL_ACTOR, "local")
    return None


def log_in(request: Request, user: str) -> None:
    """Put ``user`` in the session with a fresh CSRF token."""
    request.session.clear()
    request.session["user"] = user
    csrf_token(request)


def log_out(request: Request) -> None:
    request.session.clear()


async def check_csrf(request: Request) -> None:
    """Raise ``CsrfFailed`` unless the request carries the session's CSRF token."""
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    expected = request.session.get("csrf")
    if not sent or not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfFailed(
            "missing or wrong CSRF token: send the session's token as the "
            f"'{CSRF_FIELD}' form field or the {CSRF_HEADER} header"
        )


def check_request_origin(request: Request, *, required: bool = True) -> None:
    """Raise ``OriginRefused`` unless a state-changing request comes from this console."""
    if request.method not in SAFE_METHODS:
        check_origin(request, trusted=auth_of(request).origins, required=required)


async def require_identity(request: Request) -> Identity:
    """Router dependency: an identity for every request; for every unsafe one, this
    console's origin (a token request may send none) and, unless a token, CSRF."""
    identity = authenticate(request)
    if identity is None:
        raise NotAuthenticated("log in, or send Authorization: Bearer <token>")
    check_request_origin(request, required=identity.via != "token")
    if request.method not in SAFE_METHODS and identity.via != "token":
        await check_csrf(request)
    request.state.identity = identity
    return identity


def current_user(identity: Annotated[Identity, Depends(require_identity)]) -> str:
    """The authenticated user: the actor of the changes this request makes."""
    return identity.user


def _split(value: Any) -> list[Any]:
    if not value:
        return []
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
