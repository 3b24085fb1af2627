"""The ``andes-loadgen`` command: ``run``, ``sweep`` and ``report``.

``run`` and ``sweep`` send open-loop traffic (:mod:`loadgen.openloop`) to a gateway over gRPC
(``grpc://HOST:PORT``) or to any OpenAI-compatible server over HTTP (``http://HOST:PORT/v1``)
and write one JSON document (:mod:`loadgen.results`); ``report`` lays result files side by
side (:mod:`loadgen.report`). Workload flags are those of ``andes sim``, so a measured run and
a simulated one are the same requests.

Ctrl-C (SIGINT) or SIGTERM stops new arrivals and drains the streams in flight for at most
``--drain-timeout`` seconds (a second Ctrl-C cancels them at once); the results are written
either way, marked ``interrupted``, and the exit status is then 130.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import uvloop

from andes import __version__
from andes.argtypes import checked, positive
from andes.heap import settle_heap
from andes.workload import (
    TraceLengths,
    Workload,
    make_workload,
    parse_arrival,
    parse_lengths,
    parse_qoe_mix,
)
from loadgen.openloop import DriveResult, LiveCounts, Stop
from loadgen.progress import Progress
from loadgen.results import LAG_P99_LIMIT_S, Row, document, run_row, write

USAGE_ERROR = 2
INTERRUPTED_EXIT = 130
"""128 + SIGINT, the shell's convention for a run ended by Ctrl-C."""
GRPC_CHANNELS = 16
"""gRPC channels (HTTP/2 connections) the streams are spread over."""


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, without the usage block that would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Target:
    """Where the load goes: ``grpc`` with ``address`` ``host:port``, or ``http`` with the API's
    base URL (``http://host:port/v1``)."""

    kind: str
    address: str
    text: str


def parse_target(text: str) -> Target:
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "grpc" and rest and "/" not in rest:
        return Target("grpc", rest, text)
    if sep and scheme in ("http", "https") and rest:
        return Target("http", text.rstrip("/"), text)
    raise argparse.ArgumentTypeError(
        f"expected grpc://HOST:PORT or http://HOST:PORT/v1, got {text!r}"
    )


