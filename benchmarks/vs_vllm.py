"""Stock ``vllm serve`` against our cluster (fcfs, andes), side by side, over the OpenAI API.

Same tiny model, same engine settings and KV budget, same seeded bursty workload sent by
``andes-loadgen run`` to each target's ``/v1/completions``:

* **vllm**: vLLM's own OpenAI server (``vllm serve``; its default FCFS scheduler);
* **fcfs** / **andes**: ``andes up --backend vllm`` with that policy, through the gateway's
  OpenAI-compatible HTTP API.

Then ``andes-loadgen report`` writes the side-by-side table and plots. Goal: ours with
``andes`` at least 2x stock vLLM's average QoE at this overloaded rate, with at most 10% less
output throughput. Results in benchmarks/results/vs_vllm/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from andes.demo import VLLM_BLOCK_SIZE
from andes.up import ClusterConfig, LocalCluster, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "vs_vllm"
KV_BLOCKS = 96
ENGINE = {"dtype": "float32", "max-model-len": "3072", "max-num-batched-tokens": "1024",
          "max-num-seqs": "64", "block-size": str(VLLM_BLOCK_SIZE)}


SYSTEMS = ("vllm", "fcfs", "andes")
"""Stock vLLM's server, then our cluster with each policy."""


def loadgen(target: str, out: Path, args: argparse.Namespace) -> None:
    subprocess.run(
        [sys.executable, "-m", "loadgen", "run", "--target", target, "--workload", "sharegpt",
         "--qoe-mix", "reading", "--arrival", args.arrival, "--rate", str(args.rate),
         "--duration", str(args.duration), "--seed", str(args.seed), "--json", str(out),
         "--quiet"],
        check=True,
    )


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("vllm serve exited")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("vllm serve did not come up")


def run_stock(model: str, out: Path, args: argparse.Namespace, log: Path) -> None:
    port = free_port()
    flags = [f"--{k}={v}" for k, v in ENGINE.items()]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("wb") as sink:
        server = subprocess.Popen(
            # vLLM's OpenAI server, as `vllm serve` runs it (the `vllm` command of the CPU
            # wheel looks itself up under the GPU wheel's name and fails).
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
             f"--num-gpu-blocks-override={args.kv_blocks + 1}", "--enforce-eager",
             "--served-model-name", "tiny", *flags],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )
        try:
            _wait_http(f"http://127.0.0.1:{port}/v1/models", server)
            loadgen(f"http://127.0.0.1:{port}/v1", out, args)
        finally:
            server.terminate()
            server.wait(timeout=60)


def run_ours(model: str, policy: str, out: Path, args: argparse.Namespace) -> None:
    scheduler_args: tuple[str, ...] = ()
    if policy == "andes" and args.max_preemptions is not None:
        scheduler_args = ("--max-preemptions", str(args.max_preemptions))
    worker_args = ["--kv-blocks", str(args.kv_blocks), "--max-batch", ENGINE["max-num-seqs"],
                   "--max-batched-tokens", ENGINE["max-num-batched-tokens"],
                   "--dtype", ENGINE["dtype"], "--max-model-len", ENGINE["max-model-len"],
                   "--block-size", ENGINE["block-size"],
                   # Stock vLLM's engine core and front end run at the default niceness; so
                   # do ours here, so the comparison is of the schedulers alone.
                   "--engine-nice", "0", "--worker-nice", "0"]
    config = ClusterConfig(backend="vllm", model=model, workers=1, policy=policy,
                           gateway_port=free_port(), scheduler_port=free_port(),
                           http_port=free_port(), worker_args=tuple(worker_args),
                           scheduler_args=scheduler_args)
    with LocalCluster(config) as cluster:
        loadgen(f"http://{cluster.http_addr}/v1", out, args)


def result_file(out: Path, name: str, round_index: int) -> Path:
    """Round 1 keeps the plain name (what ``--systems`` reuses); later rounds are suffixed."""
    return out / (f"{name}.json" if round_index == 1 else f"{name}_r{round_index}.json")


def round_order(systems: list[str], round_index: int) -> list[str]:
    """Odd rounds in the order of ``SYSTEMS``, even rounds reversed: the machine's speed
    drifts over minutes, and alternating the order keeps that drift from favouring one
    system."""
    ordered = [name for name in SYSTEMS if name in systems]
    return ordered if round_index % 2 == 1 else ordered[::-1]


def run_system(name: str, model: str, out: Path, args: argparse.Namespace, scratch: Path) -> None:
    if name == "vllm":
        run_stock(model, out, args, scratch / "vllm-serve.log")
    else:
        run_ours(model, name, out, args)


