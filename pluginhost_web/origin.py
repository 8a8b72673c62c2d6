"""Where a request comes from: the loopback-only Host rule of local mode and the
``Origin`` rule of every state-changing request.

- In local mode (``--insecure-local``) the Host header must name the loopback
  interface (``localhost``, ``127.0.0.0/8``, ``[::1]``; any port). Identity there is
  "the client is on 127.0.0.1", which a DNS-rebinding page also is: its browser sends
  ``Host: attacker.example``, and only that tells the two apart. ``*.localhost``
  is refused too, since resolvers differ on it.
- A state-changing request (anything but GET/HEAD/OPTIONS) that sends ``Origin``,
  or ``Referer`` when a browser leaves ``Origin`` out, must come from the
  console's own origin (the request's scheme and Host) or a configured trusted one.
  A cookie-authenticated (or local) request that sends neither is refused: every
  current browser sends one of them on a POST. A Bearer-token request may send
  neither (scripts do not), but a foreign one is refused all the same.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = "localhost, 127.0.0.1, [::1]"


class OriginRefused(Exception):
    """A state-changing request from another site (or with no sign of where it came from)."""


def normalize_origin(text: str) -> str | None:
    """``scheme://host[:port]`` in canonical form (lower case, default port dropped),
    or None if ``text`` is not an http(s) origin (``null``, a path, user info...)."""
    return _parse(text, whole_url=False)


def origin_of_url(url: str) -> str | None:
    """The origin of a full URL (a ``Referer``), or None."""
    return _parse(url, whole_url=True)


def own_origin(connection: HTTPConnection) -> str | None:
    """The origin this request was sent to: its scheme and its Host header."""
    host = connection.headers.get("host")
    scheme = connection.scope.get("scheme", "http")
    return normalize_origin(f"{scheme}://{host}") if host else None


def is_loopback_host(host: str) -> bool:
    """Whether a Host header names the loopback interface (any port)."""
    name = host.lower()
    if name.startswith("["):
        literal, bracket, rest = name[1:].partition("]")
        if not bracket:
            return False
    else:
        literal, colon, port = name.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return False
    if name.startswith("["):
        try:
            return ipaddress.IPv6Address(literal).is_loopback
        except ValueError:
            return False
    if literal == "localhost":
        return True
    try:
        return ipaddress.IPv4Address(literal).is_loopback
    except ValueError:
        return False


def check_origin(connection: HTTPConnection, *, trusted: Iterable[str] = (), required: bool) -> None:
    """Raise ``OriginRefused`` unless ``Origin`` (else ``Referer``) is this console's
    origin or a trusted one; with neither header, only when ``required``."""
    own = own_origin(connection)
    origin, referer = connection.headers.get("origin"), connection.headers.get("referer")
    if origin is None and referer is None:
        if required:
            raise OriginRefused(
                "a state-changing request with no Origin or Referer header: send "
                f"Origin: {own or 'the console origin'} (browsers do), or use Authorization: Bearer <token>"
            )
        return
    header, value = ("Origin", origin) if origin is not None else ("Referer", referer or "")
    sent = normalize_origin(value) if origin is not None else origin_of_url(value)
    allowed = {o for o in (own, *trusted) if o}
    if sent is None or sent not in allowed:
        shown = value if len(value) <= 100 else value[:100] + "..."
        raise OriginRefused(
            f"{header} {shown!r} does not match this console ({', '.join(sorted(allowed)) or 'no Host header'}); "
            "behind a proxy, list the public origin in pluginhost_web_origins"
        )


def _parse(text: str, *, whole_url: bool) -> str | None:
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or "%" in parts.netloc:
        return None
    if not whole_url and (parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return (
        f"{parts.scheme}://{host}" if port in (None, DEFAULT_PORTS[parts.scheme]) else f"{parts.scheme}://{host}:{port}"
    )
