"""asgi-llm serve tunes the garbage collector of the process it owns; a mounted gateway does not."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_llm.config import config_from_dict
from asgi_llm.stack import build_gateway, gateway_lifespan


def recipe(tmp: Path) -> dict[str, Any]:
    """A minimal recipe whose ledger lives in ``tmp`` (the default would be ./asgi-llm.db)."""
    return {"providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}}, "models": {"chat": {"targets": [{"provider": "a", "model": "m"}]}},
            "stores": {"ledger": f"sqlite:///{tmp / 'ledger.db'}"}}


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.anyio
async def test_a_served_gateway_freezes_startup_objects(restore_gc: None, tmp_path: Path) -> None:
    gateway = build_gateway(config_from_dict(recipe(tmp_path), environ={}))
    gateway.tune_gc = True
    async with gateway_lifespan(gateway):
        assert gc.get_freeze_count() > 10_000  # modules, recipe, pools: out of the collector's sight
        assert gc.get_threshold()[0] == 10_000


@pytest.mark.anyio
async def test_a_mounted_gateway_leaves_the_host_gc_alone(restore_gc: None, tmp_path: Path) -> None:
    before = gc.get_threshold()
    gateway = build_gateway(config_from_dict(recipe(tmp_path), environ={}))
    async with gateway_lifespan(gateway):
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