def summarize(files: dict[str, list[Path]], command: str) -> dict[str, object]:
    """Each system's figures per round and their medians, and andes over stock vLLM both
    per round (runs minutes apart) and as the ratio of the medians. The overload is the
    workload's output tokens per second of arrivals over what stock vLLM made: the same rate
    overloads a slower machine more."""
    rows = {name: [json.loads(path.read_text())["results"][0] for path in paths]
            for name, paths in files.items()}

    def per_round(key: str) -> dict[str, list[float]]:
        return {name: [row[key] for row in runs] for name, runs in rows.items()}

    avg_qoe, throughput = per_round("avg_qoe"), per_round("throughput_tok_s")
    paired = min(len(avg_qoe["vllm"]), len(avg_qoe["andes"]))
    qoe_ratios = [avg_qoe["andes"][i] / avg_qoe["vllm"][i] for i in range(paired)]
    throughput_ratios = [throughput["andes"][i] / throughput["vllm"][i] for i in range(paired)]
    median_qoe = {name: statistics.median(values) for name, values in avg_qoe.items()}
    median_throughput = {name: statistics.median(values) for name, values in throughput.items()}
    stock_requests = rows["vllm"][0]["per_request"]
    offered_tok_s = (sum(request["tokens"] for request in stock_requests)
                     / max(request["intended_s"] for request in stock_requests))
    return {
        "command": command,
        "rounds": max(len(paths) for paths in files.values()),
        "offered_tok_s": offered_tok_s,
        "overload_by_round": [offered_tok_s / value for value in throughput["vllm"]],
        "avg_qoe": median_qoe,
        "throughput_tok_s": median_throughput,
        "avg_qoe_by_round": avg_qoe,
        "throughput_tok_s_by_round": throughput,
        "valid_by_round": {name: [bool(row["valid"]) for row in runs]
                           for name, runs in rows.items()},
        "andes_over_stock_avg_qoe_by_round": qoe_ratios,
        "andes_over_stock_throughput_by_round": throughput_ratios,
        "andes_over_stock_avg_qoe": median_qoe["andes"] / median_qoe["vllm"],
        "andes_over_stock_throughput": median_throughput["andes"] / median_throughput["vllm"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model directory (default: build the --shape model)")
    parser.add_argument("--shape", default="tiny", choices=("tiny", "small"),
                        help="without --model: the `andes model tiny --shape` to build")
    parser.add_argument("--rate", type=float, default=6.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--arrival", default="burst:2,0.35,20")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS,
                        help=f"KV budget of every engine, in blocks of {VLLM_BLOCK_SIZE} tokens "
                             f"(default {KV_BLOCKS})")
    parser.add_argument("--max-preemptions", type=int,
                        help="andes: planned preemptions per request (default: the policy's, 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all the systems, interleaved (order reversed every other "
                             "round); the summary gives per-round figures and medians")
    parser.add_argument("--repeat-systems",
                        help="the systems that rounds 2 and later run (default: all of "
                             "--systems), e.g. vllm,andes to repeat only the pair compared")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="the systems to run (the others' results are read from --out, "
                             "from an earlier run with the same workload)")
    args = parser.parse_args()
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"--systems: unknown {', '.join(sorted(unknown))} (known: "
                     f"{', '.join(SYSTEMS)})")
    repeated = systems if args.repeat_systems is None else [
        name.strip() for name in args.repeat_systems.split(",") if name.strip()]
    if stray := set(repeated) - set(systems):
        parser.error(f"--repeat-systems: {', '.join(sorted(stray))} not in --systems")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    if missing := [name for name in SYSTEMS
                   if name not in systems and not result_file(args.out, name, 1).exists()]:
        parser.error(f"no earlier results in {args.out} for {', '.join(missing)}: run them too")
    files = {name: [result_file(args.out, name, 1)] for name in SYSTEMS}
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from andes.tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(scratch) / args.shape, shape=args.shape))
        for round_index in range(1, args.repeats + 1):
            for name in round_order(systems if round_index == 1 else repeated, round_index):
                path = result_file(args.out, name, round_index)
                print(f"round {round_index}/{args.repeats}: {name}", flush=True)
                run_system(name, model, path, args, Path(scratch))
                if round_index > 1:
                    files[name].append(path)
    subprocess.run([sys.executable, "-m", "loadgen", "report",
                    *(str(path) for paths in files.values() for path in paths),
                    "--out", str(args.out)], check=True)
    summary = summarize(files, "python benchmarks/vs_vllm.py " + " ".join(sys.argv[1:]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
