"""`asgi-llm node install-service`: each flavour rendered and read back the way its service
manager reads it (systemd unit → configparser + systemd's quoting, plist → plistlib), the
files written for the current user with the right modes, and hostile options refused."""

from __future__ import annotations

import configparser
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from typer.testing import CliRunner

from asgi_llm.cli import app
from asgi_llm.nodes.install import (
    LAUNCHD_LABEL,
    TOKEN_ENV,
    UNIT_NAME,
    ServiceSpec,
    default_flavour,
    plan_service,
    program_argv,
    render_launchd,
    render_systemd,
    render_windows,
)
from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, free_port, gateway_process, managed_process

TOKEN = "ent-llm-Abc_123-xyz"
# Every character systemd, a shell or PowerShell treats specially, in values that reach a command line.
NASTY = "50% off $HOME \"q\" 'a' back\\slash; tab\tend"


def _spec(tmp_path: Path, **kw: object) -> ServiceSpec:
    base: dict[str, object] = dict(
        program=("/opt/my venv/bin/asgi-llm",), gateway="https://gw.example.com", engine="http://127.0.0.1:11434/v1",
        state_dir=str(tmp_path / "state dir"), name="gpu-1", tunnel=True, labels=(("site", "lab"), ("note", NASTY)),
        secrets={TOKEN_ENV: TOKEN},
    )
    base.update(kw)
    return ServiceSpec(**base)  # type: ignore[arg-type]


def _read_unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",), comment_prefixes=("#",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    return unit


def _systemd_unescape(value: str) -> str:
    return value.replace("%%", "%").replace("$$", "$")


def _exec_start_argv(value: str) -> list[str]:
    """ExecStart split as systemd does for our output: double quotes with \\ and \\" escapes, then %% and $$."""
    return [_systemd_unescape(word) for word in shlex.split(value, posix=True)]


