"""``asgi-llm keys create|list|revoke``: manage API keys through a gateway's admin API.

The gateway and the admin key come from ``--gateway`` / ``--admin-key`` or the
environment (``ASGI_LLM_GATEWAY``, ``ASGI_LLM_ADMIN_KEY``). A created key is printed
once — the gateway keeps only its hash.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any

import typer

from asgi_llm.admin.client import AdminKey, Gateway, admin_request

__all__ = ["keys_app"]

keys_app = typer.Typer(help="Create, list and revoke API keys (through a gateway's admin API).", no_args_is_help=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter("use a number with an optional unit: 90s, 15m, 12h, 30d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _call(gateway: str, admin_key: str, method: str, path: str, body: Any = None) -> Any:
    return admin_request(gateway, admin_key, method, path, body=body, prog="asgi-llm keys", timeout=30)


@keys_app.command()
def create(
    gateway: Gateway = "http://127.0.0.1:8080",
    admin_key: AdminKey = "",
    org: Annotated[str | None, typer.Option(help="Org of the key (required with a recipe admin key).")] = None,
    name: Annotated[str | None, typer.Option(help="A label shown in listings and reports.")] = None,
    scope: Annotated[list[str] | None, typer.Option(help="inference (default), admin, node; repeat for several.")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Allowed public model; repeat (default: all).")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    spend_day: Annotated[str | None, typer.Option(help="USD per UTC day.")] = None,
    spend_month: Annotated[str | None, typer.Option(help="USD per UTC month.")] = None,
    expires_in: Annotated[str | None, typer.Option(help="Lifetime: 90s, 15m, 12h, 30d.")] = None,
    as_json: AsJson = False,
) -> None:
    """Create a key; it is printed once."""
    limits = {k: v for k, v in {"rpm": rpm, "tpm": tpm, "concurrency": concurrency,
                                "spend_usd_per_day": spend_day, "spend_usd_per_month": spend_month}.items() if v is not None}
    body: dict[str, Any] = {"limits": limits}
    if org is not None:
        body["org"] = org
    if name is not None:
        body["name"] = name
    if scope:
        body["scopes"] = scope
    if model:
        body["models"] = model
    if expires_in is not None:
        body["expires_in_s"] = _duration(expires_in)
    data = _call(gateway, admin_key, "POST", "/admin/keys", body)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"Created {data['id']} for org {data['org']} (scopes: {', '.join(data['scopes'])}). "
               "The key is shown this once; store it now:", err=True)
    typer.echo(data["key"])


@keys_app.command("list")
def list_keys(
    gateway: Gateway = "http://127.0.0.1:8080",
    admin_key: AdminKey = "",
    org: Annotated[str | None, typer.Option(help="Only this org (recipe admin keys see every org).")] = None,
    as_json: AsJson = False,
) -> None:
    """List keys (prefixes only, never the keys)."""
    path = "/admin/keys" + (f"?org={org}" if org else "")
    data = _call(gateway, admin_key, "GET", path)["data"]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "org", "name", "prefix", "scopes", "models", "limits", "status")
    for k in data:
        status = "revoked" if k.get("revoked_at") else "recipe" if k.get("source") == "recipe" else "active"
        limits = ", ".join(f"{n}={v}" for n, v in (k.get("limits") or {}).items()) or "-"
        table.add_row(k["id"], k["org"], k.get("name") or "-", k.get("prefix") or "-", ",".join(k["scopes"]),
                      ",".join(k["models"]), limits, status)
    Console(file=sys.stdout, width=160).print(table)


@keys_app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_…), as listed.")],
    gateway: Gateway = "http://127.0.0.1:8080",
    admin_key: AdminKey = "",
) -> None:
    """Revoke a key (effective at once on that replica, within auth.cache_ttl_s on the others)."""
    data = _call(gateway, admin_key, "DELETE", f"/admin/keys/{key_id}")
    typer.echo(f"Revoked {data['id']} (org {data['org']}).")
