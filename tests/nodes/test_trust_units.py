"""In-process checks of the node trust pieces: URL shape and network policy, consent,
bounded inputs, connection pools closed when a node's URL changes."""

from __future__ import annotations

import ipaddress
from decimal import Decimal
from typing import Any

import anyio
import pytest

from asgi_llm.errors import InvalidRequestError, UpstreamConnectionError
from asgi_llm.nodes import registry as registry_module
from asgi_llm.nodes.consent import AcceptRule, accepts, parse_rules
from asgi_llm.nodes.inputs import parse_labels, parse_load, parse_price
from asgi_llm.nodes.netpolicy import GuardedTransport, NetworkPolicy, NodeURLError, normalize_node_url
from asgi_llm.nodes.records import NodeRecord
from asgi_llm.nodes.registry import NodeRegistry


class TestNodeURLShape:
    """Only scheme://host[:port][/base path] is stored; everything else is a clear refusal."""

    @pytest.mark.parametrize(("raw", "stored"), [
        ("http://10.0.0.5:8001/v1/", "http://10.0.0.5:8001/v1"),
        ("https://GPU-1.lan/v1", "https://gpu-1.lan/v1"),
        ("http://[::ffff:10.1.2.3]:80", "http://10.1.2.3:80"),
        ("http://[2001:db8::1]:9000/api/v1", "http://[2001:db8::1]:9000/api/v1"),
    ])
    def test_canonical_form(self, raw: str, stored: str) -> None:
        """What is stored is rebuilt from the parsed pieces."""
        assert normalize_node_url(raw) == stored

    @pytest.mark.parametrize("raw", [
        "http://127.0.0.1:9/internal/secret?x=1#", "http://h/v1#", "http://u:p@h/v1", "http://u@h/v1",
        "http://h/v1/../admin", "http://h/./v1", "http://h/%2e%2e/x", "ftp://h/v1", "redis://127.0.0.1:6379",
        "http://h\\@evil/v1", "http://h /v1", "http://h:99999/v1", "http:///v1", "", None, 7, "http://" + "a" * 2000,
        "http://h/v1\r\nx: y", "http://bad_host!/v1",
    ])
    def test_refused(self, raw: Any) -> None:
        """Query, fragment, userinfo, dot segments, escapes, other schemes, junk."""
        with pytest.raises(NodeURLError):
            normalize_node_url(raw)