class TestSystemd:
    def test_unit_round_trips_the_command_line(self, tmp_path: Path) -> None:
        """ExecStart parses back to exactly the agent's argv (spaces, %, $, quotes, backslashes intact)."""
        spec = _spec(tmp_path)
        unit = _read_unit(render_systemd(spec, f"{spec.state_dir}/service.env"))
        assert unit.sections() == ["Unit", "Service", "Install"]
        svc = unit["Service"]
        argv = _exec_start_argv(svc["ExecStart"])
        assert argv == spec.argv()
        assert argv[:3] == ["/opt/my venv/bin/asgi-llm", "node", "join"]
        assert argv[argv.index("--gateway") + 1] == "https://gw.example.com"
        assert argv[argv.index("--engine") + 1] == "http://127.0.0.1:11434/v1"
        assert argv[argv.index("--state-dir") + 1] == str(tmp_path / "state dir")
        assert f"note={NASTY}" in argv and "--tunnel" in argv
        assert _systemd_unescape(svc["WorkingDirectory"]) == str(tmp_path / "state dir")
        assert _systemd_unescape(svc["EnvironmentFile"]) == f"-{tmp_path / 'state dir'}/service.env"
        assert svc["RestartPreventExitStatus"] == "3" and svc["KillSignal"] == "SIGTERM"
        assert unit["Install"]["WantedBy"] == "default.target"  # a user unit: no multi-user.target
        assert TOKEN not in render_systemd(spec, "/x")  # the secret is in the env file, never the unit

    def test_direct_mode_arguments(self, tmp_path: Path) -> None:
        """Without --tunnel the unit carries --host/--port/--advertise-url."""
        spec = _spec(tmp_path, tunnel=False, host="0.0.0.0", port=9000, advertise_url="http://box.lan:9000/v1")
        argv = _exec_start_argv(_read_unit(render_systemd(spec, "/x"))["Service"]["ExecStart"])
        assert "--tunnel" not in argv
        assert argv[argv.index("--host") + 1 :][:5] == ["0.0.0.0", "--port", "9000", "--advertise-url", "http://box.lan:9000/v1"]

    def test_systemd_accepts_the_unit(self, tmp_path: Path) -> None:
        """systemd-analyze verify finds no error in a rendered unit with hostile values."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            pytest.skip("systemd-analyze is not installed (the configparser round trip above still runs)")
        spec = _spec(tmp_path, program=(sys.executable, "-m", "asgi_llm.cli"))
        Path(spec.state_dir).mkdir()
        path = tmp_path / UNIT_NAME
        path.write_text(render_systemd(spec, f"{spec.state_dir}/service.env"))
        res = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "asgi-llm-node.service:" not in res.stderr, res.stderr

    def test_plan_writes_unit_and_secret_file(self, tmp_path: Path) -> None:
        """The unit goes to ~/.config/systemd/user (0644); the token to <state>/service.env (0600)."""
        spec = _spec(tmp_path)
        plan = plan_service(spec, "systemd", tmp_path / "home")
        unit, env = plan.files
        assert unit.path == tmp_path / "home" / ".config" / "systemd" / "user" / UNIT_NAME and unit.mode == 0o644
        assert env.path == Path(spec.state_dir) / "service.env" and env.mode == 0o600
        assert env.content.decode() == f"{TOKEN_ENV}={TOKEN}\n"
        assert "systemctl --user enable --now asgi-llm-node.service" in plan.commands


class TestLaunchd:
    def test_plist_round_trips(self, tmp_path: Path) -> None:
        """plistlib reads back the argv, the token in EnvironmentVariables and the log path; written 0600."""
        spec = _spec(tmp_path)
        log = f"{spec.state_dir}/agent.log"
        plist = plistlib.loads(render_launchd(spec, log))
        assert plist["Label"] == LAUNCHD_LABEL
        assert plist["ProgramArguments"] == spec.argv()
        assert plist["EnvironmentVariables"] == {TOKEN_ENV: TOKEN}
        assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
        assert plist["WorkingDirectory"] == spec.state_dir
        assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
        plan = plan_service(spec, "launchd", tmp_path / "home")
        (only,) = plan.files
        assert only.path == tmp_path / "home" / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        assert only.mode == 0o600
        assert any("launchctl bootstrap" in c for c in plan.commands)

    def test_no_secret_no_environment(self, tmp_path: Path) -> None:
        """Without a token the plist has no EnvironmentVariables, and the plan says a token is needed."""
        spec = _spec(tmp_path, secrets={})
        assert "EnvironmentVariables" not in plistlib.loads(render_launchd(spec, "/x.log"))
        assert any("not enrolled yet" in n for n in plan_service(spec, "launchd", tmp_path).notes)


def _ps_literals(line: str) -> list[str]:
    """The single-quoted PowerShell literals of ``line``, unescaped ('' → ')."""
    out, i = [], 0
    while (start := line.find("'", i)) != -1:
        j, buf = start + 1, []
        while True:
            if line[j] == "'" and line[j + 1 : j + 2] == "'":
                buf.append("'")
                j += 2
            elif line[j] == "'":
                break
            else:
                buf.append(line[j])
                j += 1
        out.append("".join(buf))
        i = j + 1
    return out


class TestWindows:
    def test_script_registers_a_logon_task_with_the_argv(self, tmp_path: Path) -> None:
        """-Execute is the program; -Argument is the Windows command line of the rest (list2cmdline)."""
        spec = _spec(tmp_path, program=(r"C:\Users\Jo O'Neil\pipx\venvs\asgi-llm\Scripts\asgi-llm.exe",),
                     state_dir=r"C:\Users\Jo O'Neil\.asgi-llm-node")
        script = render_windows(spec)
        (action,) = [line for line in script.splitlines() if line.startswith("$action = ")]
        execute, arguments, workdir = _ps_literals(action)
        assert execute == spec.program[0]
        assert arguments == subprocess.list2cmdline(spec.argv()[1:])
        assert f'--state-dir "{spec.state_dir}"' in arguments
        assert workdir == spec.state_dir
        assert 'New-ScheduledTaskTrigger -AtLogOn -User "$env:USERDOMAIN\\$env:USERNAME"' in script
        assert "Register-ScheduledTask -TaskName 'asgi-llm-node'" in script
        assert f"[Environment]::SetEnvironmentVariable('{TOKEN_ENV}', '{TOKEN}', 'User')" in script
        assert TOKEN not in arguments

    def test_default_flavour_per_platform(self) -> None:
        """linux → systemd, darwin → launchd, win32 → windows."""
        assert [default_flavour(p) for p in ("linux", "darwin", "win32")] == ["systemd", "launchd", "windows"]


class TestProgram:
    def test_the_running_interpreters_asgi_llm(self) -> None:
        """The service runs this install: the asgi-llm next to sys.executable, else python -m asgi_llm.cli."""
        argv = program_argv()
        assert Path(argv[0]).is_absolute() and Path(argv[0]).exists()
        if len(argv) == 1:
            assert Path(argv[0]).name == "asgi-llm" and Path(argv[0]).parent in (
                Path(sys.executable).parent, Path(sys.executable).absolute().parent)
        else:
            assert argv == (str(Path(sys.executable).absolute()), "-m", "asgi_llm.cli")


class TestCommand:
    @pytest.fixture
    def home(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        home = tmp_path / "home"
        home.mkdir()
        monkeypatch.setenv("HOME", str(home))
        for var in ("ASGI_LLM_GATEWAY", "ASGI_LLM_ENGINE", TOKEN_ENV, "ASGI_LLM_ENGINE_KEY"):
            monkeypatch.delenv(var, raising=False)
        return home

    def _args(self, home: Path, *extra: str) -> list[str]:
        return ["node", "install-service", "--gateway", "https://gw.example.com", "--engine", "http://127.0.0.1:8000/v1",
                "--state-dir", str(home / "state"), "--tunnel", "--flavour", "systemd", *extra]

    def test_dry_run_writes_nothing_and_masks_the_token(self, home: Path) -> None:
        """--dry-run prints the unit and commands, masks the token, and leaves the disk untouched."""
        res = CliRunner().invoke(app, self._args(home, "--token", TOKEN, "--dry-run"))
        assert res.exit_code == 0, res.output
        assert "ExecStart=" in res.output and "systemctl --user enable --now" in res.output
        assert TOKEN not in res.output and f"{TOKEN_ENV}=***" in res.output
        assert list(home.iterdir()) == []

    def test_writes_for_the_current_user(self, home: Path) -> None:
        """The unit lands under $HOME (0644, no token); the token in the state dir's env file (0600); the state dir is 0700."""
        res = CliRunner().invoke(app, self._args(home, "--token", TOKEN, "--name", "gpu-1"))
        assert res.exit_code == 0, res.output
        unit_path = home / ".config" / "systemd" / "user" / UNIT_NAME
        env_path = home / "state" / "service.env"
        assert stat.S_IMODE(unit_path.stat().st_mode) == 0o644
        assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "state").stat().st_mode) == 0o700
        assert env_path.read_text() == f"{TOKEN_ENV}={TOKEN}\n"
        text = unit_path.read_text()
        assert TOKEN not in text
        argv = _exec_start_argv(_read_unit(text)["Service"]["ExecStart"])
        assert argv[: len(program_argv())] == list(program_argv())
        assert argv[argv.index("--state-dir") + 1] == str(home / "state")
        assert TOKEN not in res.output

    def test_existing_unit_needs_force(self, home: Path) -> None:
        """A second run refuses to replace the unit (exit 1, file unchanged) unless --force."""
        assert CliRunner().invoke(app, self._args(home)).exit_code == 0
        unit_path = home / ".config" / "systemd" / "user" / UNIT_NAME
        unit_path.write_text("# my edits\n")
        again = CliRunner().invoke(app, self._args(home))
        assert again.exit_code == 1 and "--force" in again.output
        assert unit_path.read_text() == "# my edits\n"
        forced = CliRunner().invoke(app, self._args(home, "--force"))
        assert forced.exit_code == 0, forced.output
        assert "ExecStart=" in unit_path.read_text()

    @pytest.mark.parametrize(("option", "value", "message"), [
        ("--gateway", "https://admin:hunter2@gw.example.com", "no credentials"),
        ("--gateway", "ftp://gw.example.com", "http:// or https://"),
        ("--engine", "http://127.0.0.1:8000/v1\nExecStartPre=/bin/rm", "printable"),
        ("--label", "site=lab\n[Service]", "printable"),
        ("--label", "novalue", "key=value"),
        ("--name", "../../etc", "--name"),
        ("--token", "ent-llm-x\nExecStart=/bin/sh", "--token"),
        ("--token", "has space", "--token"),
        ("--state-dir", "/tmp/x\ny", "printable"),
    ])
    def test_hostile_options_are_refused(self, home: Path, option: str, value: str, message: str) -> None:
        """Values that could inject directives or leak credentials exit 2 with a message; nothing is written."""
        args = self._args(home)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        assert message in res.output
        assert "hunter2" not in res.output
        assert not (home / ".config").exists() and not (home / "state").exists()

    def test_no_token_and_not_enrolled_says_so(self, home: Path) -> None:
        """Without a token and without a saved credential, the output says the first start needs one."""
        res = CliRunner().invoke(app, self._args(home, "--dry-run"))
        assert res.exit_code == 0 and "not enrolled yet" in res.output
        (home / "state").mkdir()
        (home / "state" / "node.json").write_text("{}")
        res = CliRunner().invoke(app, self._args(home, "--dry-run"))
        assert res.exit_code == 0 and "not enrolled yet" not in res.output


