"""Secret-free forms of values that reach messages, logs and admin listings.

A URL may carry credentials (``http://user:pass@host``) and secrets in its query string
(``?key=…``); neither may reach a caller, a log line or an admin listing. Every place
that shows a URL shows :func:`redact_url` of it.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit

__all__ = ["redact_url", "redact_urls_in", "url_origin"]

_UNPARSEABLE = "<unparseable url>"


def redact_url(url: str) -> str:
    """``url`` without credentials, query string or fragment.

    Credentials become ``***@``; a query string becomes ``?***``; the fragment is
    dropped. Something that does not parse as a URL is replaced whole.

    Example:
        >>> redact_url("https://bob:hunter2@api.example.com:8443/v1?key=abc#x")
        'https://***@api.example.com:8443/v1?***'
    """
    split = _split(url)
    if split is None:
        return _UNPARSEABLE
    parts, netloc = split
    if parts.username is not None or parts.password is not None:
        netloc = "***@" + netloc
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` — what a client may be told about an upstream
    it could not reach (the path, which may hold a secret, is for the log only).

    Example:
        >>> url_origin("https://bob:hunter2@api.example.com:8443/v1/SECRET/chat?key=abc")
        'https://api.example.com:8443'
    """
    split = _split(url)
    if split is None:
        return _UNPARSEABLE
    parts, netloc = split
    return f"{parts.scheme}://{netloc}"


def _split(url: str) -> tuple[SplitResult, str] | None:
    """``url``'s parts and its ``host[:port]`` without credentials (IPv6 in brackets);
    ``None`` when it does not parse."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return parts, host if port is None else f"{host}:{port}"


def redact_urls_in(text: str, *urls: str | None) -> str:
    """``text`` with each of ``urls`` (and its credential-free twin) replaced by its
    redacted form: for exception messages of HTTP clients, which embed the URL they
    called."""
    for url in urls:
        if not url:
            continue
        safe = redact_url(url)
        text = text.replace(url, safe)
        try:
            parts = urlsplit(url)
            if parts.username is not None or parts.password is not None:
                bare = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))
                text = text.replace(bare, safe)
        except ValueError:
            pass
    return text
