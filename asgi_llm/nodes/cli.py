"""``asgi-llm node join|token|list|cordon|uncordon|drain|revoke``.

``join`` runs the agent on the BYOI machine. The others talk to a gateway's admin API
(``--gateway`` / ``--admin-key`` or ``ASGI_LLM_GATEWAY`` / ``ASGI_LLM_ADMIN_KEY``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from asgi_llm.admin.client import AdminKey, Gateway, admin_request

__all__ = ["node_app"]

node_app = typer.Typer(help="BYOI nodes: run the agent on a machine (join), or manage nodes (admin).", no_args_is_help=True)



def _admin(gateway: str, admin_key: str, method: str, path: str, body: Any = None) -> Any:
    return admin_request(gateway, admin_key, method, path, body=body, prog="asgi-llm node", timeout=30)


@node_app.command()
def join(
    gateway: Gateway,
    engine: Annotated[str, typer.Option("--engine", envvar="ASGI_LLM_ENGINE", help="The engine's OpenAI base URL, e.g. http://127.0.0.1:11434/v1.")],
    token: Annotated[str | None, typer.Option("--token", envvar="ASGI_LLM_ENROLLMENT_TOKEN", help="One-time enrollment token (not needed once enrolled).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name (default: the host name).")] = None,
    tunnel: Annotated[bool, typer.Option("--tunnel", help="Dial out over a WebSocket: no inbound port needed.")] = False,
    host: Annotated[str, typer.Option(help="Direct mode: interface the proxy binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Direct mode: proxy port (tunnel mode: local /healthz only).")] = 8780,
    advertise_url: Annotated[str | None, typer.Option(help="Direct mode: the URL the gateway calls (default http://HOST:PORT/v1).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the node credential is kept.")] = Path.home() / ".asgi-llm-node",
    engine_key: Annotated[str | None, typer.Option(envvar="ASGI_LLM_ENGINE_KEY", help="API key the engine wants, if any.")] = None,
    label: Annotated[list[str], typer.Option(help="key=value label (repeatable), for node selectors.")] = [],  # noqa: B006
    price_input: Annotated[float | None, typer.Option(help="Owner-set price, USD per 1M prompt tokens.")] = None,
    price_output: Annotated[float | None, typer.Option(help="Owner-set price, USD per 1M completion tokens.")] = None,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to finish in-flight requests on SIGTERM.")] = 30.0,
) -> None:
    """Enroll this machine's engine with a gateway and serve it (the node agent)."""
    from asgi_llm.nodes.agent import AgentConfig, run_agent

    labels = {}
    for item in label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"--label {item!r}: use key=value")
        labels[k] = v
    price = None
    if price_input is not None or price_output is not None:
        price = {"input": str(price_input or 0), "output": str(price_output or 0)}
    config = AgentConfig(gateway=gateway, engine=engine, token=token, name=name, tunnel=tunnel, host=host, port=port,
                         advertise_url=advertise_url, state_dir=state_dir, engine_key=engine_key, labels=labels,
                         price=price, drain_timeout_s=drain_timeout)
    raise typer.Exit(run_agent(config))


@node_app.command("token")
def create_token(
    gateway: Gateway,
    admin_key: AdminKey,
    org: Annotated[str | None, typer.Option(help="The org the node will belong to (required for a recipe admin key).")] = None,
    ttl: Annotated[float, typer.Option(help="Token lifetime, seconds.")] = 600,
    share_with: Annotated[list[str], typer.Option(help="Another org that may use the node (repeatable; * = all).")] = [],  # noqa: B006
) -> None:
    """Create a one-time enrollment token (printed once)."""
    body: dict[str, Any] = {"ttl_s": ttl}
    if org:
        body["org"] = org
    if share_with:
        body["shared_with"] = share_with
    data = _admin(gateway, admin_key, "POST", "/admin/enrollment-tokens", body)
    typer.echo(data["token"])
    typer.echo(f"# org {data['org']}, expires at {data['expires_at']:.0f} (epoch s); one use", err=True)


@node_app.command("list")
def list_nodes(gateway: Gateway, admin_key: AdminKey,
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List nodes with their live status."""
    data = _admin(gateway, admin_key, "GET", "/admin/nodes")["data"]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for n in data:
        models = ",".join(m["id"] for m in n["models"])
        typer.echo(f"{n['id']}  {n['name']:<20} {n['org']:<12} {n['mode']:<7} {n['status']:<9} {models}")


def _action(verb: str):  # type: ignore[no-untyped-def]
    def command(gateway: Gateway, admin_key: AdminKey,
                node: Annotated[str, typer.Argument(help="Node id or name.")]) -> None:
        data = _admin(gateway, admin_key, "POST", f"/admin/nodes/{node}/{verb}")
        typer.echo(f"{data['name']}: {data['status']}")

    command.__doc__ = f"{verb.capitalize()} a node."
    return command


for _verb in ("cordon", "uncordon", "drain", "revoke"):
    node_app.command(_verb)(_action(_verb))


def _add_install_service() -> None:
    from asgi_llm.nodes.install import install_service

    node_app.command("install-service")(install_service)


_add_install_service()
