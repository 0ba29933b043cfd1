"""``python -m benchmarks memory``: RSS of a gateway row over a long run, and
``python -m benchmarks growth``: how throughput changes with prompt size and with the
number of models / targets / keys in the recipe and of enrolled nodes.

Memory: the row runs (pinned) under wrk in back-to-back slices until the stated time
or request count is reached, while a sampler reads ``VmRSS`` from
``/proc/PID/status`` every second. "After warm-up" is the RSS once the first 10 % of the
run (at least 5 s) is over; the verdict compares it with the RSS at the end.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.servers import LOAD_CPU, client_key, mock_upstream, start_row

__all__ = ["measure_growth", "measure_memory"]


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_memory(*, row: str = "full", seconds: float = 120, requests: int | None = None, concurrency: int = 64,
                   stream: bool = False, tool: str = "auto", slice_s: float = 10, log: Any = print) -> dict[str, Any]:
    """Drive ``row`` for ``seconds`` (or until ``requests``), sampling its RSS each second."""
    samples: list[tuple[float, int]] = []
    served = 0
    errors = 0
    with tempfile.TemporaryDirectory(prefix="asgi-llm-bench-") as tmp, mock_upstream() as mock, \
            start_row(row, mock, Path(tmp)) as srv:
        assert srv.pid is not None
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                rss = _rss_kib(srv.pid)  # type: ignore[arg-type]
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start_rss = _rss_kib(srv.pid)
        try:
            while True:
                elapsed = time.monotonic() - t0
                if requests is not None and served >= requests:
                    break
                if requests is None and elapsed >= seconds:
                    break
                left = slice_s if requests is not None else min(slice_s, seconds - elapsed)
                res = run_load(LoadSpec(url=srv.url, concurrency=concurrency, duration=max(1.0, left), stream=stream,
                                        auth=client_key()), cpu=LOAD_CPU, tool=tool)
                served += res.requests
                errors += res.errors
                log(f"  t={time.monotonic() - t0:6.1f}s  served {served:>9}  rps {res.rps:8.0f}  "
                    f"rss {(_rss_kib(srv.pid) or 0) / 1024:7.1f} MiB")
        finally:
            stop.set()
            sampler.join()
        layers = srv.layers
    total = samples[-1][0] if samples else 0.0
    warm_t = max(5.0, total * 0.10)
    after_warm = next((rss for t, rss in samples if t >= warm_t), samples[0][1] if samples else 0)
    tail = [rss for t, rss in samples if t >= total - 3] or [samples[-1][1]]
    end = statistics.median(tail)
    return {
        "row": row, "layers": layers, "mode": "stream" if stream else "non-stream", "concurrency": concurrency,
        "seconds": total, "requests": served, "errors": errors,
        "rss_start_mib": (start_rss or 0) / 1024, "rss_after_warmup_mib": after_warm / 1024,
        "rss_end_mib": end / 1024, "rss_max_mib": max(r for _, r in samples) / 1024 if samples else 0,
        "change_pct": (end - after_warm) / after_warm * 100 if after_warm else 0.0,
        "warmup_s": warm_t, "samples": [(round(t, 1), rss) for t, rss in samples],
    }


def memory_markdown(res: dict[str, Any]) -> str:
    verdict = "flat (within ±10 %)" if abs(res["change_pct"]) <= 10 else "**grows** (beyond ±10 %)"
    return "\n".join([
        f"Row `{res['row']}` ({' → '.join(res['layers'])}), {res['mode']}, c={res['concurrency']}: "
        f"{res['requests']:,} requests in {res['seconds']:.0f} s ({res['errors']} errors).", "",
        "| RSS at start MiB | after warm-up ({:.0f} s) MiB | at end MiB | max MiB | change after warm-up |".format(res["warmup_s"]),
        "|---:|---:|---:|---:|---:|",
        f"| {res['rss_start_mib']:.1f} | {res['rss_after_warmup_mib']:.1f} | {res['rss_end_mib']:.1f} | "
        f"{res['rss_max_mib']:.1f} | {res['change_pct']:+.1f} % — {verdict} |", ""])


GROWTH_CASES: dict[str, dict[str, int]] = {
    "1 model × 2 targets": {},
    "10 models × 2 targets": {"models": 10},
    "100 models × 2 targets": {"models": 100},
    "1 model × 10 targets": {"targets": 10},
    "1 model × 100 targets": {"targets": 100},
    "1000 keys": {"keys": 1000},
    # The model served only by N enrolled, online nodes (least-busy), all at the mock:
    # what resolving, choosing and pooling per node costs as a fleet grows.
    "1 model × 1 node": {"nodes": 1},
    "1 model × 10 nodes": {"nodes": 10},
    "1 model × 100 nodes": {"nodes": 100},
}
"""Recipe variants of the growth benchmark: label → :func:`~benchmarks.servers.full_recipe` arguments."""


def measure_growth(*, row: str = "full", concurrency: int = 16, duration: float = 5, warmup: float = 1,
                   reps: int = 1, tool: str = "auto", cases: Sequence[str] | None = None,
                   prompt_sizes: Sequence[int] = (100, 10_000, 100_000), log: Any = print) -> dict[str, Any]:
    """requests/s of ``row`` vs prompt size, and vs number of models / targets / keys / nodes.

    ``cases`` picks labels of :data:`GROWTH_CASES` (default all); ``prompt_sizes=()``
    skips the prompt part — both only to keep smoke runs short.
    """
    out: dict[str, Any] = {"row": row, "concurrency": concurrency, "duration_s": duration, "prompt": [], "recipe": []}
    with tempfile.TemporaryDirectory(prefix="asgi-llm-bench-") as tmp, mock_upstream() as mock:

        def measure(srv: Any, prompt_bytes: int = 0) -> dict[str, Any]:
            spec = LoadSpec(url=srv.url, concurrency=concurrency, duration=duration, auth=client_key(),
                            prompt_bytes=prompt_bytes)
            if warmup:
                run_load(LoadSpec(**{**spec.__dict__, "duration": warmup}), cpu=LOAD_CPU, tool=tool)
            runs = [run_load(spec, cpu=LOAD_CPU, tool=tool) for _ in range(reps)]
            return {"rps": statistics.median(r.rps for r in runs),
                    "p50_ms": statistics.median(r.latency_us["p50"] for r in runs) / 1000,
                    "errors": sum(r.errors for r in runs)}

        for base_row in ("passthrough", row) if prompt_sizes else ():
            with start_row(base_row, mock, Path(tmp)) as srv:
                for size in prompt_sizes:
                    m = measure(srv, size)
                    out["prompt"].append({"row": base_row, "prompt_bytes": size, **m})
                    log(f"  {base_row:12} prompt {size:>7} B  {m['rps']:8.0f} req/s  p50 {m['p50_ms']:.3f} ms")
        for label in cases or GROWTH_CASES:
            with start_row(row, mock, Path(tmp), recipe_kwargs=GROWTH_CASES[label]) as srv:
                m = measure(srv)
                entry = {"recipe": label, "layers": srv.layers, **m}
                if srv.fleet is not None:
                    entry["nodes"] = {"count": len(srv.fleet.credentials), "how": srv.fleet.describe(),
                                      "heartbeats": srv.fleet.heartbeats, "heartbeat_failures": srv.fleet.failures}
                out["recipe"].append(entry)
                log(f"  {row:12} {label:24} {m['rps']:8.0f} req/s  p50 {m['p50_ms']:.3f} ms")
    return out


def growth_markdown(res: dict[str, Any]) -> str:
    lines = [f"c={res['concurrency']}, {res['duration_s']:g} s per cell, non-stream.", ""]
    if res["prompt"]:
        lines += ["| row | prompt bytes | requests/s | p50 ms | errors |", "|---|---:|---:|---:|---:|"]
        for r in res["prompt"]:
            lines.append(f"| {r['row']} | {r['prompt_bytes']:,} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['errors']} |")
        lines.append("")
    lines += [f"| {res['row']} recipe | requests/s | p50 ms | errors |", "|---|---:|---:|---:|"]
    for r in res["recipe"]:
        lines.append(f"| {r['recipe']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | {r['errors']} |")
    fleets = [r for r in res["recipe"] if "nodes" in r]
    if fleets:
        lines += ["", f"Node rows: the model is served only by `{{nodes: any}}` (least-busy); "
                      f"{fleets[-1]['nodes']['how']}. Heartbeats sent (failed) per row: "
                  + ", ".join(f"{r['recipe']} {r['nodes']['heartbeats']} ({r['nodes']['heartbeat_failures']})"
                              for r in fleets) + "."]
    return "\n".join(lines) + "\n"

