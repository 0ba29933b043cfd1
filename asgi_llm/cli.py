"""The ``asgi-llm`` command: serve a recipe, run the demo, check a recipe."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="asgi-llm",
    help="An OpenAI-compatible LLM gateway: serve a recipe, run the offline demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_CONFIG_ENV = "ASGI_LLM_CONFIG"


_LOCAL_RECIPE = Path("recipes/standalone.yaml")


def default_recipe() -> Path:
    """The recipe ``serve`` uses without ``--config``.

    ``./recipes/standalone.yaml`` when the current directory has one (a checkout, or a
    starter written by ``asgi-llm init``: the copy you can edit wins), else the copy
    shipped inside the package (so a plain ``pip install``/``pipx install`` serves).
    """
    if _LOCAL_RECIPE.is_file():
        return _LOCAL_RECIPE
    from asgi_llm.recipes import STANDALONE

    return STANDALONE


def _load(path: Path, *, tracing: bool = False):  # type: ignore[no-untyped-def]
    """Build the gateway of a recipe (exit 2 with the problems when it is invalid).
    ``tracing``: also set up the OpenTelemetry SDK for ``observability.otel`` (serve)."""
    from asgi_llm.recipe import ConfigError, build_gateway, load_config

    try:
        config = load_config(path)
        gateway = build_gateway(config)
        if tracing:
            _setup_tracing(gateway, config.observability.otel)
        return gateway
    except ConfigError as exc:
        typer.echo(f"asgi-llm: invalid recipe\n{exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"asgi-llm: cannot read recipe {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None


def _setup_tracing(gateway, otel) -> None:  # type: ignore[no-untyped-def]
    """``observability.otel`` → the SDK's global tracer provider and exporter (serve only:
    a mounted gateway uses its host's provider), flushed at the gateway's shutdown."""
    from asgi_llm.observability.tracing import TracingFlush, configure_tracing

    try:
        provider = configure_tracing(otel)
    except (ImportError, ValueError) as exc:
        typer.echo(f"asgi-llm: observability.otel: {exc}", err=True)
        raise typer.Exit(2) from None
    if provider is not None:
        gateway.resources.insert(0, TracingFlush(provider))  # closes last: the writers' spans are exported


def app_from_env():  # type: ignore[no-untyped-def]
    """Uvicorn factory for worker processes: builds the gateway from ``$ASGI_LLM_CONFIG``."""
    from asgi_llm.recipe import build_gateway, load_config

    config = load_config(os.environ[_CONFIG_ENV])
    gateway = build_gateway(config)
    _setup_tracing(gateway, config.observability.otel)
    _configure_logging(gateway)
    gateway.tune_gc = True  # the worker process is ours
    return gateway


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", envvar=_CONFIG_ENV, help="Recipe file (default: $ASGI_LLM_CONFIG, else ./recipes/standalone.yaml, else the packaged one).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each a full, stateless gateway).")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="uvicorn access log.")] = False,
) -> None:
    """Serve a recipe with uvicorn (uvloop + httptools), with the recipe's connection
    limits (``server.header_timeout_s``, ``max_header_bytes``, ``max_headers``)."""
    import uvicorn

    from asgi_llm._server import raise_fd_limit, serve_options

    path = (config or default_recipe()).resolve()
    if config is None:
        typer.echo(f"asgi-llm: no --config, serving {path}", err=True)
    gateway = _load(path, tracing=workers == 1)  # validate before forking workers: fail fast, with the key's path
    raise_fd_limit()  # every connection is a descriptor: use what the system allows (workers inherit it)
    if workers > 1 and gateway.services.state_url.startswith("memory://"):
        typer.echo(
            f"asgi-llm: warning: {workers} workers with stores.state memory:// — each worker enforces its own "
            "rate limits, breakers and cache; use redis:// for limits that are exact across workers.",
            err=True,
        )
    # SIGTERM: uvicorn closes the listening socket at once (a balancer's next check or
    # connect fails, so it routes elsewhere), lets the requests in flight finish for up to
    # drain_timeout_s, then runs the lifespan shutdown, which flushes the ledger writers.
    drain_s = getattr(gateway.server_config, "drain_timeout_s", 30)
    opts = dict(host=host, port=port, log_level=log_level, access_log=access_log, loop="auto", http="auto",
                timeout_graceful_shutdown=drain_s)
    opts.update(serve_options(gateway.server_config))
    if workers == 1:
        _configure_logging(gateway)
        gateway.tune_gc = True  # the process is ours
        from asgi_llm._server import run_draining

        run_draining(gateway, getattr(gateway.server_config, "drain_notice_s", 0), lifespan="on", **opts)
    else:
        _migrate_before_fork(gateway)
        os.environ[_CONFIG_ENV] = str(path)
        uvicorn.run("asgi_llm.cli:app_from_env", factory=True, workers=workers, lifespan="on", **opts)  # type: ignore[arg-type]


def _configure_logging(gateway) -> None:  # type: ignore[no-untyped-def]
    """``observability.log_json`` → structlog prints JSON lines. Only here, in a process
    ``asgi-llm serve`` owns: building a gateway never reconfigures a host app's logging."""
    if gateway.log_json:
        from asgi_llm.observability.logs import configure_logging

        configure_logging(json=True)


