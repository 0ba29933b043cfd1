"""``python -m benchmarks run``: rows side by side, interleaved, repeated.

All row servers are started once (each pinned to the server core) and stay up for
the whole run; idle ones cost nothing. For every repetition, mode and concurrency the
rows are measured one after the other (A B C A B C …), each after its own warm-up,
so slow drift on a noisy machine hits every row alike.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadSpec, find_wrk, run_load
from benchmarks.report import command_line, header_md, machine_info, spread, write_results
from benchmarks.servers import LOAD_CPU, SERVER_CPU, Skip, client_key, mock_upstream, row_info, split_row, start_row

__all__ = ["run_benchmark"]


def run_benchmark(*, rows: list[str], concurrency: list[int], modes: list[bool], reps: int, duration: float,
                  warmup: float, out: Path, tool: str = "auto", litellm: str | None = None,
                  ttfb_streams: int = 0, log: Any = print) -> dict[str, Any]:
    """Run the matrix; write ``latest.md``/``latest.json`` under ``out``; return the data."""
    machine = machine_info()
    machine["tool"] = "wrk" if (tool != "python" and find_wrk()) else "python-aiohttp (wrk not found)"
    data: dict[str, Any] = {
        "machine": machine, "command": command_line(),
        "settings": {"rows": rows, "concurrency": concurrency, "modes": ["stream" if m else "non-stream" for m in modes],
                     "reps": reps, "duration_s": duration, "warmup_s": warmup,
                     "pinning": f"servers on core {SERVER_CPU}; mock + load generator on core {LOAD_CPU}"},
        "rows": {}, "skipped": {}, "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="asgi-llm-bench-") as tmp, mock_upstream() as mock, \
            contextlib.ExitStack() as stack:
        servers = {}
        for row in rows:
            try:
                srv = stack.enter_context(start_row(row, mock, Path(tmp), litellm=litellm))
            except Skip as exc:
                data["skipped"][row] = str(exc)
                log(f"skip {row}: {exc}")
                continue
            servers[row] = srv
            data["rows"][row] = {"title": row_info(row).title, "what": row_info(row).what, "layers": srv.layers,
                                 "notes": srv.notes}
        samples: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for rep in range(reps):
            for stream in modes:
                mode = "stream" if stream else "non-stream"
                for c in concurrency:
                    for row, srv in servers.items():
                        spec = LoadSpec(url=srv.url, concurrency=c, duration=duration, stream=stream, auth=client_key())
                        if warmup > 0:
                            run_load(LoadSpec(**{**spec.__dict__, "duration": warmup}), cpu=LOAD_CPU, tool=tool)
                        res = run_load(spec, cpu=LOAD_CPU, tool=tool)
                        samples.setdefault((row, mode, c), []).append(res.as_dict())
                        log(f"rep {rep + 1}/{reps} {mode:10} c={c:<3} {row:12} {res.rps:9.1f} req/s  "
                            f"p50 {res.latency_us['p50'] / 1000:7.3f} ms  p99 {res.latency_us['p99'] / 1000:7.3f} ms"
                            + (f"  errors {res.errors}" if res.errors else ""))
        for (row, mode, c), runs in samples.items():
            data["results"].append({
                "row": row, "mode": mode, "concurrency": c, "reps": runs,
                "rps": spread([r["rps"] for r in runs]),
                "p50_ms": spread([r["latency_us"]["p50"] / 1000 for r in runs]),
                "p99_ms": spread([r["latency_us"]["p99"] / 1000 for r in runs]),
                "errors": sum(r["errors"] for r in runs), "requests": sum(r["requests"] for r in runs),
            })
    if ttfb_streams and any(m for m in modes):
        from benchmarks.streaming import measure_streaming

        ttfb_rows = [r for r in ("passthrough", "dispatch", "full") if r in rows]
        if "passthrough" in ttfb_rows and len(ttfb_rows) > 1:
            log(f"streaming TTFB probe: {ttfb_streams} streams per row …")
            data["streaming"] = measure_streaming(ttfb_rows, streams=ttfb_streams, warmup=max(5, ttfb_streams // 10))
    data["ratios"] = _ratios(data)
    data["before_after"] = _before_after(data)
    md = render_markdown(data)
    md_path, _ = write_results(out, "run", md, data)
    log(f"\nwrote {md_path} and {md_path.with_suffix('.json')}")
    return data


def _get(data: dict[str, Any], row: str, mode: str, c: int) -> dict[str, Any] | None:
    return next((r for r in data["results"] if r["row"] == row and r["mode"] == mode and r["concurrency"] == c), None)


def _ratios(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Target ratios per (mode, concurrency), all from this one run."""
    out = []
    for mode in data["settings"]["modes"]:
        for c in data["settings"]["concurrency"]:
            full, base = _get(data, "full", mode, c), _get(data, "passthrough", mode, c)
            lite, direct = _get(data, "litellm", mode, c), _get(data, "direct", mode, c)
            item: dict[str, Any] = {"mode": mode, "concurrency": c}
            if full and base:
                item["full_over_passthrough_rps"] = full["rps"]["median"] / base["rps"]["median"]
                item["full_minus_passthrough_p50_ms"] = full["p50_ms"]["median"] - base["p50_ms"]["median"]
            if full and lite:
                item["full_over_litellm_rps"] = full["rps"]["median"] / lite["rps"]["median"]
            if direct:
                best = max((r["rps"]["median"] for r in data["results"]
                            if r["mode"] == mode and r["concurrency"] == c and r["row"] != "direct"), default=0.0)
                item["mock_headroom"] = direct["rps"]["median"] / best if best else None
            out.append(item)
    return out


