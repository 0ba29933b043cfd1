"""The gateway inside an existing FastAPI app, with the host's own routes untouched.

Run it:

    ASGI_LLM_CONFIG=recipes/standalone.yaml uvicorn recipes.mount_in_fastapi:app --port 8000

Clients then use ``base_url="http://127.0.0.1:8000/llm/v1"``; the app's own routes
(``/`` and ``/items/{id}`` here) behave exactly as before. Mounted sub-apps get no
lifespan events from the server, so the host's lifespan opens and closes the gateway's
connection pools with ``gateway_lifespan``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI

from asgi_llm import build_gateway, gateway_lifespan, load_config

gateway = build_gateway(load_config(os.environ.get("ASGI_LLM_CONFIG", "recipes/standalone.yaml")))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with gateway_lifespan(gateway):
        yield


app = FastAPI(title="My product", lifespan=lifespan)


@app.get("/")
async def index() -> dict[str, str]:
    return {"service": "my product", "llm": "/llm/v1"}


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


app.mount("/llm", gateway)
