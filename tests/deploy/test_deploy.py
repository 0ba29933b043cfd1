"""deploy/: the image, compose and Kubernetes files agree with the code.

They cannot run here (no container daemon), so they are parsed and cross-checked:
the recipe they ship validates against the recipe schema with exactly the environment
they provide; ports, probe paths, the recipe path and env var names match what
``asgi-llm serve`` uses; the drain budget fits the grace periods; selectors match.
The HAProxy configs are checked by ``haproxy -c`` when it is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgi_llm.config import config_from_dict, load_config
from asgi_llm.request import _ROUTES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RECIPE = DEPLOY / "recipe.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def _uncommented(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


def required_vars(text: str) -> set[str]:
    """``${VAR}`` without a default (outside comments): what the environment must provide."""
    return {m.group(1) for m in _VAR.finditer(_uncommented(text)) if m.group(2) is None}


def all_vars(text: str) -> set[str]:
    return {m.group(1) for m in _VAR.finditer(_uncommented(text))}


def k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    stages: list[list[tuple[str, str]]] = []
    for ln in lines:
        word, _, rest = ln.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[-1]


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == name]


def entrypoint() -> list[str]:
    (ep,) = instruction("ENTRYPOINT")
    return list(yaml.safe_load(ep))  # the JSON (exec) form


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


class TestRecipe:
    def test_recipe_validates_with_the_environment_the_deployments_give(self) -> None:
        """deploy/recipe.yaml is a valid recipe with the Secret's keys (and compose's env)."""
        secret = k8s_docs()[("Secret", "asgi-llm")]["stringData"]
        env = {k: str(v) for k, v in secret.items()}
        cfg = load_config(RECIPE, environ=env)
        assert cfg.stores.state.startswith("redis://") and cfg.stores.ledger.startswith("postgresql://")
        assert cfg.usage.spill_dir == "/var/lib/asgi-llm/spill"
        assert required_vars(RECIPE.read_text()) <= env.keys()
        compose_env = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gateway"]["environment"]
        assert required_vars(RECIPE.read_text()) <= compose_env.keys()
        filled = {k: _VAR.sub("x" * 16, str(v)) for k, v in compose_env.items()}
        assert load_config(RECIPE, environ=filled).stores.state == "redis://redis:6379/0"

    def test_configmap_holds_the_same_recipe(self) -> None:
        """The ConfigMap's recipe.yaml is deploy/recipe.yaml, byte for byte."""
        cm = k8s_docs()[("ConfigMap", "asgi-llm-recipe")]
        assert cm["data"]["recipe.yaml"] == RECIPE.read_text()
        assert config_from_dict(yaml.safe_load(cm["data"]["recipe.yaml"]),
                                environ={v: "x" * 16 for v in all_vars(RECIPE.read_text())} | {
                                    "REDIS_URL": "redis://r:6379/0", "DATABASE_URL": "postgresql://u@p/db",
                                    "OPENAI_BASE_URL": "https://api.openai.com/v1", "ASGI_LLM_OTEL": "false"})

    def test_grace_periods_cover_the_drain(self) -> None:
        """SIGTERM → notice + drain + flush fits Kubernetes' and compose's grace periods, and the
        readiness probe notices the 503 within the notice."""
        cfg = load_config(RECIPE, environ={k: str(v) for k, v in k8s_docs()[("Secret", "asgi-llm")]["stringData"].items()})
        budget = cfg.server.drain_notice_s + cfg.server.drain_timeout_s + cfg.usage.shutdown_timeout_s
        pod = k8s_docs()[("Deployment", "asgi-llm")]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= budget
        probe = pod["containers"][0]["readinessProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] < cfg.server.drain_notice_s
        grace = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gateway"]["stop_grace_period"]
        assert int(grace.removesuffix("s")) >= budget


class TestImage:
    def test_slim_non_root_serve(self) -> None:
        """python slim base, a numeric non-root USER, `asgi-llm serve` on 0.0.0.0:8080, SIGTERM."""
        assert dockerfile()[0][1].startswith("python:3.11-slim")
        (user,) = instruction("USER")
        assert user.isdigit() and int(user) != 0
        ep = entrypoint()
        assert ep[:2] == ["asgi-llm", "serve"] and option(ep, "--host") == "0.0.0.0"
        assert instruction("EXPOSE") == [option(ep, "--port")]
        assert instruction("STOPSIGNAL") == ["SIGTERM"]

    def test_recipe_path_and_healthcheck(self) -> None:
        """ASGI_LLM_CONFIG (read by serve) names the copied recipe; HEALTHCHECK hits /healthz on the port."""
        from asgi_llm.cli import _CONFIG_ENV

        env = " ".join(instruction("ENV"))
        assert f"{_CONFIG_ENV}=/etc/asgi-llm/recipe.yaml" in env
        assert any(rest.endswith("/etc/asgi-llm/recipe.yaml") and "deploy/recipe.yaml" in rest for rest in instruction("COPY"))
        (hc,) = instruction("HEALTHCHECK")
        assert f"http://127.0.0.1:{option(entrypoint(), '--port')}/healthz" in hc
        assert "/healthz" in _ROUTES and "/readyz" in _ROUTES

    def test_build_context_has_what_the_image_copies(self) -> None:
        """Every COPY source (from the repository root, the compose build context) exists."""
        text = (DEPLOY / "Dockerfile").read_text()
        for line in text.splitlines():
            if line.startswith("COPY") and "--from=" not in line:
                for src in shlex.split(line)[1:-1]:
                    assert (REPO / src).exists(), src
        assert yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["gateway"]["build"] == {
            "context": "..", "dockerfile": "deploy/Dockerfile"}


class TestKubernetes:
    def test_deployment_probes_ports_and_env(self) -> None:
        """Readiness on /readyz, liveness on /healthz, the serve port, the recipe from the
        ConfigMap at $ASGI_LLM_CONFIG, secrets from the Secret, resources, non-root."""
        docs = k8s_docs()
        pod = docs[("Deployment", "asgi-llm")]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        port = int(option(entrypoint(), "--port"))
        assert c["ports"] == [{"name": "http", "containerPort": port}]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert env["ASGI_LLM_CONFIG"] == mounts["recipe"] + "/recipe.yaml"
        assert volumes["recipe"]["configMap"]["name"] == "asgi-llm-recipe"
        assert mounts["spill"] == "/var/lib/asgi-llm"  # the recipe's usage.spill_dir is under it
        assert c["envFrom"] == [{"secretRef": {"name": "asgi-llm"}}]
        service = docs[("Service", "asgi-llm")]["spec"]["ports"][0]
        assert service["targetPort"] == "http"

    def test_pdb_hpa_and_external_stores(self) -> None:
        """PDB and HPA target the Deployment's pods; Redis/PostgreSQL are ExternalName services
        that the Secret's URLs name."""
        docs = k8s_docs()
        labels = docs[("Deployment", "asgi-llm")]["spec"]["template"]["metadata"]["labels"]
        assert docs[("Deployment", "asgi-llm")]["spec"]["selector"]["matchLabels"] == labels
        assert docs[("PodDisruptionBudget", "asgi-llm")]["spec"]["selector"]["matchLabels"] == labels
        assert docs[("Service", "asgi-llm")]["spec"]["selector"] == labels
        hpa = docs[("HorizontalPodAutoscaler", "asgi-llm")]["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "asgi-llm"}
        assert hpa["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["minReplicas"] >= 2
        secret = docs[("Secret", "asgi-llm")]["stringData"]
        for name in ("redis", "postgres"):
            assert docs[("Service", name)]["spec"]["type"] == "ExternalName"
        assert "@postgres:" in secret["DATABASE_URL"] and secret["REDIS_URL"].startswith("redis://redis:")


class TestCompose:
    def test_services(self) -> None:
        """N gateway replicas + Redis + PostgreSQL + HAProxy; the recipe mounted where ASGI_LLM_CONFIG says."""
        services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
        assert set(services) == {"gateway", "lb", "redis", "postgres"}
        gw = services["gateway"]
        assert gw["deploy"]["replicas"] >= 2
        assert f"./recipe.yaml:{gw['environment']['ASGI_LLM_CONFIG']}:ro" in gw["volumes"]
        assert services["lb"]["image"].startswith("haproxy:")
        port = option(entrypoint(), "--port")
        assert f"server-template gw 10 gateway:{port}" in (DEPLOY / "haproxy.cfg").read_text()
        assert "GET /readyz" in (DEPLOY / "haproxy.cfg").read_text()


@pytest.mark.parametrize("cfg", ["deploy/haproxy.cfg", "recipes/fleet/haproxy.cfg"])
def test_haproxy_configs_are_valid(cfg: str, tmp_path: Path) -> None:
    """``haproxy -c`` accepts both configs (errorfiles in place; skipped without haproxy locally)."""
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if haproxy is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("haproxy is not installed; .ci/run installs it")
        pytest.skip("haproxy is not installed")
    text = (REPO / cfg).read_text()
    text = text.replace("/usr/local/etc/haproxy/errors", str(REPO / "recipes" / "fleet" / "errors"))
    text = text.replace("127.0.0.11:53", "127.0.0.1:53")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    env = {**os.environ, "FLEET_LB_PORT": "1", "FLEET_STATS_PORT": "2", "FLEET_ERRORS": str(REPO / "recipes" / "fleet" / "errors"),
           "FLEET_R0": "127.0.0.1:3", "FLEET_R1": "127.0.0.1:4", "FLEET_R2": "127.0.0.1:5"}
    out = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, env=env, timeout=30, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.e2e
def test_serve_reads_the_recipe_path_from_asgi_llm_config(tmp_path: Path) -> None:
    """The image sets ASGI_LLM_CONFIG and runs `asgi-llm serve` without --config: that recipe is served."""
    import json
    import sys
    import urllib.request

    from asgi_llm.testing.processes import free_port, managed_process

    recipe = tmp_path / "r.yaml"
    recipe.write_text('providers: {p: {base_url: "http://127.0.0.1:9/v1"}}\n'
                      'models: {from-env: {targets: [{provider: p, model: x}]}}\n'
                      'stores: {ledger: "sqlite:///ledger.db"}\n')
    port = free_port()
    with managed_process([sys.executable, "-m", "asgi_llm.cli", "serve", "--port", str(port), "--log-level", "warning"],
                         ready_url=f"http://127.0.0.1:{port}/healthz", env={"ASGI_LLM_CONFIG": str(recipe), "PYTHONPATH": str(REPO)},
                         cwd=tmp_path, name="serve-env"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["from-env"]
