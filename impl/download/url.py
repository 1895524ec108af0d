"""URL canonicalisation: one spelling per resource, so the job key does not depend on case.

The rules, applied in this order (RFC 3986 section 6.2.2 plus the usual HTTP ones):

1. Only ``http`` and ``https`` are accepted (any case); anything else is an error.
2. Scheme and host are lowercased; a trailing dot of the host is dropped; an
   internationalised host is IDNA-encoded.
3. The default port (80 for http, 443 for https) is dropped; other ports are kept as
   decimal numbers; a port outside 1..65535 is an error.
4. User info (``user:password@``) is rejected: credentials do not belong in a manifest
   that is keyed, logged and stored.
5. The fragment (``#...``) is dropped: it is never sent to the server.
6. Percent-encoding is normalised in the path and query: escapes of unreserved
   characters (``A-Z a-z 0-9 - . _ ~``) are decoded, every other escape gets uppercase hex,
   and characters that must be escaped (space, non-ASCII as UTF-8, controls) are escaped.
7. Dot segments (``.`` and ``..``) are removed from the path (RFC 3986 section 5.2.4,
   as HTTP clients do before sending); an empty path becomes ``/``; an empty query (a
   bare ``?``) is dropped.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

from model.errors import InvalidInput

DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that may appear literally in a path or query (RFC 3986 pchar, "/" and "?").
_ALLOWED = _UNRESERVED | frozenset("!$&'()*+,;=:@/?")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _normalise_part(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "%" and _ESCAPE.match(text, i):
            byte = int(text[i + 1 : i + 3], 16)
            decoded = chr(byte)
            out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
            i += 3
            continue
        if char in _ALLOWED:
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8"))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def _host(raw: str, url: str) -> str:
    if raw.startswith("["):
        # An IPv6 literal: keep the brackets, lowercase the hex digits.
        return raw.lower()
    host = raw.rstrip(".").lower() if raw.endswith(".") and raw != "." else raw.lower()
    if not host:
        raise InvalidInput(f"URL {url!r} has no host; write it as http(s)://host/path")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise InvalidInput(
                f"URL {url!r} has a host {raw!r} that is not a valid domain name ({exc})"
            ) from None
    if any(c in host for c in ' <>"{}|\\^`%'):
        raise InvalidInput(f"URL {url!r} has a host {raw!r} with characters a host cannot hold")
    return host


def canonical_url(url: str) -> str:
    """Return the canonical form of ``url`` by the module's documented rules.

    Raises:
        InvalidInput: for a non-string, an unsupported scheme, a missing host, user
            info, or a bad port; the message names the URL and what to change.
    """
    if not isinstance(url, str):
        raise InvalidInput(f"a URL must be a string, got {type(url).__name__}")
    text = url.strip()
    if not text:
        raise InvalidInput("the URL is empty; give an http:// or https:// URL")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"URL {url!r} cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        found = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InvalidInput(f"URL {url!r} has {found}; only http and https URLs can be downloaded")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            f"URL {url!r} carries user info (user:password@); credentials are not allowed "
            "in a manifest, remove them"
        )
    netloc = parts.netloc
    raw_host = netloc.rsplit(":", 1)[0] if port is not None or netloc.endswith(":") else netloc
    if raw_host.startswith("[") and "]" in netloc:
        raw_host = netloc[: netloc.index("]") + 1]
    host = _host(raw_host, url)
    if port is not None and not 1 <= port <= 65535:
        raise InvalidInput(f"URL {url!r} has port {port}; a port is 1 to 65535")
    authority = host if port is None or port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_normalise_part(parts.path)) or "/"
    query = _normalise_part(parts.query)
    return f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")


def url_hash(canonical: str) -> str:
    """Return the SHA-256 hex of a canonical URL (used to derive ids for plain URL lists)."""
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def host_key(url: str) -> str:
    """Return ``host:port`` of ``url``, the unit of the per-host concurrency limit."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 0)
    return f"{(parts.hostname or '').lower()}:{port}"
