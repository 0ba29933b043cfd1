"""Upstream key pools."""

from __future__ import annotations

import pytest

from asgi_llm.providers.key_pool import KeyPool, KeysExhaustedError
from asgi_llm.routing.health import HealthTracker


class TestKeyPool:
    def test_rotates(self) -> None:
        """Keys are used round-robin."""
        pool = KeyPool("p", ["s1", "s2", "s3"])
        assert [pool.pick("p/m")[1] for _ in range(4)] == ["s1", "s2", "s3", "s1"]

    def test_cooling_key_is_skipped_alone(self) -> None:
        """A key that cools down is skipped; the others keep serving."""
        health = HealthTracker()
        pool = KeyPool("p", ["s1", "s2"], health=health)
        health.cool_down("p/m", "k0", 30)
        assert {pool.pick("p/m")[1] for _ in range(4)} == {"s2"}

    def test_all_exhausted_names_provider(self) -> None:
        """All keys cooling → a 503 naming the provider."""
        health = HealthTracker()
        pool = KeyPool("openai-prod", ["s1", "s2"], health=health)
        health.cool_down("openai-prod/m", "k0", 30)
        health.cool_down("openai-prod/m", "k1", 30)
        with pytest.raises(KeysExhaustedError) as exc:
            pool.pick("openai-prod/m")
        assert exc.value.status_code == 503 and "openai-prod" in exc.value.message
        assert "s1" not in exc.value.message

    def test_keyless(self) -> None:
        """A provider without keys sends none."""
        assert KeyPool("local", []).pick("local/m") == ("", None)

    def test_empty_entries_are_unused(self) -> None:
        """An empty pool entry (an unset optional ${KEY_2:-}) is never sent."""
        pool = KeyPool("p", ["s1", "", "s2"])
        assert pool.ids == ["k0", "k1"]
        assert {pool.pick("p/m")[1] for _ in range(4)} == {"s1", "s2"}
        assert KeyPool("p", [""]).pick("p/m") == ("", None)
