"""What every HTTP provider adapter shares: a base URL, a key pool, timeouts, one
connection pool, a free reachability probe. Subclasses say which headers they send and
how a key is presented, and implement ``send``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from asgi_llm._timeout import fail_after
from asgi_llm.errors import UpstreamError
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.key_pool import KeyHealth, KeyPool
from asgi_llm.providers.transport import UpstreamTransport, make_transport

__all__ = ["REQUEST_ID_HEADER", "USER_AGENT", "HTTPAdapter"]

REQUEST_ID_HEADER = "x-asgi-llm-request-id"
"""The header that carries the gateway's request id to providers and nodes by default.

Not ``x-request-id``: some engines (llama-cpp-python's server) parse that header and
answer an empty HTTP 400 to any value that is not a UUID, and ours is ``req_…``."""

USER_AGENT = "asgi-llm/0.1"


class HTTPAdapter:
    """Base of the HTTP adapters.

    Args:
        name: the provider's name in the recipe (used in routes and messages).
        base_url: e.g. ``https://api.openai.com/v1`` (no trailing slash needed).
        api_keys: upstream keys, used round-robin; empty for keyless local engines.
        timeouts: per-attempt limits.
        headers: extra static headers sent with every request.
        transport: the connection pool; built with :func:`make_transport` if omitted.
        health: breakers and cooldowns the key pool consults.
        request_id_header: the header that carries the gateway's request id upstream;
            ``None`` sends none (recipe ``providers.<name>.request_id_header``).
    """

    default_headers: ClassVar[Mapping[str, str]] = {"content-type": "application/json", "user-agent": USER_AGENT}
    probe_path: ClassVar[str] = "/models"

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_keys: Sequence[str] = (),
        timeouts: Timeouts | None = None,
        headers: Mapping[str, str] | None = None,
        transport: UpstreamTransport | None = None,
        max_connections: int = 256,
        health: KeyHealth | None = None,
        request_id_header: str | None = REQUEST_ID_HEADER,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.transport = transport or make_transport(max_connections=max_connections, connect_timeout=self.timeouts.connect)
        self._static_headers = {**self.default_headers, **(headers or {})}
        self.keys = KeyPool(name, api_keys, health=health)
        self.request_id_header = request_id_header

    def key_headers(self, api_key: str | None) -> dict[str, str]:
        """How this upstream wants a key presented."""
        return {"authorization": "Bearer " + api_key} if api_key else {}

    async def probe(self, key_id: str | None = None) -> bool:
        """Free health probe: ``GET {probe_path}`` answers 2xx (listing models is never billed).

        With ``key_id``, the probe presents that key: a 2xx then also says the upstream
        accepts it again (see :meth:`HealthTracker.key_accepted`).
        """
        api_key = self.keys.any_key() if key_id is None else self.keys.secret(key_id)
        if key_id is not None and api_key is None:
            return False
        headers = {**self._static_headers, **self.key_headers(api_key)}
        headers.pop("content-type", None)
        try:
            async with fail_after(min(self.timeouts.attempt, 10.0)):
                response = await self.transport.send("GET", self.base_url + self.probe_path, headers=headers, body=None)
                try:
                    return 200 <= response.status < 300
                finally:
                    await response.aclose()
        except (TimeoutError, UpstreamError):
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.transport.aclose()
