"""``asgi-llm node install-service``: run the node agent as a service of the current user.

One command line, rendered for the machine's service manager:

* ``systemd`` (Linux): a user unit, ``~/.config/systemd/user/asgi-llm-node.service``;
* ``launchd`` (macOS): a LaunchAgent, ``~/Library/LaunchAgents/dev.asgi-llm.node.plist``;
* ``windows``: a PowerShell script that registers a Task Scheduler task started at
  log-on (no administrator rights, runs as you), written to the state dir.

The program is the running interpreter's ``asgi-llm`` (next to ``sys.executable``, else
in its scripts directory, else ``python -m asgi_llm.cli`` with that interpreter), so the
service runs exactly the install that wrote it, with absolute paths. Secrets (the
one-time enrollment token, the engine key) never go on the command line: the systemd
unit reads them from ``<state-dir>/service.env`` (mode 0600); the plist carries them in
``EnvironmentVariables`` and is written 0600; on Windows they go in your user
environment. ``--dry-run`` prints everything (secrets masked) and writes nothing.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

__all__ = [
    "FLAVOURS", "FileToWrite", "InstallError", "ServicePlan", "ServiceSpec", "default_flavour", "install_service",
    "plan_service", "program_argv", "render_env_file", "render_launchd", "render_systemd", "render_windows",
]

FLAVOURS = ("systemd", "launchd", "windows")
UNIT_NAME = "asgi-llm-node.service"
LAUNCHD_LABEL = "dev.asgi-llm.node"
TASK_NAME = "asgi-llm-node"
TOKEN_ENV = "ASGI_LLM_ENROLLMENT_TOKEN"
ENGINE_KEY_ENV = "ASGI_LLM_ENGINE_KEY"

# A secret goes into an env file / plist / PowerShell literal: a charset that needs no quoting anywhere.
_SECRET_RE = re.compile(r"^[A-Za-z0-9._~+/=:@-]{1,4096}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_MASK = "***"


class InstallError(ValueError):
    """An option that cannot go into a service definition (the message says which and why)."""


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: ``program node join …`` with these options, and its secrets."""

    program: tuple[str, ...]
    gateway: str
    engine: str
    state_dir: str
    name: str | None = None
    tunnel: bool = False
    host: str = "127.0.0.1"
    port: int = 8780
    advertise_url: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    secrets: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        """The agent's full command line (no secrets on it)."""
        args = [*self.program, "node", "join", "--gateway", self.gateway, "--engine", self.engine,
                "--state-dir", self.state_dir]
        if self.name:
            args += ["--name", self.name]
        if self.tunnel:
            args.append("--tunnel")
        else:
            args += ["--host", self.host, "--port", str(self.port)]
            if self.advertise_url:
                args += ["--advertise-url", self.advertise_url]
        for key, value in self.labels:
            args += ["--label", f"{key}={value}"]
        return args

    def masked(self) -> ServiceSpec:
        """This spec with every secret value replaced by ``***`` (for printing)."""
        return replace(self, secrets={k: _MASK for k in self.secrets})


@dataclass(frozen=True)
class FileToWrite:
    """One file of a plan: where, what, and its permission bits."""

    path: Path
    content: bytes
    mode: int
    replaceable: bool = False  # ours alone (the secrets file): rewritten without --force


@dataclass(frozen=True)
class ServicePlan:
    """The files to write and the commands that enable the service afterwards."""

    flavour: str
    files: list[FileToWrite]
    commands: list[str]
    notes: list[str]


# --- validation -------------------------------------------------------------------------------


def _text(value: str, what: str, max_len: int = 2048) -> str:
    if not value or len(value) > max_len or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InstallError(f"{what}: must be 1–{max_len} printable characters")
    return value