def _rates(text: str) -> list[float]:
    return [positive(float)(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and usage errors
        return exit_request.code if isinstance(exit_request.code, int) else USAGE_ERROR
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:  # before the run's own handler was installed
        return INTERRUPTED_EXIT


def build_parser() -> _Parser:
    parser = _Parser(prog="andes-loadgen",
                     description="Open-loop LLM streaming load, QoE measured at the client.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="one arrival rate (or a trace's own clock)")
    _add_load_flags(run)
    run.add_argument("--rate", type=positive(float),
                     help="requests/s (not needed for a trace with arrival times)")
    run.set_defaults(handler=_run)

    sweep = commands.add_parser("sweep", help="several rates, one after another, into one file")
    _add_load_flags(sweep)
    sweep.add_argument("--rates", type=_rates, required=True, help="e.g. 2,4,6")
    sweep.set_defaults(handler=_sweep)

    report = commands.add_parser("report", help="result files side by side: table and PNGs")
    report.add_argument("files", type=Path, nargs="+", help="andes-loadgen (or andes sim) JSON")
    report.add_argument("--out", type=Path, required=True, help="directory for report.md, PNGs")
    report.set_defaults(handler=_report)
    return parser


def _add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", type=parse_target, required=True,
                        help="grpc://HOST:PORT (the gateway) or http://HOST:PORT/v1 (OpenAI API)")
    parser.add_argument("--workload", type=checked(parse_lengths),
                        help="sharegpt, alpaca, arxiv or trace:FILE (default sharegpt)")
    parser.add_argument("--trace", type=checked(lambda p: parse_lengths(f"trace:{p}")),
                        help="replay this JSONL trace (the format of andes.workload)")
    parser.add_argument("--qoe-mix", type=checked(parse_qoe_mix), default="reading",
                        help="reading, voice or uniform:TTFT,TDS (default reading)")
    parser.add_argument("--arrival", type=checked(parse_arrival), default="poisson",
                        help="poisson, gamma:CV or burst:INTENSITY,FRACTION[,PERIOD_S]")
    extent = parser.add_mutually_exclusive_group()
    extent.add_argument("--requests", type=positive(int), help="number of requests")
    extent.add_argument("--duration", type=positive(float), help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--api-key", default=os.environ.get("ANDES_API_KEY"),
                        help="API key (env ANDES_API_KEY)")
    parser.add_argument("--model", help="model name for HTTP (default: the first of /models)")
    parser.add_argument("--drain-timeout", type=positive(float), default=60.0,
                        help="after Ctrl-C, seconds to let in-flight streams finish (default 60)")
    parser.add_argument("--grpc-channels", type=positive(int), default=GRPC_CHANNELS,
                        help=f"gRPC connections to spread streams over (default {GRPC_CHANNELS})")
    parser.add_argument("--progress-interval", type=positive(float), default=5.0,
                        help="seconds between progress lines when stdout is not a terminal")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


# -- run and sweep -------------------------------------------------------------------------------


def _workload_spec(args: argparse.Namespace) -> str:
    if args.trace and args.workload:
        raise ValueError("give --workload or --trace, not both")
    return f"trace:{args.trace}" if args.trace else (args.workload or "sharegpt")


def _timed_trace(args: argparse.Namespace) -> bool:
    """Whether the requests come from a trace with its own arrival times (no rate applies)."""
    lengths = parse_lengths(_workload_spec(args))
    return isinstance(lengths, TraceLengths) and lengths.arrival_s is not None


def build_workload(args: argparse.Namespace, rate: float | None) -> Workload:
    """The requests of one run: the same as ``andes sim`` makes from the same flags."""
    spec = _workload_spec(args)
    lengths = parse_lengths(spec)
    timed_trace = _timed_trace(args)
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        if not isinstance(lengths, TraceLengths):
            raise ValueError("give --requests or --duration")
        requests = len(lengths)  # the whole trace
    if rate is None and not timed_trace:
        raise ValueError("give --rate (only a trace with arrival times has its own clock)")
    return make_workload(spec, args.qoe_mix, args.arrival, rate or 1.0,
                         duration_s=duration, num_requests=requests, seed=args.seed)


def _config(args: argparse.Namespace, rates: list[float | None]) -> Row:
    return {
        "target": args.target.text,
        "transport": args.target.kind,
        "workload": _workload_spec(args),
        "qoe_mix": args.qoe_mix,
        "arrival": args.arrival,
        "rates": rates,
        "requests": args.requests,
        "duration_s": args.duration,
        "seed": args.seed,
        "model": args.model,
        "drain_timeout_s": args.drain_timeout,
        "lag_p99_limit_ms": 1e3 * LAG_P99_LIMIT_S,
        "started_unix_s": time.time(),
    }


def _run(args: argparse.Namespace) -> int:
    return _execute(args, "run", [args.rate])


def _sweep(args: argparse.Namespace) -> int:
    return _execute(args, "sweep", list(args.rates))


def _execute(args: argparse.Namespace, command: str, rates: list[float | None]) -> int:
    try:  # every workload is built (and so checked) before any traffic is sent
        if _timed_trace(args):
            rates = [None]  # replayed on the trace's clock: no rate applies
        workloads = [(rate, build_workload(args, rate)) for rate in rates]
    except ValueError as err:
        print(f"andes-loadgen: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    if any(len(workload) == 0 for _, workload in workloads):
        print("andes-loadgen: error: no request arrives; raise --duration", file=sys.stderr)
        return USAGE_ERROR
    config = _config(args, rates)
    _settle_heap(args.target)
    try:
        rows, interrupted = uvloop.run(_run_all(args, workloads, config))
    except (OSError, ValueError) as err:  # aiohttp's connection errors are OSErrors
        print(f"andes-loadgen: error: {err}", file=sys.stderr)
        return 1
    doc = document(command, config, rows, interrupted=interrupted)
    write(args.json, doc)
    _print_summary(doc)
    print(f"wrote {args.json}")
    return INTERRUPTED_EXIT if doc["interrupted"] else 0


def _settle_heap(target: Target) -> None:
    """Import the transport, then settle the heap (:mod:`andes.heap`): the garbage collector
    then traverses only what the run creates, and seldom (a collection stalls the event loop,
    and a stalled loop sends late)."""
    importlib.import_module("loadgen.driver" if target.kind == "grpc" else "loadgen.http_driver")
    settle_heap()


async def _run_all(args: argparse.Namespace, workloads: list[tuple[float | None, Workload]],
                   config: Row) -> tuple[list[Row], bool]:
    """Each rate in turn on one event loop, under the Ctrl-C handling of the module doc."""
    stop = Stop(drain_timeout_s=args.drain_timeout)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.stop.is_set():
            print("\nstopping now: cancelling in-flight streams", file=sys.stderr, flush=True)
            stop.abort.set()
            return
        print(f"\nstopping: no new requests; draining in-flight streams (at most "
              f"{args.drain_timeout:g} s; Ctrl-C again cancels them)", file=sys.stderr,
              flush=True)
        stop.stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        if args.target.kind == "http" and args.model is None:
            from loadgen.http_driver import fetch_model

            args.model = config["model"] = await fetch_model(args.target.address, args.api_key)
        run_id = f"lg-{int(time.time())}-{secrets.token_hex(3)}"
        rows: list[Row] = []
        for position, (rate, workload) in enumerate(workloads):
            if stop.stop.is_set():
                break
            counts = LiveCounts(total=len(workload))
            label = f"rate {rate:g}/s" if rate is not None else "trace"
            async with Progress(label, counts, interval_s=args.progress_interval,
                                enabled=not args.quiet):
                result = await _drive(args, workload, f"{run_id}-{position}", stop, counts)
            rows.append(run_row(result, rate))
        return rows, stop.stop.is_set()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _drive(args: argparse.Namespace, workload: Workload, run_id: str, stop: Stop,
                 counts: LiveCounts) -> DriveResult:
    target: Target = args.target
    if target.kind == "grpc":
        from loadgen.driver import drive

        return await drive(target.address, workload, run_id=run_id, api_key=args.api_key,
                           channel_count=int(args.grpc_channels), stop=stop, counts=counts)
    from loadgen.http_driver import drive_http

    return await drive_http(target.address, workload, model=args.model, run_id=run_id,
                            api_key=args.api_key, stop=stop, counts=counts)


def _print_summary(doc: Row) -> None:
    from loadgen.report import Run, format_text, table_cells

    runs = [Run(f"{row['rate']:g}/s" if row["rate"] is not None else "trace", row)
            for row in doc["results"]]
    if runs:
        print(format_text(table_cells(runs)))
    if doc["command"] == "sweep" and doc["capacity_at_qoe_0_9"] is not None:
        print(f"capacity at average QoE >= 0.9: {doc['capacity_at_qoe_0_9']:.2f} requests/s")
    for run, row in zip(runs, doc["results"], strict=True):
        lag = row["send_lag"]
        print(f"{run.label}: send lag (actual - intended send time): p50 {lag['p50_ms']} ms, "
              f"p99 {lag['p99_ms']} ms, max {lag['max_ms']} ms")
        if not row["valid"]:
            print(f"WARNING: this run is INVALID: {row['invalid_reason']}", file=sys.stderr)
    if doc["interrupted"]:
        print("interrupted: the results hold the requests sent before the stop",
              file=sys.stderr)


# -- report --------------------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    from loadgen.report import write_report

    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"andes-loadgen: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        text = write_report(list(args.files), args.out)
    except (ValueError, KeyError, TypeError) as err:
        print(f"andes-loadgen: error: not a result file: {err!r}", file=sys.stderr)
        return USAGE_ERROR
    print(text)
    print(f"wrote {args.out / 'report.md'} and its PNGs")
    return 0
