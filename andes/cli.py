"""The ``andes`` command line: one ``_add_*`` function per command group, each registering its
subcommands with the handler they run.

Arguments are checked while parsing (profiles exist, spec strings parse, rates are positive),
so a mistake ends in one line on stderr and exit status 2 before any simulation starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeAlias

from andes import __version__
from andes.argtypes import checked, positive
from andes.latency import list_profiles, load_profile
from andes.policies import POLICY_NAMES
from andes.sim.snapshots import time_planner
from andes.sim.sweep import Row, RunConfig, format_table, json_document, sweep
from andes.tiny_model import MIN_VOCAB_SIZE, SHAPES, build_tiny_model
from andes.workload import parse_arrival, parse_lengths, parse_qoe_mix

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[_Parser]"

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, without the usage block that would bury it."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and usage errors
        return exit_request.code if isinstance(exit_request.code, int) else USAGE_ERROR
    handler: Handler = args.handler
    return handler(args)


def build_parser() -> _Parser:
    parser = _Parser(prog="andes", description="QoE-aware LLM text streaming (Andes).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_sim, _add_bench, _add_demo, _add_up, _add_generate, _add_model):
        add(commands)
    return parser


# -- argument types: each turns a bad value into argparse's one-line error ---------------------


def _positive_floats(text: str) -> list[float]:
    return [positive(float)(part) for part in text.split(",")]


def _policy_names(text: str) -> list[str]:
    names = text.split(",")
    unknown = [name for name in names if name not in POLICY_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policy {unknown[0]!r}; expected some of {', '.join(POLICY_NAMES)}"
        )
    return names


# -- sim -----------------------------------------------------------------------------------------


def _add_sim(commands: Subcommands) -> None:
    sim = commands.add_parser("sim", help="simulate policies on emulated workers")
    sim_commands = sim.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = sim_commands.add_parser("run", help="one policy at one arrival rate")
    _add_run_config(run)
    run.add_argument("--policy", choices=POLICY_NAMES, required=True)
    run.add_argument("--rate", type=positive(float), required=True, help="requests/s")
    run.add_argument("--json", type=Path, help="write the results here")
    run.set_defaults(handler=_sim_run)

    sweep = sim_commands.add_parser("sweep", help="several policies at several arrival rates")
    _add_run_config(sweep)
    sweep.add_argument("--policies", type=_policy_names, required=True, help="e.g. fcfs,andes")
    sweep.add_argument("--rates", type=_positive_floats, required=True, help="e.g. 2,4,6")
    sweep.add_argument("--jobs", type=positive(int), default=os.cpu_count() or 1,
                       help="processes running points in parallel (default: CPUs)")
    sweep.add_argument("--json", type=Path, required=True, help="write the results here")
    sweep.add_argument("--plot", type=Path, help="write the sweep figure (PNG) here")
    sweep.add_argument("--per-request", action="store_true",
                       help="also write every request's QoE and TTFT to the JSON")
    sweep.set_defaults(handler=_sim_sweep)


def _add_run_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=checked(load_profile), required=True,
                        help=f"latency profile: {', '.join(list_profiles())} or a JSON path")
    parser.add_argument("--workload", type=checked(parse_lengths), required=True,
                        help="sharegpt, alpaca, arxiv or trace:FILE")
    parser.add_argument("--qoe-mix", type=checked(parse_qoe_mix), required=True,
                        help="reading, voice or uniform:TTFT,TDS")
    parser.add_argument("--arrival", type=checked(parse_arrival), required=True,
                        help="poisson, gamma:CV or burst:INTENSITY,FRACTION[,PERIOD_S]")
    extent = parser.add_mutually_exclusive_group(required=True)
    extent.add_argument("--duration", type=positive(float), help="seconds of arrivals")
    extent.add_argument("--requests", type=positive(int), help="number of requests instead")
    parser.add_argument("--workers", type=positive(int), default=1)
    parser.add_argument("--seed", type=int, default=0)


def _run_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        profile=args.profile,
        workload=args.workload,
        qoe_mix=args.qoe_mix,
        arrival=args.arrival,
        duration_s=args.duration,
        num_requests=args.requests,
        workers=args.workers,
        seed=args.seed,
    )


def _sim_run(args: argparse.Namespace) -> int:
    return _sweep_and_report(args, [args.policy], [args.rate], jobs=1)


def _sim_sweep(args: argparse.Namespace) -> int:
    return _sweep_and_report(args, args.policies, args.rates, jobs=args.jobs, plot=args.plot,
                             per_request=args.per_request)


def _sweep_and_report(
    args: argparse.Namespace,
    policies: list[str],
    rates: list[float],
    *,
    jobs: int,
    plot: Path | None = None,
    per_request: bool = False,
) -> int:
    config = _run_config(args)
    try:
        config.check(policies, rates)
    except ValueError as err:
        print(f"andes: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    report = sweep(config, policies, rates, jobs=jobs)
    print(format_table(report["results"]))
    capacity = ", ".join(f"{p} {r:g}" for p, r in report["capacity_at_qoe_0_9"].items())
    print(f"capacity at average QoE >= 0.9 (requests/s): {capacity}")
    if args.json:
        document = json_document(report, per_request=per_request)
        args.json.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    if plot:
        _plot_sweep(report, plot)
    return 0


def _plot_sweep(report: Row, path: Path) -> None:
    # Imported on use: matplotlib takes longer to import than the rest of the CLI together.
    from andes.sim.plots import plot_sweep

    plot_sweep(report, path)


# -- bench ---------------------------------------------------------------------------------------


def _add_bench(commands: Subcommands) -> None:
    bench = commands.add_parser("bench", help="micro-benchmarks")
    bench_commands = bench.add_subparsers(title="commands", metavar="COMMAND", required=True)

    planner = bench_commands.add_parser(
        "planner", help="time one plan of an overloaded worker's snapshot"
    )
    planner.add_argument("--policy", choices=POLICY_NAMES, default="andes")
    planner.add_argument("--requests", type=positive(int), required=True,
                         help="unfinished requests on the worker")
    planner.add_argument("--repeats", type=positive(int), default=50)
    planner.add_argument("--warmups", type=positive(int, zero_ok=True), default=5)
    planner.add_argument("--seed", type=int, default=0)
    planner.add_argument("--json", type=Path, required=True, help="write the timings here")
    planner.set_defaults(handler=_bench_planner)


def _bench_planner(args: argparse.Namespace) -> int:
    timing = time_planner(
        args.policy, args.requests, repeats=args.repeats, warmups=args.warmups, seed=args.seed
    )
    print(f"{args.policy} planning {args.requests} requests: median {timing['median_ms']:.2f} ms,"
          f" p99 {timing['p99_ms']:.2f} ms, solver ran in {timing['solver_ran']:.0%} of plans")
    args.json.write_text(json.dumps(timing, indent=2) + "\n")
    return 0


# -- demo ----------------------------------------------------------------------------------------

def _add_demo(commands: Subcommands) -> None:
    demo = commands.add_parser(
        "demo",
        help="FCFS vs Andes under a burst, through a real local cluster (and the simulator)",
    )
    demo.add_argument("--plot", type=Path, default=Path("demo.png"), help="(default: demo.png)")
    demo.add_argument("--json", type=Path, help="also write the figures as JSON")
    demo.add_argument("--duration", type=positive(float), default=30.0,
                      help="seconds of arrivals (default 30; the drain takes longer)")
    demo.add_argument("--rate", type=positive(float),
                      help="average requests/s (default 8; 12 with --backend vllm)")
    demo.add_argument("--backend", choices=("sim", "vllm"), default="sim",
                      help="sim: two emulated A100s; vllm: one real vLLM engine on the tiny "
                           "model (built on the fly unless --model is given)")
    demo.add_argument("--model", type=Path, help="model directory for --backend vllm")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    import tempfile

    from andes.demo import DemoConfig, plot_demo, run_policy, vllm_demo_config

    with tempfile.TemporaryDirectory(prefix="andes-demo-") as scratch:
        if args.backend == "vllm":
            model = args.model
            if model is None:
                from andes.tiny_model import build_tiny_model

                model = build_tiny_model(Path(scratch) / "tiny-llama")
            config = vllm_demo_config(str(model), args.rate or 12.0, args.duration)
            what = (f"One vLLM engine (CPU) serving a tiny random Llama with {config.kv_blocks} "
                    f"KV blocks of 32 tokens")
        else:
            config = DemoConfig(rate=args.rate or 8.0, duration_s=args.duration)
            what = f"Two emulated A100s serving OPT-13B ({config.kv_blocks} KV blocks each)"
        workload = config.workload()
        print(f"{what}, ShareGPT-like chat, {config.rate:g} requests/s on average with bursts "
              f"at twice that: {len(workload)} requests over {config.duration_s:g} s, sent "
              "through the gateway.")
        rows = []
        for policy in ("fcfs", "andes"):
            print(f"running {policy} ...", flush=True)
            rows.append(run_policy(config, policy, workload))
    header = ("policy", "avg QoE", "p10 QoE", "TTFT p90 (s)", "tok/s", "simulator avg QoE",
              "streams ok")
    print("  ".join(f"{h:>17}" for h in header))
    for row in rows:
        m = row["measured"]
        ok = row["streams_contiguous"] and not row["errors"] and row["completed"] == row["requests"]
        cells = (row["policy"], f"{m['avg_qoe']:.3f}", f"{m['p10_qoe']:.3f}",
                 f"{m['ttft_p90_s']:.2f}", f"{m['throughput_tok_s']:.0f}",
                 f"{row['simulated']['avg_qoe']:.3f}", "yes" if ok else "NO")
        print("  ".join(f"{c:>17}" for c in cells))
    plot_demo(rows, args.plot)
    print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"config": dataclasses.asdict(config), "rows": [
            {k: v for k, v in row.items() if k != "qoe"} for row in rows]}, indent=2) + "\n")
    return 0


# -- up ------------------------------------------------------------------------------------------


def _add_up(commands: Subcommands) -> None:
    up = commands.add_parser("up", help="run a local cluster in the foreground until Ctrl-C")
    up.add_argument("--backend", choices=("sim", "vllm"), default="sim")
    up.add_argument("--model", type=Path,
                    help="model directory for --backend vllm (e.g. from `andes model tiny`)")
    up.add_argument("--workers", type=positive(int), default=2)
    up.add_argument("--policy", choices=POLICY_NAMES, default="andes")
    up.add_argument("--profile", type=checked(load_profile), default="a100-opt13b")
    up.add_argument("--gateway-port", type=positive(int), default=50051)
    up.add_argument("--scheduler-port", type=positive(int), default=50052)
    up.add_argument("--http-port", type=positive(int, zero_ok=True), default=8000,
                    help="the gateway's OpenAI-compatible HTTP API (0: off; default 8000)")
    up.add_argument("--kv-blocks", type=positive(int), help="KV blocks per worker")
    up.add_argument("--pin-engines", action="store_true",
                    help="vllm: give each worker's engine CPUs of its own and keep the services "
                         "on the rest (one share for the services, one per engine)")
    up.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from andes.up import ClusterConfig, LocalCluster

    if args.backend == "vllm" and args.model is None:
        print("andes up: error: --backend vllm needs --model DIR", file=sys.stderr)
        return 2
    if args.pin_engines and args.backend != "vllm":
        print("andes up: error: --pin-engines is for --backend vllm", file=sys.stderr)
        return 2
    worker_args = ("--kv-blocks", str(args.kv_blocks)) if args.kv_blocks else ()
    config = ClusterConfig(backend=args.backend, workers=int(args.workers), policy=args.policy,
                           profile=args.profile, gateway_port=int(args.gateway_port),
                           scheduler_port=int(args.scheduler_port), worker_args=worker_args,
                           http_port=int(args.http_port) or None,
                           model=str(args.model) if args.backend == "vllm" else None,
                           pin_engines=bool(args.pin_engines))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with LocalCluster(config) as cluster:
            for name, address in cluster.endpoints().items():
                print(f"{name}: {address}")
            print("ready; Ctrl-C stops the cluster", flush=True)
            stop.wait()
            print("stopping ...", flush=True)
    except (RuntimeError, ValueError) as err:
        print(f"andes up: error: {err}", file=sys.stderr)
        return 1
    return 0


# -- generate ------------------------------------------------------------------------------------


def _add_generate(commands: Subcommands) -> None:
    generate = commands.add_parser(
        "generate", help="stream one generation from a gateway, paced at reading speed"
    )
    generate.add_argument("prompt")
    generate.add_argument("--target", default=os.environ.get("ANDES_GATEWAY_ADDR",
                                                             "127.0.0.1:50051"),
                          help="gateway host:port (env ANDES_GATEWAY_ADDR)")
    generate.add_argument("--max-tokens", type=positive(int), default=64)
    generate.add_argument("--tds", type=positive(float), default=4.8,
                          help="reading speed, tokens/s (default 4.8)")
    generate.add_argument("--ttft", type=positive(float), default=1.0,
                          help="expected time to first token, s (default 1.0)")
    generate.add_argument("--no-pace", action="store_true",
                          help="print tokens as they arrive instead of at reading speed")
    generate.add_argument("--timeout", type=positive(float), help="deadline for the call, s")
    generate.add_argument("--api-key", default=os.environ.get("ANDES_API_KEY"),
                          help="API key (env ANDES_API_KEY)")
    generate.add_argument("--tls", action="store_true",
                          help="connect over TLS, trusting gRPC's default root certificates")
    generate.add_argument("--tls-ca", default=os.environ.get("ANDES_GATEWAY_TLS_CA"),
                          help="PEM CA that signed the gateway's certificate: connect over TLS "
                               "(env ANDES_GATEWAY_TLS_CA)")
    generate.add_argument("--tls-cert", default=os.environ.get("ANDES_GATEWAY_CLIENT_CERT"),
                          help="PEM client certificate, for a gateway that requires one "
                               "(env ANDES_GATEWAY_CLIENT_CERT)")
    generate.add_argument("--tls-key", default=os.environ.get("ANDES_GATEWAY_CLIENT_KEY"),
                          help="PEM private key of --tls-cert (env ANDES_GATEWAY_CLIENT_KEY)")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    # Imported on use: the other commands need no gRPC.
    import asyncio

    from andes.client import AndesError, AsyncAndesClient
    from andes.tls import TlsError

    try:
        client = AsyncAndesClient(args.target, api_key=args.api_key, tls=args.tls,
                                  tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                  tls_key=args.tls_key)
    except TlsError as err:
        print(f"andes: error: {err}", file=sys.stderr)
        return USAGE_ERROR

    async def stream() -> int:
        async with client:
            generation = client.generate(
                args.prompt, max_tokens=int(args.max_tokens), ttft_s=args.ttft, tds=args.tds,
                paced=not args.no_pace, timeout_s=args.timeout,
            )
            printed = False
            try:
                async for event in generation:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    printed = True
            except AndesError as err:
                print(f"{chr(10) if printed else ''}andes: error: {err}", file=sys.stderr)
                return 1
            finally:
                await generation.aclose()
            sys.stdout.write("\n")
            ttft = generation.ttft
            tokens = len(generation.receipt_times)
            print(f"QoE {generation.qoe:.3f}  TTFT "
                  f"{'-' if ttft is None else f'{ttft:.2f} s'}  {tokens} tokens  "
                  f"finish {generation.finish_reason}", file=sys.stderr)
            return 0

    try:
        return asyncio.run(stream())
    except KeyboardInterrupt:
        return 130


# -- model ---------------------------------------------------------------------------------------


def _add_model(commands: Subcommands) -> None:
    model = commands.add_parser("model", help="build model directories for the vLLM backend")
    model_commands = model.add_subparsers(title="commands", metavar="COMMAND", required=True)

    tiny = model_commands.add_parser(
        "tiny", help="a tiny random Llama that vLLM runs on a CPU (built offline, seeded)"
    )
    tiny.add_argument("--out", type=Path, required=True, help="write the model directory here")
    tiny.add_argument("--seed", type=int, default=0, help="seeds the weights (default 0)")
    tiny.add_argument("--vocab-size", type=_vocab_size, default=2048,
                      help="tokens in the vocabulary (default 2048)")
    tiny.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                      help="tiny: 2 layers of 128 (tests, demos); small: 4 layers of 512, "
                           "whose steps cost compute rather than framework (default tiny)")
    tiny.add_argument("--force", action="store_true",
                      help="write into --out even if it is not empty (same-named files replaced)")
    tiny.set_defaults(handler=_model_tiny)


def _vocab_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from err
    if size < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_VOCAB_SIZE} (256 bytes and 4 special tokens), got {size}"
        )
    return size


def _model_tiny(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"andes: error: {out} exists and is not a directory", file=sys.stderr)
        return USAGE_ERROR
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(f"andes: error: {out} is not empty; pass --force to write into it anyway",
              file=sys.stderr)
        return USAGE_ERROR
    build_tiny_model(out, seed=args.seed, vocab_size=args.vocab_size, shape=args.shape)
    print(out)
    return 0