def test_secret_file_mode_is_reset_on_rewrite(tmp_path: Path) -> None:
    """A pre-existing, world-readable service.env gets 0600 when the token is written into it."""
    home = tmp_path / "home"
    state = home / "state"
    state.mkdir(parents=True)
    env_file = state / "service.env"
    env_file.write_text("OLD=1\n")
    env_file.chmod(0o644)
    res = CliRunner().invoke(app, ["node", "install-service", "--gateway", "https://gw", "--engine", "http://e/v1",
                                   "--state-dir", str(state), "--flavour", "systemd", "--token", TOKEN],
                             env={"HOME": str(home)})
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text() == f"{TOKEN_ENV}={TOKEN}\n"


ADMIN = "sk-admin-install-0123456789"
TEAM_KEY = "sk-team-install"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeUpstreamHandle]]:
    """A gateway routing "chat" to any node, and a fake engine for the node to serve."""
    tmp = tmp_path_factory.mktemp("install-gw")
    with fake_upstream("node-engine", models=["tiny-chat"]) as engine:
        recipe = tmp / "recipe.yaml"
        recipe.write_text(f"""\
models:
  chat: {{targets: [{{nodes: any, model: tiny-chat}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "install-test-pepper-0123456789"
  keys: [{{key: "{TEAM_KEY}", org: team-a}}]
stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 3, allowed_networks: ["127.0.0.1/32"]}}
""")
        with gateway_process(recipe, name="install-gateway") as gw:
            yield gw.url, engine