class TestNetworkPolicy:
    """Default deny list, allow-list, the gateway itself."""

    def test_default_denies_internal_ranges(self) -> None:
        """Loopback, link-local (metadata), unspecified, multicast refused; LAN and public allowed."""
        p = NetworkPolicy()
        for ip in ("127.0.0.1", "127.9.9.9", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::", "224.0.0.1"):
            assert p.problem(ipaddress.ip_address(ip), 80) is not None, ip
        for ip in ("10.0.0.5", "192.168.1.2", "8.8.8.8", "2001:db8::1"):
            assert p.problem(ipaddress.ip_address(ip), 80) is None, ip

    def test_allow_list(self) -> None:
        """With allowed_networks only those networks pass — loopback too when listed."""
        p = NetworkPolicy.from_config(["127.0.0.1/32", "10.0.0.0/8"])
        assert p.problem(ipaddress.ip_address("127.0.0.1"), 80) is None
        assert p.problem(ipaddress.ip_address("10.2.3.4"), 80) is None
        assert p.problem(ipaddress.ip_address("192.168.1.1"), 80) is not None
        assert p.problem(ipaddress.ip_address("127.0.0.2"), 80) is not None

    def test_the_gateway_itself_is_refused(self) -> None:
        """Learned from the ASGI scope: its exact address, or any local one on a wildcard bind."""
        p = NetworkPolicy.from_config(["127.0.0.1/32", "10.0.0.0/8"])
        p.learn_self(("127.0.0.1", 8080))
        p.learn_self(("0.0.0.0", 9090))
        assert p.check_literal("http://127.0.0.1:8080/v1") is not None
        assert p.check_literal("http://127.0.0.1:9090/v1") is not None
        assert p.check_literal("http://127.0.0.1:8081/v1") is None

    @pytest.mark.anyio
    async def test_names_are_resolved(self) -> None:
        """localhost resolves to loopback: refused by default; unresolvable names refused."""
        p = NetworkPolicy()
        assert await p.check("http://localhost:8000/v1") is not None
        assert await p.check("http://does-not-exist.invalid/v1") is not None
        assert await p.check("http://10.0.0.1:8000/v1") is None

    @pytest.mark.anyio
    async def test_guarded_transport_refuses_before_sending(self) -> None:
        """A name that (now) resolves into a refused network never reaches the inner transport."""
        sent: list[str] = []

        class Inner:
            async def send(self, method: str, url: str, **kw: Any) -> Any:
                sent.append(url)

            async def aclose(self) -> None:
                pass

        t = GuardedTransport(Inner(), NetworkPolicy(), name="box")
        with pytest.raises(UpstreamConnectionError):
            await t.send("POST", "http://localhost:1/v1/chat/completions", headers={}, body=b"{}")
        assert sent == []


    @pytest.mark.anyio
    async def test_errors_name_the_node_not_its_address(self) -> None:
        """A consumer of a shared node never sees the owner's internal address in a 502."""

        class Inner:
            async def send(self, method: str, url: str, **kw: Any) -> Any:
                raise UpstreamConnectionError(f"Could not connect to {url}: [Errno 111] Connect call failed ('10.9.8.7', 8000).")

            async def aclose(self) -> None:
                pass

        t = GuardedTransport(Inner(), NetworkPolicy(), name="box")
        with pytest.raises(UpstreamConnectionError) as info:
            await t.send("POST", "http://10.9.8.7:8000/v1/chat/completions", headers={}, body=b"{}")
        assert "10.9.8.7" not in info.value.message and "'box'" in info.value.message


class TestConsent:
    """Owner match and the price cap, on input and output."""

    def test_accepts(self) -> None:
        rules = (AcceptRule("team-a", Decimal("1"), Decimal("2")),)
        assert accepts(rules, "team-a", (Decimal("1"), Decimal("2")))
        assert accepts(rules, "team-a", None)  # no price: free
        assert not accepts(rules, "team-a", (Decimal("1.01"), Decimal("0")))
        assert not accepts(rules, "team-a", (Decimal("0"), Decimal("2.5")))
        assert not accepts(rules, "team-b", (Decimal("0"), Decimal("0")))
        assert accepts((AcceptRule("*", Decimal(5), Decimal(5)),), "anyone", (Decimal(5), Decimal(5)))
        assert not accepts((), "team-a", None)

    def test_parse_rules(self) -> None:
        """max_price is required and bounded."""
        rules = parse_rules([{"owner": "team-a", "max_price": {"input": "0.5", "output": 1}}])
        assert rules == (AcceptRule("team-a", Decimal("0.5"), Decimal("1")),)
        for bad in ([{"owner": "team-a"}], [{"owner": "x", "max_price": {"input": "Infinity"}}], [{}], {"owner": "x"},
                    [{"owner": "x", "max_price": {"input": 1}}] * 101):
            with pytest.raises(InvalidRequestError):
                parse_rules(bad)


class TestInputs:
    """Prices, labels and load are bounded."""

    @pytest.mark.parametrize("bad", ["NaN", "nan", "sNaN", "Infinity", "-inf", "1e30", "-0.01", "10000.0001", True, None,
                                     [1], {"x": 1}, "1" * 41, "0x10", ""])
    def test_bad_prices(self, bad: Any) -> None:
        with pytest.raises(InvalidRequestError):
            parse_price({"input": bad, "output": 1})

    def test_good_prices(self) -> None:
        assert parse_price({"input": "0.05", "output": 10000}) == {"input": "0.05", "output": "10000"}
        assert parse_price({"input": 1e-3}) == {"input": "0.001", "output": "0"}
        assert parse_price({"input": "1E+2", "output": "0.000"}) == {"input": "100", "output": "0"}

    def test_labels_bounded(self) -> None:
        with pytest.raises(InvalidRequestError):
            parse_labels({f"k{i}": "v" for i in range(33)})
        with pytest.raises(InvalidRequestError):
            parse_labels({"k": "v" * 257})
        assert parse_labels({"gpu": "a100"}) == {"gpu": "a100"}

    def test_load_clamped(self) -> None:
        """Known gauges only, finite, within range."""
        load = parse_load({"queue_depth": 2**70, "running": -5, "kv_cache_usage": 7, "in_flight": float("nan"),
                           "evil": 1, "x": True})
        assert load == {"queue_depth": 1e6, "running": 0.0, "kv_cache_usage": 1.0}
        assert parse_load("junk") == {}
        assert parse_load({"queue_depth": 10**400}) == {"queue_depth": 1e6}


class _Pool:
    made: list[_Pool] = []

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.closed = False
        _Pool.made.append(self)

    async def send(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("not called")

    async def aclose(self) -> None:
        self.closed = True


class _Store:
    async def list(self) -> list[NodeRecord]:
        return []


class TestRecipe:
    """nodes.allowed_networks and nodes.accept_shared are validated with the recipe."""

    def test_bad_values_are_config_errors(self) -> None:
        from pydantic import ValidationError

        from asgi_llm.config import NodesConfig

        for bad in ({"allowed_networks": ["not-a-cidr"]}, {"allowed_networks": "10.0.0.0/8"},
                    {"accept_shared": {"team-b": [{"owner": "team-a"}]}},
                    {"accept_shared": {"team-b": [{"owner": "team-a", "max_price": {"input": "NaN", "output": 1}}]}},
                    {"accept_shared": {"team-b": [{"owner": "team-a", "max_price": {"input": 20000, "output": 1}}]}}):
            with pytest.raises(ValidationError):
                NodesConfig.model_validate(bad)
        cfg = NodesConfig.model_validate({"allowed_networks": ["10.0.0.0/8", "::1/128"],
                                          "accept_shared": {"team-b": [{"owner": "*", "max_price": {"input": 1, "output": 2}}]}})
        assert NetworkPolicy.from_config(cfg.allowed_networks).allowed is not None
        from asgi_llm.nodes.consent import recipe_rules

        assert recipe_rules(cfg.accept_shared) == {"team-b": (AcceptRule("*", Decimal(1), Decimal(2)),)}


class TestConnectionPools:
    """A node's pool is kept across a credential rotation and closed when its URL changes."""

    @pytest.mark.anyio
    async def test_url_change_closes_the_old_pool(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(registry_module, "make_transport", _Pool)
        _Pool.made.clear()
        reg = NodeRegistry(_Store(), pepper=lambda: b"p" * 32,  # type: ignore[arg-type]
                           policy=NetworkPolicy.from_config(["10.0.0.0/8"]))
        rec = NodeRecord(id="node_1", name="box", org="team-a", credential_hash="h1", url="http://10.0.0.1:8000/v1",
                         models=[{"id": "m"}])
        async with anyio.create_task_group() as tg:
            await reg.start(tg)
            reg.put(rec)
            reg.heartbeat(rec, load={}, agent_state="ready")
            rotated = rec.with_(credential_hash="h2")
            reg.put(rotated)
            reg.heartbeat(rotated, load={}, agent_state="ready")
            assert len(_Pool.made) == 1 and not _Pool.made[0].closed  # same URL: same pool
            moved = rotated.with_(url="http://10.0.0.2:8000/v1")
            reg.put(moved)
            reg.heartbeat(moved, load={}, agent_state="ready")
            with anyio.fail_after(2):
                while not _Pool.made[0].closed:
                    await anyio.sleep(0.01)
            assert len(_Pool.made) == 2 and not _Pool.made[1].closed
            refused = moved.with_(url="http://192.168.0.9:8000/v1")  # outside allowed_networks
            reg.put(refused)
            reg.heartbeat(refused, load={}, agent_state="ready")
            with anyio.fail_after(2):
                while not _Pool.made[1].closed:
                    await anyio.sleep(0.01)
            assert reg.status(refused) == "blocked" and reg.live["node_1"].adapter is None
            await reg.aclose()
            tg.cancel_scope.cancel()
        assert all(p.closed for p in _Pool.made)
