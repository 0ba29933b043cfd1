"""HealthTracker: 401/403 retirement is configurable and ends early when a probe with the key succeeds."""

from __future__ import annotations

from asgi_llm.routing.health import BreakerPolicy, HealthTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestAuthCooldown:
    def test_refusal_lasts_auth_cooldown_s(self) -> None:
        clock = Clock()
        health = HealthTracker(BreakerPolicy(auth_cooldown_s=42), clock=clock)
        health.refused("p/m", "k0", error="401")
        assert not health.key_usable("p/m", "k0")
        assert health.key_usable("p/m", "k1")
        assert health.route_state("p/m", ["k0"]) == "refused"
        assert health.refused_keys() == {("p/m", "k0")}
        clock.now += 41.9
        assert not health.key_usable("p/m", "k0")
        clock.now += 0.2
        assert health.key_usable("p/m", "k0")
        assert health.refused_keys() == set()

    def test_key_accepted_ends_a_refusal_only(self) -> None:
        clock = Clock()
        changes: list[tuple[str, str]] = []
        health = HealthTracker(BreakerPolicy(auth_cooldown_s=300), clock=clock,
                               on_change=lambda r, k, b: changes.append((r, k)))
        health.refused("p/m", "k0")
        health.cool_down("p/m", "k1", 30, kind="cooling")  # a 429: a probe says nothing about it
        health.key_accepted("p/m", "k0")
        health.key_accepted("p/m", "k1")
        assert health.key_usable("p/m", "k0")
        assert not health.key_usable("p/m", "k1")
        assert changes == [("p/m", "k0"), ("p/m", "k1"), ("p/m", "k0")]