def _url(value: str, what: str) -> str:
    _text(value, what)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InstallError(f"{what}: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InstallError(f"{what}: use an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InstallError(f"{what}: a service definition is readable; put no credentials in the URL")
    if any(c.isspace() for c in value):
        raise InstallError(f"{what}: a URL has no spaces")
    return value


def _secret(value: str, what: str) -> str:
    if not _SECRET_RE.match(value):
        raise InstallError(f"{what}: use the value as issued (letters, digits and ._~+/=:@- only, at most 4096)")
    return value


def _label(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not _LABEL_KEY_RE.match(key):
        raise InstallError(f"--label {item[:80]!r}: use key=value (key: letters, digits, ._/-)")
    return key, _text(value, f"--label {key}", 256)


def program_argv() -> tuple[str, ...]:
    """How to run this install's ``asgi-llm``: its script if it has one, else ``python -m``."""
    exe = Path(sys.executable)
    script = "asgi-llm.exe" if os.name == "nt" else "asgi-llm"
    for folder in (exe.parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / script
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return (str(candidate.absolute()),)
    return (str(exe.absolute()), "-m", "asgi_llm.cli")


# --- renderers ----------------------------------------------------------------------------------


def _systemd_escape(value: str) -> str:
    """A value in a unit file: ``%`` specifiers and ``$`` expansion made literal."""
    return value.replace("%", "%%").replace("$", "$$")


def _systemd_word(arg: str) -> str:
    """One ExecStart argument, double-quoted when it needs it (systemd.service "Command lines")."""
    arg = _systemd_escape(arg)
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_systemd(spec: ServiceSpec, env_file: str) -> str:
    """The user unit: restart on failure but not after a revocation (exit 3); SIGTERM drains."""
    exec_start = " ".join(_systemd_word(a) for a in spec.argv())
    return f"""\
# asgi-llm node agent, a systemd user unit written by `asgi-llm node install-service`.
[Unit]
Description=asgi-llm node agent (BYOI capacity for {_systemd_escape(spec.gateway)})

[Service]
Type=exec
WorkingDirectory={_systemd_escape(spec.state_dir)}
# One-time enrollment token / engine key, if any (mode 0600; delete the token once enrolled).
EnvironmentFile=-{_systemd_escape(env_file)}
ExecStart={exec_start}
# SIGTERM drains: the node leaves routing at once and finishes what is in flight.
KillSignal=SIGTERM
TimeoutStopSec=45
# Exit 3 = credential revoked: do not restart into a loop of refusals.
Restart=on-failure
RestartPreventExitStatus=3
RestartSec=5
NoNewPrivileges=yes

[Install]
WantedBy=default.target
"""


def render_env_file(secrets: dict[str, str]) -> str:
    """``KEY=value`` lines (values are pre-checked: no quoting, no expansion needed)."""
    return "".join(f"{k}={v}\n" for k, v in sorted(secrets.items()))


def render_launchd(spec: ServiceSpec, log_path: str) -> bytes:
    """The LaunchAgent plist: started at log-in, restarted unless it exited 0 (drained)."""
    plist: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": spec.argv(),
        "WorkingDirectory": spec.state_dir,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        "ExitTimeOut": 45,
        "StandardOutPath": log_path,
        "StandardErrorPath": log_path,
    }
    if spec.secrets:
        plist["EnvironmentVariables"] = dict(sorted(spec.secrets.items()))
    return plistlib.dumps(plist, sort_keys=False)


def _ps(value: str) -> str:
    """A PowerShell single-quoted literal."""
    return "'" + value.replace("'", "''") + "'"


def render_windows(spec: ServiceSpec) -> str:
    """A PowerShell script registering a log-on task for the current user (no admin rights)."""
    argv = spec.argv()
    arguments = subprocess.list2cmdline(argv[1:])  # the Windows command-line quoting the C runtime parses
    lines = [
        "# asgi-llm node agent as a Task Scheduler task of the current user, written by",
        "# `asgi-llm node install-service`. Run: powershell -ExecutionPolicy Bypass -File <this file>",
        "$ErrorActionPreference = 'Stop'",
    ]
    for key, value in sorted(spec.secrets.items()):
        lines.append(f"[Environment]::SetEnvironmentVariable({_ps(key)}, {_ps(value)}, 'User')  # first start only")
        lines.append(f"$env:{key} = {_ps(value)}")
    lines += [
        f"$action = New-ScheduledTaskAction -Execute {_ps(argv[0])} -Argument {_ps(arguments)}"
        f" -WorkingDirectory {_ps(spec.state_dir)}",
        '$trigger = New-ScheduledTaskTrigger -AtLogOn -User "$env:USERDOMAIN\\$env:USERNAME"',
        "$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit ([TimeSpan]::Zero) -RestartCount 999"
        " -RestartInterval (New-TimeSpan -Minutes 1) -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries",
        f"Register-ScheduledTask -TaskName {_ps(TASK_NAME)} -Action $action -Trigger $trigger -Settings $settings"
        " -Description 'asgi-llm node agent' -Force | Out-Null",
        f"Start-ScheduledTask -TaskName {_ps(TASK_NAME)}",
        f"Write-Output 'asgi-llm-node registered and started; stop: Stop-ScheduledTask {TASK_NAME}'",
    ]
    return "\n".join(lines) + "\n"


# --- the plan -----------------------------------------------------------------------------------


def default_flavour(platform: str = sys.platform) -> str:
    """The service manager of ``platform``: launchd on macOS, windows on Windows, else systemd."""
    if platform == "darwin":
        return "launchd"
    if platform.startswith(("win", "cygwin", "msys")):
        return "windows"
    return "systemd"


def plan_service(spec: ServiceSpec, flavour: str, home: Path) -> ServicePlan:
    """The files ``flavour`` needs for ``spec`` under ``home``, and how to enable it."""
    state = Path(spec.state_dir)
    enrolled = (state / "node.json").is_file()
    notes = []
    if not spec.secrets.get(TOKEN_ENV) and not enrolled:
        notes.append(f"not enrolled yet ({state / 'node.json'} is missing): the first start needs a one-time token "
                     f"(--token, or {TOKEN_ENV}); the service stays down until it has one")
    if flavour == "systemd":
        unit = home / ".config" / "systemd" / "user" / UNIT_NAME
        env_file = state / "service.env"
        files = [FileToWrite(unit, render_systemd(spec, str(env_file)).encode(), 0o644)]
        if spec.secrets:
            files.append(FileToWrite(env_file, render_env_file(spec.secrets).encode(), 0o600, replaceable=True))
            notes.append(f"once the node is enrolled, remove {TOKEN_ENV} from {env_file} (the token is spent)")
        commands = [
            "systemctl --user daemon-reload",
            f"systemctl --user enable --now {UNIT_NAME}",
            'loginctl enable-linger "$USER"    # keep it running while you are logged out',
            f"journalctl --user -u {UNIT_NAME} -f",
        ]
    elif flavour == "launchd":
        plist = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        log = state / "agent.log"
        files = [FileToWrite(plist, render_launchd(spec, str(log)), 0o600)]
        if spec.secrets:
            notes.append(f"once the node is enrolled, remove {TOKEN_ENV} from {plist} (the token is spent)")
        commands = [
            f'launchctl bootout "gui/$(id -u)/{LAUNCHD_LABEL}" 2>/dev/null; launchctl bootstrap "gui/$(id -u)" "{plist}"',
            f'tail -f "{log}"',
        ]
    elif flavour == "windows":
        script = state / "install-service.ps1"
        files = [FileToWrite(script, render_windows(spec).encode(), 0o600, replaceable=True)]
        commands = [f'powershell -ExecutionPolicy Bypass -File "{script}"']
        notes.append("Task Scheduler stops a task without a drain: run `asgi-llm node drain <name>` first for a clean hand-over")
        if spec.secrets:
            notes.append(f"once the node is enrolled: [Environment]::SetEnvironmentVariable('{TOKEN_ENV}', $null, 'User')")
    else:
        raise InstallError(f"--flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    return ServicePlan(flavour, files, commands, notes)


def _write(file: FileToWrite, *, force: bool) -> None:
    file.path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_TRUNC if (force or file.replaceable) else os.O_EXCL
    fd = os.open(file.path, flags, file.mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, file.mode)  # an existing file keeps its old bits otherwise
        os.write(fd, file.content)
    finally:
        os.close(fd)


def install_service(
    gateway: Annotated[str, typer.Option("--gateway", envvar="ASGI_LLM_GATEWAY", help="Gateway URL.")],
    engine: Annotated[str, typer.Option("--engine", envvar="ASGI_LLM_ENGINE", help="The engine's OpenAI base URL, e.g. http://127.0.0.1:11434/v1.")],
    token: Annotated[str | None, typer.Option("--token", envvar=TOKEN_ENV, help="One-time enrollment token for the first start (kept out of the command line).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name (default: the host name).")] = None,
    tunnel: Annotated[bool, typer.Option("--tunnel", help="Dial out over a WebSocket: no inbound port needed.")] = False,
    host: Annotated[str, typer.Option(help="Direct mode: interface the proxy binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Direct mode: proxy port.")] = 8780,
    advertise_url: Annotated[str | None, typer.Option(help="Direct mode: the URL the gateway calls.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where the node credential is kept.")] = Path.home() / ".asgi-llm-node",
    engine_key: Annotated[str | None, typer.Option(envvar=ENGINE_KEY_ENV, help="API key the engine wants, if any.", show_default=False)] = None,
    label: Annotated[list[str], typer.Option(help="key=value label (repeatable), for node selectors.")] = [],  # noqa: B006
    flavour: Annotated[str | None, typer.Option(help="systemd, launchd or windows (default: this machine's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the files and commands; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing unit / plist.")] = False,
) -> None:
    """Install the node agent as a service of the current user (systemd, launchd or a Windows task)."""
    from asgi_llm.nodes.service import NAME_RE

    try:
        if len(label) > 64:
            raise InstallError("--label: at most 64 labels")
        secrets = {}
        if token:
            secrets[TOKEN_ENV] = _secret(token, "--token")
        if engine_key:
            secrets[ENGINE_KEY_ENV] = _secret(engine_key, "--engine-key")
        if name is not None and not NAME_RE.match(name):
            raise InstallError(f"--name {name[:80]!r}: letters, digits and ._- (at most 63, starting with a letter or digit)")
        spec = ServiceSpec(
            program=program_argv(), gateway=_url(gateway, "--gateway"), engine=_url(engine, "--engine"),
            state_dir=str(Path(_text(str(state_dir), "--state-dir", 1024)).expanduser().absolute()),
            name=name, tunnel=tunnel, host=_text(host, "--host", 255), port=port,
            advertise_url=_url(advertise_url, "--advertise-url") if advertise_url else None,
            labels=tuple(_label(item) for item in label), secrets=secrets,
        )
        plan = plan_service(spec, flavour or default_flavour(), Path.home())
    except InstallError as exc:
        typer.echo(f"asgi-llm node install-service: {exc}", err=True)
        raise typer.Exit(2) from None

    if dry_run:
        shown = plan_service(spec.masked(), plan.flavour, Path.home())
        for file in shown.files:
            typer.echo(f"# --- {file.path} (mode {file.mode:o})")
            typer.echo(file.content.decode(), nl=False)
    else:
        try:
            Path(spec.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            for file in plan.files:
                _write(file, force=force)
                typer.echo(f"wrote {file.path}")
        except FileExistsError as exc:
            typer.echo(f"asgi-llm node install-service: {exc.filename} already exists; --force replaces it", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            typer.echo(f"asgi-llm node install-service: cannot write {exc.filename}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo("# then:" if not dry_run else "# after writing them:")
    for command in plan.commands:
        typer.echo(command)
    for note in plan.notes:
        typer.echo(f"# note: {note}")