@pytest.mark.e2e
class TestRenderedServiceRuns:
    """The command line a service manager would run, taken from the rendered file, enrolls a real
    agent with a real gateway; restarted without the token it comes back on its saved credential."""

    def _token(self, gateway: str) -> str:
        resp = httpx2.post(gateway + "/admin/enrollment-tokens", json={"org": "team-a", "ttl_s": 60},
                           headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["token"])

    def _chat_route(self, gateway: str) -> str:
        with openai.OpenAI(base_url=gateway + "/v1", api_key=TEAM_KEY, max_retries=0, timeout=20) as c:
            raw = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
            assert "Hello from node-engine" in (raw.parse().choices[0].message.content or "")
            return str(raw.headers["x-asgi-llm-route"])

    @pytest.mark.parametrize("flavour", ["systemd", "launchd"])
    def test_enrolls_then_restarts_without_token(self, gateway: tuple[str, FakeUpstreamHandle], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
        """Unit ExecStart + EnvironmentFile (systemd) / ProgramArguments + EnvironmentVariables (launchd) → a node that serves."""
        url, engine = gateway
        home, port = tmp_path / "home", free_port()
        monkeypatch.setenv("HOME", str(home))
        name = f"svc-{flavour}"
        res = CliRunner().invoke(app, [
            "node", "install-service", "--gateway", url, "--engine", engine.base_url, "--token", self._token(url),
            "--name", name, "--port", str(port), "--state-dir", str(tmp_path / "state dir"), "--flavour", flavour])
        assert res.exit_code == 0, res.output
        if flavour == "systemd":
            unit = _read_unit((home / ".config" / "systemd" / "user" / UNIT_NAME).read_text())["Service"]
            argv = _exec_start_argv(unit["ExecStart"])
            env_file = Path(_systemd_unescape(unit["EnvironmentFile"]).removeprefix("-"))
            env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        else:
            plist = plistlib.loads((home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist").read_bytes())
            argv, env = plist["ProgramArguments"], plist["EnvironmentVariables"]
        assert set(env) == {TOKEN_ENV}
        ready = f"http://127.0.0.1:{port}/healthz"
        with managed_process(argv, ready_url=ready, env=env, name=f"agent-{flavour}", timeout=30):
            assert self._chat_route(url) == f"node:{name}@team-a/tiny-chat"
        # The token is spent: the service restarts on the credential saved in its state dir.
        assert (tmp_path / "state dir" / "node.json").is_file()
        with managed_process(argv, ready_url=ready, env={TOKEN_ENV: ""}, name=f"agent-{flavour}-2", timeout=30):
            assert self._chat_route(url) == f"node:{name}@team-a/tiny-chat"