def _migrate_before_fork(gateway) -> None:  # type: ignore[no-untyped-def]
    """Bring the SQL schema (``stores.ledger``) to head once, in the parent, so N workers
    starting at once find it made (they still check it, under a lock, on start)."""
    from asgi_llm.stores import StoreError
    from asgi_llm.stores.sql import SQLDatabase

    db = gateway.services.sql
    if not isinstance(db, SQLDatabase) or not db.migrate:
        return
    try:
        db.upgrade()
    except StoreError as exc:
        typer.echo(f"asgi-llm: {exc.message}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()  # no connection crosses into the workers


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the recipe.")] = _LOCAL_RECIPE,
) -> None:
    """Write the standalone recipe as a starter to edit (never overwrites a file)."""
    from asgi_llm.recipes import STANDALONE

    text = STANDALONE.read_text(encoding="utf-8")
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        with path.open("x", encoding="utf-8") as out:  # "x": fails if anything (even a dangling link) is there
            out.write(text)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and exc.filename == str(path):
            typer.echo(f"asgi-llm: {path} already exists; not overwriting it (remove it, or name another PATH)", err=True)
        else:
            typer.echo(f"asgi-llm: cannot write {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    serve_hint = "asgi-llm serve" if path == _LOCAL_RECIPE else f"asgi-llm serve --config {path}"
    typer.echo(f"wrote {path}: edit its providers and models, check it with `asgi-llm check {path}`, "
               f"then `{serve_hint}`")


@app.command()
def check(config: Annotated[Path, typer.Argument(help="Recipe file to validate.")]) -> None:
    """Validate a recipe (schema, references, environment variables) without serving it."""
    gateway = _load(config)
    typer.echo(f"{config}: ok — models: {', '.join(gateway.router.model_names())}")


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="Leave the demo gateway up after the checks (Ctrl-C to stop).")] = False,
) -> None:
    """Start local fake upstreams and a gateway, and run the smoke checklist (offline)."""
    from asgi_llm.demo import run_demo

    raise typer.Exit(run_demo(keep_running=keep_running))


def _add_keys_app() -> None:
    from asgi_llm.auth.cli import keys_app

    app.add_typer(keys_app, name="keys")


_add_keys_app()


def _add_usage_apps() -> None:
    from asgi_llm.usage.cli import audit_app, usage_app

    app.add_typer(usage_app, name="usage")
    app.add_typer(audit_app, name="audit")


_add_usage_apps()


def _add_node_app() -> None:
    from asgi_llm.nodes.cli import node_app

    app.add_typer(node_app, name="node")


_add_node_app()


def main() -> None:
    """Entry point of the ``asgi-llm`` console script."""
    app(prog_name="asgi-llm")


if __name__ == "__main__":
    sys.exit(main())
