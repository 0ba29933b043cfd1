"""The web console (``/console``): sign in with an admin key, then keys, nodes, usage,
routing, audit and a playground — every action through the gateway's own admin API.

How it fits: :func:`asgi_llm.recipe.console.build_console` wraps the composed gateway app in
:class:`ConsoleApp`, which answers paths under the console's path and passes
everything else on untouched. Pages are server-rendered (Jinja2) shells; the small
hand-written script in ``static/console.js`` fills them by calling
``<console>/api/admin/...`` and ``<console>/api/v1/...``. Those calls are replayed
in-process into the full gateway stack (error, context, audit, auth, quota, usage …)
with the signed-in admin key's principal, so the console has exactly the CLI's
authorization and every action lands in the audit log:

* ``/api/admin/...`` runs as the admin key itself (its org, its scopes);
* ``/api/v1/chat/completions`` and ``/api/v1/models`` (the Playground) run as an
  inference principal of the signed-in org (``console:<admin key id>``): the org's
  limits and metering apply, and the ledger shows the console as the caller.

Security: a signed, expiring session cookie (HttpOnly, SameSite=Strict, Secure behind
https), re-checked against the key store on every request (a revoked admin key ends
its sessions); a CSRF token on every state-changing request (403 without it); a
strict Content-Security-Policy (``default-src 'self'``, no inline script); no asset
leaves the package.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm._asgi import get_header, route_path
from asgi_llm.console.session import Session, SessionSigner
from asgi_llm.context import Principal
from asgi_llm.errors import AuthenticationError
from asgi_llm.middleware.auth import INJECTED_PRINCIPAL

if TYPE_CHECKING:
    from asgi_llm.auth.keyring import KeyRing

__all__ = ["ConsoleApp", "ConsoleResource"]

log = logging.getLogger("asgi_llm.console")

PAGES = ("overview", "playground", "keys", "nodes", "usage", "routing", "audit")
COOKIE = "asgi_llm_console"
SUPER_ORG = "*"
_HERE = Path(__file__).parent
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png"}
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'")
_MAX_FORM_BYTES = 8192
_MAX_ORG_CHARS = 200
# What the console may replay into the gateway (anything else is a 404).
_ADMIN_PREFIX = "/admin/"
_INFERENCE_PATHS = ("/v1/chat/completions", "/v1/models")
_FORWARD_HEADERS = {b"content-type", b"content-length", b"accept"}
_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
_MAX_FAILURES = 10  # refused sign-ins per client address per window, then 429
_FAILURE_WINDOW_S = 60.0
_MAX_TRACKED_CLIENTS = 10_000


def _templates() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(str(_HERE / "templates")), autoescape=select_autoescape(["html"]))


class ConsoleApp:
    """Serve the console under ``path``; pass every other request to ``app``.

    Args:
        app: the gateway's composed stack (what console API calls are replayed into).
        audit: the audit log's sink; sign-ins and sign-outs (refused ones too) are recorded.
        keys: the key ring (``None``: no auth configured — the console explains how to enable it).
        signer: issues and checks session cookies (``None`` until the secret is loaded).
        path: where the console lives (``/console``).
    """

    def __init__(self, app: ASGIApp, *, keys: KeyRing | None, path: str = "/console",
                 signer: SessionSigner | None = None, session_ttl_s: float = 8 * 3600,
                 audit: Callable[[Any], None] | None = None) -> None:
        self.app = app
        self.audit = audit
        self.keys = keys
        self.path = "/" + path.strip("/")
        self.signer = signer
        self.session_ttl_s = session_ttl_s
        self.env = _templates()
        # Refused sign-ins per client address in the last minute (bounded; per process).
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path != self.path and not path.startswith(self.path + "/"):
            await self.app(scope, receive, send)
            return
        sub = path[len(self.path):] or "/"
        method = scope["method"]
        if sub.startswith("/static/") and method in ("GET", "HEAD"):
            await self._static(sub[len("/static/"):], send)
            return
        if self.keys is None or self.signer is None:
            await self._html(send, "disabled.html", {"base": self._url(scope, "")}, status=200)
            return
        if sub == "/signin":
            if method == "POST":
                await self._signin(scope, receive, send)
            else:
                await self._html(send, "signin.html", {"error": None, "base": self._url(scope, "")})
            return
        session = self.signer.read(_cookie(scope))
        principal = await self._principal(session) if session is not None else None
        if session is None or principal is None:
            if sub.startswith("/api/"):
                await _json(send, 401, _error("Sign in to the console first.", "authentication_error"))
            else:
                await _redirect(send, self._url(scope, "/signin"), clear=self._url(scope, "") if session is not None else None)
            return
        if method in _CHANGING and not self.signer.check_csrf(session, _csrf(scope)):
            await _json(send, 403, _error("Missing or wrong CSRF token: reload the console page and try again.",
                                          "permission_error", code="csrf_failed"))
            return
        if sub.startswith("/api/"):
            await self._replay(scope, receive, send, sub[len("/api"):], principal)
        elif sub == "/signout" and method == "POST":
            self._audit("POST " + self.path + "/signout", principal.org, principal.key_id, "allowed", 303, None)
            await _redirect(send, self._url(scope, "/signin"), clear=self._url(scope, ""))
        elif sub == "/":
            await _redirect(send, self._url(scope, "/overview"))
        elif sub.strip("/") in PAGES and method in ("GET", "HEAD"):
            await self._page(scope, send, sub.strip("/"), session, principal)
        else:
            await _json(send, 404, _error(f"No console page at {self.path}{sub}.", "not_found_error"))

    def _url(self, scope: Scope, sub: str) -> str:
        return scope.get("root_path", "") + self.path + sub

    # ------------------------------------------------------------------ sign-in

    async def _signin(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.keys is not None and self.signer is not None
        if not _same_origin(scope):
            await self._html(send, "signin.html", {"error": "Sign-in from another site refused.", "base": self._url(scope, "")},
                             status=403)
            return
        client = str((scope.get("client") or ("?",))[0])
        wait = self._throttled(client)
        if wait:
            self._audit("POST " + self.path + "/signin", "*", "anonymous", "rate_limited", 429, "too many failed sign-ins")
            await self._html(send, "signin.html", {
                "error": f"Too many failed sign-ins from this address: wait {wait} s and try again.",
                "base": self._url(scope, "")}, status=429)
            return
        form = await _read_form(receive)
        key = (form or {}).get("admin_key", "").strip()
        error = None
        principal = None
        if not key:
            error = "Enter an admin key."
        else:
            try:
                principal = await self.keys.authenticate(key)
            except AuthenticationError:
                error = "That admin key was not accepted."
            except Exception:  # the key store is down: say so, never a 500
                log.warning("console sign-in: key store unavailable", exc_info=True)
                error = "The key store is unavailable; try again shortly."
            if principal is not None and not principal.has_scope("admin"):
                principal, error = None, "That key is not an admin key (it lacks the 'admin' scope)."
        if principal is None:
            self._failed(client)
            self._audit("POST " + self.path + "/signin", "*", "anonymous", "denied", 401, error)
            await self._html(send, "signin.html", {"error": error, "base": self._url(scope, "")}, status=401)
            return
        self._audit("POST " + self.path + "/signin", principal.org, principal.key_id, "allowed", 303, None)
        digest = self.keys.static_fingerprint(principal.key_id)
        cookie, _ = self.signer.issue(principal.key_id, principal.org, self.signer.tag(digest) if digest else "")
        secure = "; Secure" if _is_https(scope) else ""
        header = (f"{COOKIE}={cookie}; Path={self._url(scope, '')}; HttpOnly; SameSite=Strict; "
                  f"Max-Age={int(self.session_ttl_s)}{secure}")
        await _redirect(send, self._url(scope, "/overview"), extra=[(b"set-cookie", header.encode())])

    def _throttled(self, client: str) -> int:
        """Seconds ``client`` must wait before trying again (0: it may try now)."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, ()) if now - t < _FAILURE_WINDOW_S]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        if len(recent) < _MAX_FAILURES:
            return 0
        return max(1, int(_FAILURE_WINDOW_S - (now - recent[0])) + 1)

    def _failed(self, client: str) -> None:
        self._failures.setdefault(client, []).append(time.monotonic())
        self._failures.move_to_end(client)
        while len(self._failures) > _MAX_TRACKED_CLIENTS:
            self._failures.popitem(last=False)

    def _audit(self, action: str, org: str, actor: str, verdict: str, status: int, error: str | None) -> None:
        """Record a console sign-in/out in the audit log (never the key itself)."""
        if self.audit is None:
            return
        from asgi_llm.audit.chain import AuditEvent
        from asgi_llm.context import new_request_id

        try:
            self.audit(AuditEvent(kind="admin", org=org, actor=actor, action=action, verdict=verdict, status=status,
                                  request_id=new_request_id(), detail={"console": True, **({"error": error} if error else {})}))
        except Exception:  # the audit writer's own bounds/quarantine apply; a sign-in never 500s
            log.warning("console: could not queue an audit event", exc_info=True)

    async def _principal(self, session: Session) -> Principal | None:
        """The session's admin principal, re-checked now (revoked/expired keys end sessions)."""
        assert self.keys is not None
        for p in self.keys.static_principals:
            if p.key_id == session.key_id:
                digest = self.keys.static_fingerprint(p.key_id)
                same_key = digest is not None and self.signer is not None and secrets.compare_digest(
                    session.fingerprint, self.signer.tag(digest))
                return p if same_key and p.has_scope("admin") and p.org == session.org else None
        try:
            record = await self.keys.get_key(session.key_id)
        except Exception:
            log.warning("console session check: key store unavailable", exc_info=True)
            return None
        if record is None or record.revoked_at is not None:
            return None
        if record.expires_at is not None and record.expires_at <= time.time():
            return None
        principal = record.principal()
        return principal if principal.has_scope("admin") and principal.org == session.org else None

    # ------------------------------------------------------------------ pages

    async def _page(self, scope: Scope, send: Send, page: str, session: Session, principal: Principal) -> None:
        assert self.signer is not None
        is_super = principal.org == SUPER_ORG
        orgs: list[str] = []
        if is_super and self.keys is not None:
            found = {p.org for p in self.keys.static_principals}
            try:
                found |= {r.org for r in await self.keys.list_keys()}
            except Exception:
                pass
            orgs = sorted(o for o in found if o != SUPER_ORG)[:500]
        host = (get_header(scope, b"host") or b"127.0.0.1").decode("latin-1")
        gateway_url = f"{'https' if _is_https(scope) else 'http'}://{host}{scope.get('root_path', '')}"
        await self._html(send, f"{page}.html", {
            "page": page, "pages": PAGES, "base": self._url(scope, ""), "csrf": self.signer.csrf_token(session),
            "org": principal.org, "is_super": is_super, "orgs": orgs, "actor": principal.name or principal.key_id,
            "gateway_url": gateway_url,
        })

    async def _html(self, send: Send, template: str, context: dict[str, Any], status: int = 200) -> None:
        context.setdefault("base", self.path)
        body = self.env.get_template(template).render(**context).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            *_security_headers()]})
        await send({"type": "http.response.body", "body": body})

    async def _static(self, name: str, send: Send) -> None:
        root = (_HERE / "static").resolve()
        target = (root / name).resolve()
        if root not in target.parents or not target.is_file() or target.suffix not in _STATIC_TYPES:
            await _json(send, 404, _error("No such console asset.", "not_found_error"))
            return
        body = target.read_bytes()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", _STATIC_TYPES[target.suffix].encode()), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-cache"), *_security_headers()]})
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------------ API replay

    async def _replay(self, scope: Scope, receive: Receive, send: Send, target: str, admin: Principal) -> None:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        if target.startswith(_ADMIN_PREFIX):
            principal = admin
        elif target in _INFERENCE_PATHS:
            org = admin.org
            if org == SUPER_ORG:
                org = query.pop("org", "").strip()
                if not org or org == SUPER_ORG or len(org) > _MAX_ORG_CHARS or not org.isprintable():
                    await _json(send, 400, _error("Pick the org the playground runs as (the Viewing org selector).",
                                                  "invalid_request_error", param="org"))
                    return
            else:
                query.pop("org", None)
            # The admin key's own model allow-list holds in the playground too.
            principal = Principal(key_id=f"console:{admin.key_id}", org=org, scopes=frozenset({"inference"}),
                                  models=admin.models, name="console playground")
        else:
            await _json(send, 404, _error(f"The console does not forward {target}.", "not_found_error"))
            return
        root = scope.get("root_path", "")
        headers = [(k, v) for k, v in scope["headers"] if k in _FORWARD_HEADERS]
        headers.append((b"user-agent", b"asgi-llm-console"))
        sub: dict[str, Any] = {
            "type": "http", "asgi": scope.get("asgi", {"version": "3.0"}), "http_version": scope.get("http_version", "1.1"),
            "method": scope["method"], "scheme": scope.get("scheme", "http"), "server": scope.get("server"),
            "client": scope.get("client"), "root_path": root, "path": root + target,
            "raw_path": (root + target).encode(), "query_string": urlencode(query).encode(), "headers": headers,
            "extensions": scope.get("extensions", {}), INJECTED_PRINCIPAL: principal,
        }

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_security_headers()]}
            await send(message)

        await self.app(sub, receive, send_secured)


