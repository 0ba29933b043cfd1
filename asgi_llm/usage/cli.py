"""``asgi-llm usage report|compare|top-prompts`` and ``asgi-llm audit verify``.

``usage`` talks to a gateway's admin API (``--gateway URL --admin-key K`` or
``ASGI_LLM_GATEWAY`` / ``ASGI_LLM_ADMIN_KEY``) and prints a table (or ``--format
json|csv``). ``audit verify`` either reads the SQL store directly (``--ledger URL``,
e.g. ``sqlite:///asgi-llm.db`` — what an auditor with read access to the database
would run, independent of any gateway) or asks a gateway (``GET /admin/audit/verify``);
it prints the chain head (record it elsewhere to anchor the chain) and exits 1 when the
chain is broken.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from asgi_llm.admin.client import AdminKey, Gateway, admin_request

__all__ = ["audit_app", "usage_app"]

usage_app = typer.Typer(help="Usage and cost reports (through a gateway's admin API).", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)

Since = Annotated[str | None, typer.Option(help="ISO date/datetime or a look-back such as 24h, 7d.")]
Fmt = Annotated[str, typer.Option("--format", help="table | json | csv")]


def _get(gateway: str, admin_key: str, path: str, params: dict[str, Any], *, raw: bool = False) -> Any:
    return admin_request(gateway, admin_key, "GET", path, params=params, raw=raw)


def _print(rows: list[dict[str, Any]], fmt: str, title: str, columns: list[str] | None = None) -> None:
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        from asgi_llm.admin.usage import rows_to_csv

        typer.echo(rows_to_csv(rows, columns), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    cols = columns or (list(rows[0]) if rows else [])
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "route", "key", "node", "org", "day", "prompt_hash", "provider") else "right")
    for r in rows:
        table.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in cols])
    Console(width=200).print(table)


REPORT_COLUMNS = ["requests", "attempts", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
                  "cache_hits", "saved_usd", "errors", "p50_latency_ms", "p95_latency_ms"]


@usage_app.command("report")
def report(
    group_by: Annotated[str, typer.Option("--group-by", help="Comma-separated: model,route,key,node,org,day,provider.")] = "model",
    since: Since = None,
    until: Since = None,
    org: Annotated[str | None, typer.Option(help="Only this org.")] = None,
    fmt: Fmt = "table",
    gateway: Gateway = "http://127.0.0.1:8080",
    admin_key: AdminKey = "",
) -> None:
    """Requests, tokens, cost, cache hits and savings, errors and latency per group."""
    params = {"group_by": group_by, "since": since, "until": until, "org": org}
    doc = _get(gateway, admin_key, "/admin/usage", params)
    groups = doc["group_by"]
    _print(doc["data"], fmt, f"usage by {', '.join(groups) or 'total'}", [*groups, *REPORT_COLUMNS])


@usage_app.command("compare")
def compare(
    since: Since = None, until: Since = None, org: Annotated[str | None, typer.Option()] = None,
    prompt_hash: Annotated[str | None, typer.Option(help="Only this prompt hash.")] = None,
    fmt: Fmt = "table", gateway: Gateway = "http://127.0.0.1:8080", admin_key: AdminKey = "",
) -> None:
    """The same prompt over different routes: cost and latency side by side."""
    doc = _get(gateway, admin_key, "/admin/usage/compare", {"since": since, "until": until, "org": org, "prompt_hash": prompt_hash})
    _print(doc["data"], fmt, "route comparison", ["prompt_hash", "route", "model", "requests", "cost_per_request_usd",
                                                  "avg_latency_ms", "avg_ttft_ms", "prompt_tokens", "completion_tokens"])


@usage_app.command("top-prompts")
def top_prompts(
    by: Annotated[str, typer.Option(help="cost | count")] = "cost", limit: int = 10,
    since: Since = None, until: Since = None, org: Annotated[str | None, typer.Option()] = None,
    fmt: Fmt = "table", gateway: Gateway = "http://127.0.0.1:8080", admin_key: AdminKey = "",
) -> None:
    """The highest-impact inputs (prompt hashes) by cost or by count."""
    doc = _get(gateway, admin_key, "/admin/usage/top-prompts", {"by": by, "limit": limit, "since": since, "until": until, "org": org})
    _print(doc["data"], fmt, f"top prompts by {by}")


@audit_app.command("verify")
def verify(
    ledger: Annotated[str | None, typer.Option("--ledger", help="Read the SQL store directly (sqlite:///… or postgresql://…).")] = None,
    gateway: Gateway = "http://127.0.0.1:8080",
    admin_key: AdminKey = "",
) -> None:
    """Walk the audit hash chain; report the first broken link. Exit 1 if broken."""
    if ledger:
        import anyio

        from asgi_llm.audit.store import SQLAuditStore
        from asgi_llm.stores.sql import SQLDatabase

        async def run() -> dict[str, Any]:
            db = SQLDatabase(ledger, migrate=False)
            try:
                return (await SQLAuditStore(db).verify()).to_api()
            finally:
                await db.aclose()

        try:
            result = anyio.run(run)
        except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
            typer.echo(f"asgi-llm audit verify: {exc}", err=True)
            raise typer.Exit(2) from None
    else:
        result = _get(gateway, admin_key, "/admin/audit/verify", {})
    typer.echo(f"events: {result['events']}  head: seq {result['head_seq']} {result['head_hash']}")
    brk = result.get("first_break")
    if brk:
        typer.echo(f"BROKEN at seq {brk['seq']}: {brk['reason']}")
        raise typer.Exit(1)
    typer.echo("ok: the chain is intact")