def _before_after(data: dict[str, Any]) -> list[dict[str, Any]]:
    """For every ``<row>@<ref>`` baseline row: this tree's row against it, per cell."""
    out = []
    for baseline in [r for r in data["rows"] if "@" in r]:
        row = split_row(baseline)[0]
        for mode in data["settings"]["modes"]:
            for c in data["settings"]["concurrency"]:
                now, then = _get(data, row, mode, c), _get(data, baseline, mode, c)
                if now and then:
                    out.append({"row": row, "baseline": baseline, "mode": mode, "concurrency": c,
                                "rps_now_over_then": now["rps"]["median"] / then["rps"]["median"],
                                "p50_ms_now": now["p50_ms"]["median"], "p50_ms_then": then["p50_ms"]["median"]})
    return out


def _fmt_spread(s: dict[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def render_markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    md = [header_md("asgi-llm benchmark", data["machine"], data["command"], [
        f"- {s['reps']} rep(s) × {s['duration_s']:g} s per cell after a {s['warmup_s']:g} s warm-up; rows interleaved per rep",
        f"- pinning: {s['pinning']}",
        "- cells: median (min–max) over reps; latency is per request (whole response, streams included)",
    ])]
    md.append("## Rows\n")
    md.append("| row | what | layers present |\n|---|---|---|")
    for row, info in data["rows"].items():
        notes = ("; " + "; ".join(info["notes"])) if info["notes"] else ""
        md.append(f"| {row} | {info['what']} | {' → '.join(info['layers'])}{notes} |")
    for row, why in data["skipped"].items():
        md.append(f"| {row} | {row_info(row).what} | **skipped**: {why} |")
    md.append("")
    for mode in s["modes"]:
        md.append(f"## Throughput and latency — {mode}\n")
        md.append("| row | c | requests/s | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|---:|")
        for c in s["concurrency"]:
            for row in data["rows"]:
                r = _get(data, row, mode, c)
                if r:
                    md.append(f"| {row} | {c} | {_fmt_spread(r['rps'], 0)} | {_fmt_spread(r['p50_ms'], 3)} | "
                              f"{r['p99_ms']['median']:.3f} | {r['errors']} |")
        md.append("")
    md.append("## Target ratios (same run)\n")
    md.append("| mode | c | full / passthrough rps (target ≥ 0.60) | full − passthrough p50 ms (target ≤ 0.3 at c=1) "
              "| full / LiteLLM rps (target ≥ 5) | mock headroom (direct / fastest row) |")
    md.append("|---|---:|---:|---:|---:|---:|")

    def f(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "—"

    for r in data["ratios"]:
        md.append(f"| {r['mode']} | {r['concurrency']} | {f(r.get('full_over_passthrough_rps'), '.2f')} | "
                  f"{f(r.get('full_minus_passthrough_p50_ms'), '+.3f')} | {f(r.get('full_over_litellm_rps'), '.1f')} | "
                  f"{f(r.get('mock_headroom'), '.2f')}× |")
    bound = [r for r in data["ratios"] if isinstance(r.get("mock_headroom"), float) and r["mock_headroom"] < 1.15]
    if bound:
        md.append("\n**Mock-bound cells** (the mock alone is < 1.15× the fastest row, so that row may be limited by the "
                  "mock + load generator core rather than by itself): "
                  + ", ".join(f"{r['mode']} c={r['concurrency']}" for r in bound) + ".")
    if data.get("before_after"):
        md.append("\n## Before / after (same run)\n")
        md.append("| row | against | mode | c | requests/s now ÷ then | p50 ms then → now |\n|---|---|---|---:|---:|---:|")
        for r in data["before_after"]:
            md.append(f"| {r['row']} | {r['baseline']} | {r['mode']} | {r['concurrency']} | {r['rps_now_over_then']:.2f}× | "
                      f"{r['p50_ms_then']:.3f} → {r['p50_ms_now']:.3f} |")
    if "streaming" in data:
        from benchmarks.streaming import streaming_markdown

        md.append("\n## Streaming: time to first byte and inter-chunk gap (target: TTFB overhead ≤ 1 ms)\n")
        md.append(streaming_markdown(data["streaming"]))
    return "\n".join(md) + "\n"
