"""Where the gateway may send a node's traffic: URL shape and destination networks.

A direct-mode node gives the gateway a URL to call. That URL is attacker-chosen input
(any org admin can make an enrollment token), so the gateway keeps the path its own and
the destination inside a policy:

* **Shape** (:func:`normalize_node_url`): only ``http(s)://host[:port][/base path]``. No
  userinfo (credentials are refused, never stored), no query string, no fragment, no
  ``..`` / ``.`` segments, no percent-escapes, backslashes or whitespace; the host is an IP
  literal or a DNS name. What is stored is rebuilt from the parsed pieces, so it is
  exactly what was checked.
* **Destination** (:class:`NetworkPolicy`): every address the host resolves to must be
  allowed. With ``nodes.allowed_networks`` unset, any address is allowed except loopback
  (127/8, ::1), link-local (169.254/16 — cloud metadata —, fe80::/10), unspecified
  (0/8, ::), multicast and the known cloud metadata addresses — also when embedded in
  an IPv6 transition form (``::127.0.0.1``, NAT64, SIIT, 6to4, Teredo). With ``allowed_networks`` set, only addresses inside one of
  those CIDRs are allowed (listing 127.0.0.1/32 is how tests and single-host setups
  allow loopback). The gateway's own listen address (IP and port) is always refused:
  a node pointing at the gateway would loop.

Checks run at enrollment and explicit re-registration (resolving the name), before an
adapter is built (IP literals), and before every connection to a node named by a DNS
name (:class:`GuardedTransport` resolves again, so a name re-pointed at an internal
address after enrollment — DNS rebinding — is refused; the residual window is the HTTP
client's own lookup right after ours).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio

from asgi_llm.errors import UpstreamConnectionError, UpstreamProtocolError, UpstreamTimeoutError
from asgi_llm.providers.transport import collect_at_most

__all__ = ["GuardedTransport", "NetworkPolicy", "NodeURLError", "normalize_node_url"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_URL = 2000
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_PATH_RE = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*/?$")
_DEFAULT_DENY: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128",            # loopback
    "169.254.0.0/16", "fe80::/10",       # link-local (cloud metadata lives here)
    "0.0.0.0/8", "::/128",               # unspecified / "this host"
    "224.0.0.0/4", "ff00::/8",           # multicast
    "255.255.255.255/32",
    "64:ff9b:1::/48",                    # local-use NAT64 (RFC 8215): embeds IPv4 at a site-chosen offset
    "100.100.100.200/32",                # Alibaba Cloud metadata
    "fd00:ec2::254/128",                 # AWS instance metadata over IPv6
    "168.63.129.16/32",                  # Azure platform (wireserver)
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 transition form carries (IPv4-compatible ``::a.b.c.d``,
    NAT64 ``64:ff9b::/96``, SIIT ``::ffff:0:a.b.c.d``, 6to4 ``2002::/16``, Teredo), so the
    default policy classifies ``[::127.0.0.1]`` like ``127.0.0.1``; ``None`` otherwise."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or ip in _SIIT or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class NodeURLError(ValueError):
    """A node URL that is malformed or outside the destination policy (message says why)."""


def normalize_node_url(url: Any) -> str:
    """The canonical ``scheme://host[:port][/path]`` of a node URL, or :class:`NodeURLError`.

    Example:
        >>> normalize_node_url("http://10.0.0.5:8001/v1/")
        'http://10.0.0.5:8001/v1'
    """
    if not isinstance(url, str) or not url or len(url) > _MAX_URL:
        raise NodeURLError("Direct mode needs the agent's 'url' (http(s)://host:port/v1).")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) > 0x7E for ch in url) or "\\" in url:
        raise NodeURLError("The node URL must not contain whitespace, control characters, backslashes or non-ASCII.")
    if "?" in url or "#" in url:
        raise NodeURLError("The node URL must not have a query string or fragment: the gateway chooses the path.")
    if "%" in url:
        raise NodeURLError("The node URL must not contain percent-escapes.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise NodeURLError("The node URL is malformed (check the host and port).") from None
    if parts.scheme not in ("http", "https"):
        raise NodeURLError("The node URL must start with http:// or https://.")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise NodeURLError("The node URL must not carry credentials (user:password@): the gateway authenticates "
                           "to the agent with the node's call secret.")
    host = parts.hostname or ""
    ip = _ip(host)
    if ip is None and not _HOST_RE.match(host):
        raise NodeURLError("The node URL needs a host: an IP address or a DNS name.")
    path = parts.path.rstrip("/")
    if path and (not _PATH_RE.match(path) or any(seg in (".", "..") for seg in path.split("/"))):
        raise NodeURLError("The node URL's path may only be a plain base path such as /v1 (no '.' or '..' segments).")
    shown = f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else (str(ip) if ip is not None else host.lower().rstrip("."))
    netloc = shown if port is None else f"{shown}:{port}"
    return f"{parts.scheme}://{netloc}{path}"


def _ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


@dataclass
class NetworkPolicy:
    """Which destination addresses a node URL may reach (see the module docstring).

    Args:
        allowed: ``nodes.allowed_networks`` (``None``: everything but the default-denied ranges).
        self_addresses: the gateway's own (ip, port) listen addresses; more are learned
            from requests (:meth:`learn_self`).
    """

    allowed: tuple[IPNetwork, ...] | None = None
    self_addresses: set[tuple[IPAddress, int]] = field(default_factory=set)
    self_ports: set[int] = field(default_factory=set)
    """Ports the gateway listens on via a wildcard address (0.0.0.0 / ::): every local address."""

    @classmethod
    def from_config(cls, networks: Iterable[str] | None) -> NetworkPolicy:
        """From the recipe's CIDR strings (validated by the config already)."""
        if networks is None:
            return cls()
        return cls(allowed=tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def learn_self(self, server: Any) -> None:
        """Note a listen address from an ASGI scope's ``server`` ``(host, port)``."""
        if not isinstance(server, list | tuple) or len(server) != 2 or not isinstance(server[1], int):
            return
        ip = _ip(str(server[0]))
        if ip is None:
            return
        if ip.is_unspecified:
            self.self_ports.add(server[1])
        else:
            self.self_addresses.add((ip, server[1]))

    def problem(self, ip: IPAddress, port: int) -> str | None:
        """Why ``ip:port`` may not be reached, or ``None`` when it may."""
        if (ip, port) in self.self_addresses or (port in self.self_ports and (ip.is_loopback or ip.is_unspecified)):
            return f"{ip}:{port} is the gateway itself"
        if self.allowed is not None:
            if any(ip.version == net.version and ip in net for net in self.allowed):
                return None
            return f"{ip} is outside nodes.allowed_networks"
        for candidate in (ip, embedded_ipv4(ip)):
            if candidate is not None and any(candidate.version == net.version and candidate in net for net in _DEFAULT_DENY):
                return (f"{ip} is a loopback, link-local, unspecified, multicast or cloud metadata address "
                        "(or embeds one) (allow it in nodes.allowed_networks)")
        return None

    def check_literal(self, url: str) -> str | None:
        """Synchronous check of a URL whose host is an IP literal (``None``: allowed, or a
        DNS name that :meth:`check` / :class:`GuardedTransport` resolve)."""
        host, port = _host_port(url)
        ip = _ip(host)
        return None if ip is None else self.problem(ip, port)

    async def check(self, url: str) -> str | None:
        """Resolve the URL's host and check every address (``None`` when all are allowed)."""
        host, port = _host_port(url)
        ip = _ip(host)
        if ip is not None:
            return self.problem(ip, port)
        try:
            with anyio.fail_after(5):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return f"the host {host!r} does not resolve"
        addresses = {_ip(str(info[4][0]).split("%", 1)[0]) for info in infos}
        if not addresses or None in addresses:
            return f"the host {host!r} does not resolve to an IP address"
        for addr in addresses:
            assert addr is not None
            why = self.problem(addr, port)
            if why is not None:
                return f"{host} resolves to {why}"
        return None


@contextmanager
def _node_errors(name: str) -> Iterator[None]:
    """Connection errors name the node, not its address: a consumer of a shared node
    never learns the owner's internal host, port or network errors."""
    try:
        yield
    except UpstreamTimeoutError as exc:
        raise UpstreamTimeoutError(f"Timed out connecting to node {name!r}.") from exc
    except UpstreamProtocolError as exc:
        raise UpstreamProtocolError(f"Node {name!r} sent an invalid HTTP response.") from exc
    except UpstreamConnectionError as exc:
        raise UpstreamConnectionError(f"The connection to node {name!r} failed or was reset.") from exc


class _GuardedResponse:
    """The inner response, with its errors naming the node (``UpstreamResponse``)."""

    def __init__(self, inner: Any, name: str) -> None:
        self._inner, self._name = inner, name
        self.status: int = inner.status
        self.headers: Mapping[str, str] = inner.headers

    async def read(self) -> bytes:
        with _node_errors(self._name):
            return bytes(await self._inner.read())

    async def read_at_most(self, limit: int) -> bytes | None:
        """The whole body, or ``None`` once it passes ``limit`` bytes (the rest unread)."""
        with _node_errors(self._name):
            inner = getattr(self._inner, "read_at_most", None)
            if inner is not None:
                return await inner(limit)
            return await collect_at_most(self._inner.iter_chunks(), limit)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        with _node_errors(self._name):
            async for chunk in self._inner.iter_chunks():
                yield chunk

    async def aclose(self) -> None:
        with _node_errors(self._name):
            await self._inner.aclose()


class GuardedTransport:
    """An ``UpstreamTransport`` that re-checks a node's destination before sending.

    For an IP-literal URL the check is the synchronous one; for a DNS name the name is
    resolved again (cached ``ttl_s``) and every address checked, so a rebinding to an
    internal address is refused with a connection error (the plan moves on). Errors
    name the node, never its URL or address.
    """

    def __init__(self, inner: Any, policy: NetworkPolicy, *, name: str, ttl_s: float = 5.0) -> None:
        self.inner = inner
        self.policy = policy
        self.name = name
        self.ttl_s = ttl_s
        self._checked: dict[str, float] = {}

    async def send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None) -> Any:
        """Check the destination, then send through the inner transport."""
        host, port = _host_port(url)
        key = f"{host}:{port}"
        now = time.monotonic()
        if self._checked.get(key, -1.0) < now:
            why = await self.policy.check(url)
            if why is not None:
                raise UpstreamConnectionError(f"Node {self.name!r} is not reachable under the node network policy.")
            if len(self._checked) > 64:
                self._checked.clear()
            self._checked[key] = now + self.ttl_s
        with _node_errors(self.name):
            return _GuardedResponse(await self.inner.send(method, url, headers=headers, body=body), self.name)

    async def warm(self) -> None:
        """Nothing to warm ahead of the first request."""
        return None

    async def aclose(self) -> None:
        """Close the inner connection pool."""
        await self.inner.aclose()
