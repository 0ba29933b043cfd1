"""``python -m benchmarks``: run | layers | streaming | memory | growth (see README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import command_line, header_md, machine_info, write_results
from benchmarks.servers import BASELINE_ROWS, ROWS, find_litellm, row_info

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _rows(text: str) -> list[str]:
    rows = [x.strip() for x in text.split(",") if x.strip()]
    unknown = []
    for r in rows:
        try:
            row_info(r)
        except KeyError:
            unknown.append(r)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown row(s) {unknown}; rows are {', '.join(ROWS)}, and {'/'.join(BASELINE_ROWS)}@<git ref> "
            "for the same row from an earlier commit")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default benchmarks/results)")
        p.add_argument("--quick", action="store_true", help="short smoke settings")

    def load_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto",
                       help="load generator: wrk if installed (auto), or the aiohttp fallback")

    run = sub.add_parser("run", help="rows side by side: requests/s and latency, non-stream and stream")
    common(run)
    load_opts(run)
    run.add_argument("--duration", type=float, default=None, help="seconds per measured cell (default 5; quick 2)")
    run.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each cell (default 1)")
    run.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    run.add_argument("--concurrency", type=_ints, default=None, help="comma list (default 1,16,64; quick 1,16)")
    run.add_argument("--rows", type=_rows, default=["direct", "passthrough", "dispatch", "full", "full-shared", "litellm"],
                     help=f"comma list of {', '.join(ROWS)}; add e.g. full@<git ref> for a before/after row")
    run.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="also measure streaming (default on)")
    run.add_argument("--ttfb-streams", type=int, default=None,
                     help="streams per row for the TTFB probe after the matrix (default 200; quick 0 = off)")
    run.add_argument("--litellm", default=None, help="path of the litellm binary (or $LITELLM_BIN)")

    layers = sub.add_parser("layers", help="in-process per-layer cost (no network)")
    common(layers)
    layers.add_argument("--requests", type=int, default=None, help="requests per stack per rep (default 20000)")
    layers.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")

    layer_cost = sub.add_parser("layer-cost", help="CPU per request of each optional layer of the full pipeline")
    common(layer_cost)
    layer_cost.add_argument("--requests", type=int, default=None, help="requests per variant per rep (default 1000)")
    layer_cost.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")

    streaming = sub.add_parser("streaming", help="TTFB and inter-chunk gap: passthrough vs asgi-llm")
    common(streaming)
    streaming.add_argument("--streams", type=int, default=None, help="streams per row (default 300)")
    streaming.add_argument("--chunk-delay", type=float, default=0.005, help="mock's sleep between events, s")
    streaming.add_argument("--rows", type=_rows, default=["passthrough", "dispatch", "full"])
    streaming.add_argument("--litellm", default=None)

    memory = sub.add_parser("memory", help="RSS over a long run")
    common(memory)
    load_opts(memory)
    memory.add_argument("--row", default="full", choices=[r for r in ROWS if r not in ("direct", "full-shared")])
    group = memory.add_mutually_exclusive_group()
    group.add_argument("--seconds", type=float, default=None, help="run time (default 120; quick 10)")
    group.add_argument("--requests", type=int, default=None, help="run until this many requests were served")
    memory.add_argument("--concurrency", type=int, default=64)
    memory.add_argument("--stream", action="store_true")

    growth = sub.add_parser("growth", help="requests/s vs prompt size and recipe size (models/targets/keys)")
    common(growth)
    load_opts(growth)
    growth.add_argument("--duration", type=float, default=None, help="seconds per cell (default 5; quick 1)")
    growth.add_argument("--concurrency", type=int, default=16)

    args = parser.parse_args(argv)
    q = args.quick
    if args.cmd == "run":
        from benchmarks.harness import run_benchmark

        run_benchmark(
            rows=args.rows,
            concurrency=args.concurrency or ([1, 16] if q else [1, 16, 64]),
            modes=[False, True] if args.stream else [False],
            reps=args.reps or (1 if q else 3),
            duration=args.duration or (2 if q else 5),
            warmup=args.warmup if args.warmup is not None else 1,
            out=args.out, tool=args.tool, litellm=find_litellm(args.litellm),
            ttfb_streams=args.ttfb_streams if args.ttfb_streams is not None else (0 if q else 200),
        )
        return 0
    machine = machine_info()
    if args.cmd == "layers":
        from benchmarks.layers import layers_markdown, measure_layers

        res = measure_layers(requests=args.requests or (2000 if q else 20000), reps=args.reps or (1 if q else 5))
        md = header_md("asgi-llm per-layer cost", machine, command_line()) + "\n" + layers_markdown(res)
    elif args.cmd == "layer-cost":
        from benchmarks.layer_cost import layer_cost_markdown, measure_layer_cost

        res = measure_layer_cost(requests=args.requests or (100 if q else 1000), reps=args.reps or (1 if q else 3))
        md = header_md("asgi-llm: cost of each layer of the full pipeline", machine, command_line()) + "\n" + layer_cost_markdown(res)
    elif args.cmd == "streaming":
        from benchmarks.streaming import measure_streaming, streaming_markdown

        res = measure_streaming(args.rows, streams=args.streams or (30 if q else 300), warmup=5 if q else 30,
                                chunk_delay=args.chunk_delay, litellm=find_litellm(args.litellm))
        md = header_md("asgi-llm streaming latency", machine, command_line()) + "\n" + streaming_markdown(res)
    elif args.cmd == "memory":
        from benchmarks.memory import measure_memory, memory_markdown

        seconds = args.seconds or (10 if q else 120)
        res = measure_memory(row=args.row, seconds=seconds, requests=args.requests, concurrency=args.concurrency,
                             stream=args.stream, tool=args.tool)
        md = header_md("asgi-llm memory over a long run", machine, command_line()) + "\n" + memory_markdown(res)
    else:
        from benchmarks.memory import growth_markdown, measure_growth

        res = measure_growth(concurrency=args.concurrency, duration=args.duration or (1 if q else 5),
                             warmup=0 if q else 1, tool=args.tool)
        md = header_md("asgi-llm growth", machine, command_line()) + "\n" + growth_markdown(res)
    data = {"machine": machine, "command": command_line(), "result": res}
    md_path, json_path = write_results(args.out, args.cmd, md, data)
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
