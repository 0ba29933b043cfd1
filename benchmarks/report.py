"""Machine/commit metadata, statistics, and writing results as Markdown + JSON."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["command_line", "machine_info", "spread", "write_results"]

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _wrk_version() -> str | None:
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "wrk"


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python, wrk, and the git commit (+ dirty flag)."""
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "wrk": _wrk_version(),
        "commit": commit + ("-dirty" if dirty else ""),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    """The exact command that produced the results."""
    return "python -m benchmarks " + shlex.join(sys.argv[1:])


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_results(out: Path, stem: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``{stem}-latest.md/.json`` and timestamped copies under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "latest" if stem == "run" else f"{stem}-latest"
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    text = json.dumps(data, indent=2, default=str)
    md_path.write_text(markdown)
    json_path.write_text(text)
    (out / f"{stem}-{stamp}.md").write_text(markdown)
    (out / f"{stem}-{stamp}.json").write_text(text)
    return md_path, json_path


def header_md(title: str, machine: dict[str, Any], command: str, extra: list[str] = ()) -> str:  # type: ignore[assignment]
    lines = [f"# {title}", "",
             f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, Linux {machine['kernel']}",
             f"- python {machine['python']}; load generator: {machine.get('tool') or machine.get('wrk') or 'python'}",
             f"- commit `{machine['commit']}`, {machine['date_utc']}",
             f"- command: `{command}`", *extra, ""]
    return "\n".join(lines)
