"""Secret-free URLs for messages, logs and listings."""

from __future__ import annotations

from asgi_llm._redact import redact_url, redact_urls_in, url_origin


class TestRedactUrl:
    def test_credentials_query_and_fragment_removed(self) -> None:
        """User, password, query string and fragment never survive."""
        out = redact_url("https://bob:hunter2@api.example.com:8443/v1?key=abc#frag")
        assert out == "https://***@api.example.com:8443/v1?***"
        assert "hunter2" not in out and "abc" not in out and "bob" not in out

    def test_plain_url_unchanged(self) -> None:
        """A URL with nothing secret keeps its scheme, host, port and path."""
        assert redact_url("http://127.0.0.1:9001/v1") == "http://127.0.0.1:9001/v1"

    def test_ipv6_and_garbage(self) -> None:
        """IPv6 literals keep their brackets; an unparseable URL is replaced whole."""
        assert redact_url("http://[::1]:80/a") == "http://[::1]:80/a"
        assert redact_url("http://[::1") == "<unparseable url>"

    def test_redact_urls_in_text(self) -> None:
        """An exception message that embeds the URL (with or without credentials) is cleaned."""
        url = "http://u:pw@h.example:1/v1/chat?token=t"
        text = f"Cannot connect to {url} and to http://h.example:1/v1/chat?token=t"
        out = redact_urls_in(text, url)
        assert "pw" not in out and "token=t" not in out
        assert out.count("http://***@h.example:1/v1/chat?***") == 2


def test_url_origin() -> None:
    """Scheme, host and port only: no credentials, path, query or fragment."""
    assert url_origin("https://bob:pw@api.example.com:8443/v1/SECRET/chat?key=abc#x") == "https://api.example.com:8443"
    assert url_origin("http://[::1]:80/a") == "http://[::1]:80"
    assert url_origin("http://host/v1") == "http://host"
    assert url_origin("http://[::1") == "<unparseable url>"
