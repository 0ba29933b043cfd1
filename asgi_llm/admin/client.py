"""The CLI side of the admin API: one small client the ``keys``, ``usage``, ``audit``
and ``node`` commands share (``--gateway``/``--admin-key`` or ``ASGI_LLM_GATEWAY``/
``ASGI_LLM_ADMIN_KEY``). Errors become one line on stderr and a non-zero exit, with the
gateway's own OpenAI-shaped message."""

from __future__ import annotations

from typing import Annotated, Any

import typer

__all__ = ["AdminKey", "Gateway", "admin_request"]

Gateway = Annotated[str, typer.Option("--gateway", envvar="ASGI_LLM_GATEWAY", help="Gateway URL.")]
AdminKey = Annotated[str, typer.Option("--admin-key", envvar="ASGI_LLM_ADMIN_KEY", help="An admin key.", show_default=False)]


def admin_request(
    gateway: str,
    admin_key: str,
    method: str,
    path: str,
    *,
    body: Any = None,
    params: dict[str, Any] | None = None,
    raw: bool = False,
    prog: str = "asgi-llm",
    timeout: float = 60.0,
) -> Any:
    """Call the admin API; return the JSON (or text with ``raw``); exit 1/2 on failure."""
    import httpx2

    if not admin_key:
        typer.echo(f"{prog}: an admin key is needed (--admin-key or ASGI_LLM_ADMIN_KEY)", err=True)
        raise typer.Exit(2)
    base = gateway.rstrip("/").removesuffix("/v1")
    query = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        with httpx2.Client(timeout=timeout, trust_env=False) as http:
            resp = http.request(method, base + path, json=body, params=query,
                                headers={"authorization": f"Bearer {admin_key}"})
    except httpx2.HTTPError as exc:
        typer.echo(f"{prog}: cannot reach the gateway at {base}: {exc}", err=True)
        raise typer.Exit(1) from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:300]
        typer.echo(f"{prog}: {resp.status_code}: {message}", err=True)
        raise typer.Exit(1)
    if raw:
        return resp.text
    try:
        return resp.json()
    except ValueError:
        return None