# ---------------------------------------------------------------------- helpers


def _security_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-security-policy", _CSP.encode()), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"), (b"x-frame-options", b"DENY")]


def _error(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *_security_headers()]})
    await send({"type": "http.response.body", "body": data})


async def _redirect(send: Send, location: str, *, clear: str | None = None,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"location", location.encode()), (b"content-length", b"0"), *_security_headers(), *(extra or [])]
    if clear is not None:  # the cookie's own Path, or the browser keeps it
        headers.append((b"set-cookie", f"{COOKIE}=; Path={clear}; Max-Age=0; HttpOnly; SameSite=Strict".encode()))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _cookie(scope: Scope) -> str | None:
    raw = get_header(scope, b"cookie")
    if raw is None:
        return None
    for part in raw.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _csrf(scope: Scope) -> str | None:
    raw = get_header(scope, b"x-csrf-token")
    return raw.decode("latin-1") if raw is not None else None


def _is_https(scope: Scope) -> bool:
    proto = get_header(scope, b"x-forwarded-proto")
    if proto is not None:
        return proto.decode("latin-1").split(",")[0].strip().lower() == "https"
    return scope.get("scheme") == "https"


def _same_origin(scope: Scope) -> bool:
    origin = get_header(scope, b"origin")
    if origin is None or origin == b"null":
        return origin is None
    host = get_header(scope, b"host") or b""
    return origin.split(b"://", 1)[-1] == host


async def _read_form(receive: Receive) -> dict[str, str] | None:
    """A small urlencoded form body (``None`` if it is too large)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > _MAX_FORM_BYTES:
            return None
        if not message.get("more_body"):
            break
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        return None


class ConsoleResource:
    """Loads the session secret at startup: the recipe/env one, else the SQL store's."""

    def __init__(self, console: ConsoleApp, *, secret: str | None, keys: KeyRing, ttl_s: float) -> None:
        self.console = console
        self.secret = secret
        self.keys = keys
        self.ttl_s = ttl_s

    async def start(self, task_group: Any) -> None:
        if self.secret:
            raw = self.secret.encode()
        else:
            store = self.keys.store
            setting = getattr(store, "_setting", None)
            if setting is not None:
                # One secret for every replica, generated once (the pepper's table).
                raw = (await setting("console_session_secret", secrets.token_hex(32))).encode()
            else:
                log.warning("console: no console.session_secret and no SQL key store: sessions last "
                            "only as long as this process and are not shared with other replicas")
                raw = secrets.token_hex(32).encode()
        self.console.signer = SessionSigner(raw, ttl_s=self.ttl_s)

    async def aclose(self) -> None:
        return None
