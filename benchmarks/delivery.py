"""The token delivery path under load: worker XADD -> Redis -> gateway XREAD -> gRPC -> client.

Starts a local cluster (Redis, scheduler, two sim workers with fast steps and a large batch,
gateway; each its own process, as ``andes up`` runs them), sends ``--streams`` requests at once
through the public gRPC API and records, per received message, its first token index, its
token count and the client's receipt time on the wall clock (``time.time()``). After the run it
reads every request's token stream back with XRANGE: an entry id's millisecond part is the time
Redis appended the entry (the worker's XADD), on the same machine's clock. Each entry is
matched to the message that delivered its first token, which gives the added latency from XADD
to client receipt per entry.

Reported: delivered tokens/s over the busy period (first to last receipt), XADD-to-receipt
p50/p99/max over the run and per second of it (the burst's admission, the steady state, the
end), the client's own send lag and event-loop lag (so the client is not mistaken for the
bottleneck), and CPU% per process sampled from /proc during the run.

Everything shares this machine's cores, the emulated accelerators included: a sim worker
spends CPU on every token it makes, which a GPU worker's host would not take from the
gateway. ``--worker-nice`` lets them yield it; ``--publish-interval-ms`` sets how long a
request's tokens wait in the worker to leave as one stream entry (fewer, larger entries and
messages; that wait comes before the XADD, so the figure does not include it).

The plan round trip (snapshot -> plan applied at a worker) comes from the scheduler's
``andes_plan_round_trip_seconds`` histogram (the worker reports when it applied each plan; both
clocks are this machine's), scraped after the run with its delivery part
(``andes_plan_delivery_seconds``: until the worker's session has the plan; the rest is the wait
for the worker's next iteration boundary) and the plan computation time
(``andes_plan_latency_seconds``); percentiles are interpolated within histogram buckets, as
Prometheus's ``histogram_quantile`` does. ``--plan-interval-ms`` sets the scheduler's least time
between two plans of one worker: 20 ms with two workers allows 100 plans/s (a plan goes out only
when it changes something and the previous one was applied).

Entry ids have 1 ms resolution (the XADD happened within [ms, ms + 1)), so latencies are taken
from the middle of that millisecond: each figure is exact to +-0.5 ms.
Writes benchmarks/results/delivery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import uvloop

from andes.heap import settle_heap
from andes.tokenstream import DEFAULT_PREFIX, stream_key
from andes.up import ClusterConfig, LocalCluster, free_port
from andes.workload import Workload
from loadgen.driver import DriveResult, StreamRecord
from loadgen.driver import drive as drive_workload

RESULTS = Path(__file__).resolve().parent / "results" / "delivery.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")


async def _loop_lag(stop: asyncio.Event, samples: list[float], period_s: float = 0.01) -> None:
    """How late the client's event loop wakes up: a busy client shows here."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(period_s)
        samples.append(time.perf_counter() - start - period_s)


async def drive(
    target: str, workload: Workload, channels: int, run_id: str
) -> tuple[DriveResult, list[float]]:
    """The load generator's open-loop driver, with the client's event-loop lag sampled."""
    loop_lag: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(_loop_lag(stop, loop_lag))
    try:
        result = await drive_workload(target, workload, run_id=run_id, channel_count=channels)
    finally:
        stop.set()
        await lag_task
    return result, loop_lag


def burst(
    n: int, prompt_tokens: int, output_tokens: int, tds: float,
    trickle_rate: float = 0.0, trickle_s: float = 0.0, trickle_tokens: int = 20,
) -> Workload:
    """``n`` requests all due at t=0 (any send lag is the client's own), then
    ``trickle_rate`` requests/s of ``trickle_tokens`` output tokens for ``trickle_s`` seconds:
    every arrival makes the scheduler plan its worker's admission, which keeps the planner at
    about that many plans/s (up to its ``--plan-interval-ms``) while the burst streams."""
    extra = int(trickle_rate * trickle_s)
    arrival = np.concatenate([np.zeros(n), (1 + np.arange(extra)) / max(trickle_rate, 1e-9)])
    return Workload(
        arrival_s=arrival,
        prompt_tokens=np.full(n + extra, prompt_tokens),
        output_tokens=np.concatenate([np.full(n, output_tokens), np.full(extra, trickle_tokens)]),
        ttft_s=np.full(n + extra, 5.0),
        tds=np.full(n + extra, tds),
    )


async def read_entries(
    redis_url: str, streams: list[StreamRecord]
) -> dict[str, list[tuple[float, int, int]]]:
    """Per request: (XADD time as unix s, first token index, token count) per stream entry."""
    client = aioredis.Redis.from_url(redis_url)
    out: dict[str, list[tuple[float, int, int]]] = {}
    try:
        for lo in range(0, len(streams), 200):
            batch = streams[lo:lo + 200]
            pipe = client.pipeline(transaction=False)
            for s in batch:
                pipe.xrange(stream_key(s.request_id, DEFAULT_PREFIX))
            replies = await pipe.execute()
            for s, entries in zip(batch, replies, strict=True):
                rows = []
                for entry_id, fields in entries:
                    ms = int(entry_id.split(b"-")[0])
                    rows.append(((ms + 0.5) / 1000.0, int(fields[b"i"]), len(fields[b"t"]) // 4))
                out[s.request_id] = rows
    finally:
        await client.aclose()
    return out


class CpuSampler(threading.Thread):
    """CPU% per named process from /proc/<pid>/stat, sampled every ``period_s``."""

    def __init__(self, pids: dict[str, int], period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.period_s = period_s
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self.cpu_s: dict[str, float] = {name: 0.0 for name in pids}
        """CPU seconds each process used while sampled."""
        self.halt = threading.Event()

    @staticmethod
    def _ticks(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime (this thread group)

    def run(self) -> None:
        last = {name: self._ticks(pid) for name, pid in self.pids.items()}
        t_last = time.monotonic()
        while not self.halt.wait(self.period_s):
            now = time.monotonic()
            for name, pid in self.pids.items():
                ticks = self._ticks(pid)
                self.samples[name].append(
                    100.0 * (ticks - last[name]) / CLK_TCK / (now - t_last)
                )
                if ticks:  # 0: the process is gone
                    self.cpu_s[name] += (ticks - last[name]) / CLK_TCK
                last[name] = ticks
            t_last = now


def renice(pid: int, nice: int) -> None:
    """Set every thread of ``pid`` to ``nice``, and its session's scheduling group where the
    kernel has autogroups (``andes up`` starts each service in a session of its own, and
    between sessions only the group's niceness counts)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def scrape_histogram(port: int, name: str) -> dict[str, float]:
    """Cumulative buckets of one Prometheus histogram, {le: count} plus sum and count."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[f"le_{le}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((f"{name}_sum ", f"{name}_count ")):
            out[line.split(" ", 1)[0].removeprefix(name + "_")] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantile(buckets: Mapping[str, float | str], q: float) -> float:
    """The ``q`` quantile (0-1) of a scraped histogram, linear within a bucket (Prometheus's
    ``histogram_quantile``); NaN without observations."""
    bounds = sorted(
        (float(key.removeprefix("le_")), float(count))
        for key, count in buckets.items() if key.startswith("le_")
    )
    total = bounds[-1][1] if bounds else 0.0
    if not total:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cumulative in bounds:
        if cumulative >= rank:
            if np.isinf(upper):
                return lower  # beyond the last finite bound: its lower edge is all we know
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def analyse(
    streams: list[StreamRecord], entries: dict[str, list[tuple[float, int, int]]]
) -> dict[str, Any]:
    latencies: list[float] = []
    xadd_of_latency: list[float] = []
    token_weights: list[int] = []
    receipts: list[float] = []
    tokens = 0
    unmatched = 0
    xadd_times: list[float] = []
    for s in streams:
        msgs = sorted(s.messages)
        starts = np.array([m[0] for m in msgs], dtype=np.int64)
        ends = starts + np.array([m[1] for m in msgs], dtype=np.int64)
        for _index, count, t in msgs:
            if count:
                receipts.append(t)
                tokens += count
        for xadd_s, index, count in entries.get(s.request_id, []):
            if count == 0:
                continue  # a bare finish entry carries no token
            xadd_times.append(xadd_s)
            # The message that delivered this entry's first token.
            j = int(np.searchsorted(ends, index, side="right"))
            if j >= len(msgs) or not starts[j] <= index < ends[j]:
                unmatched += 1
                continue
            latencies.append(msgs[j][2] - xadd_s)
            xadd_of_latency.append(xadd_s)
            token_weights.append(count)
    lat = np.array(latencies)
    weights = np.array(token_weights)
    recv = np.array(receipts)
    busy_s = float(recv.max() - recv.min()) if recv.size > 1 else float("nan")
    xadd = np.array(xadd_times)
    xadd_busy_s = float(xadd.max() - xadd.min()) if xadd.size > 1 else float("nan")
    per_token = np.repeat(lat, weights) if lat.size else lat
    return {
        "tokens_delivered": tokens,
        "busy_period_s": busy_s,
        "delivered_tokens_per_s": tokens / busy_s if busy_s else float("nan"),
        "xadd_tokens_per_s": int(weights.sum()) / xadd_busy_s if xadd_busy_s else float("nan"),
        "stream_entries": int(lat.size) + unmatched,
        "entries_unmatched": unmatched,
        "tokens_per_entry_mean": float(weights.mean()) if weights.size else float("nan"),
        "messages": len(recv),
        "tokens_per_message_mean": tokens / len(recv) if len(recv) else float("nan"),
        "xadd_to_client_ms": {
            "per_entry_p50": 1e3 * pct(lat, 50),
            "per_entry_p90": 1e3 * pct(lat, 90),
            "per_entry_p99": 1e3 * pct(lat, 99),
            "per_entry_max": 1e3 * float(lat.max()) if lat.size else float("nan"),
            "per_entry_min": 1e3 * float(lat.min()) if lat.size else float("nan"),
            "per_token_p50": 1e3 * pct(per_token, 50),
            "per_token_p99": 1e3 * pct(per_token, 99),
        },
        "by_second": by_second(np.array(xadd_of_latency), lat, weights),
    }


def by_second(xadd_s: np.ndarray, latency_s: np.ndarray, tokens: np.ndarray
              ) -> list[dict[str, float]]:
    """XADD to receipt per second of the run (by XADD time, from the first): where in the
    run the tail is (the burst's admission, the steady state, the end)."""
    if not xadd_s.size:
        return []
    second = np.floor(xadd_s - xadd_s.min()).astype(np.int64)
    rows = []
    for s in np.unique(second):
        inside = second == s
        rows.append({"second": int(s), "entries": int(inside.sum()),
                     "tokens": int(tokens[inside].sum()),
                     "p50_ms": 1e3 * pct(latency_s[inside], 50),
                     "p99_ms": 1e3 * pct(latency_s[inside], 99)})
    return rows


def error_summary(streams: list[StreamRecord]) -> dict[str, dict[str, float]]:
    """Failed streams by status and detail (request ids and numbers masked): how many, how
    many got no token at all, and when they ended (client clock, seconds from the start)."""
    kinds: dict[str, list[StreamRecord]] = {}
    for s in streams:
        if s.error:
            detail = re.sub(r"\d+", "N", s.error_detail.replace(s.request_id, "<id>"))
            kinds.setdefault(f"{s.error}: {detail}", []).append(s)
    return {
        kind: {
            "count": len(failed),
            "without_tokens": sum(1 for s in failed if not s.token_times),
            "ended_s_min": min(s.ended_s for s in failed),
            "ended_s_max": max(s.ended_s for s in failed),
        }
        for kind, failed in kinds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=300)
    parser.add_argument("--tds", type=float, default=20.0,
                        help="QoE token delivery speed asked for, tokens/s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", default="h100-llama3-8b")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--policy", default="andes")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--plan-interval-ms", type=float, default=20.0,
                        help="the scheduler's least time between two plans of one worker")
    parser.add_argument("--trickle-rate", type=float, default=100.0,
                        help="requests/s arriving after the burst (each one makes a plan)")
    parser.add_argument("--trickle-s", type=float, default=20.0,
                        help="for how long the trickle arrives, seconds")
    parser.add_argument("--trickle-tokens", type=int, default=20,
                        help="output tokens of each trickle request")
    parser.add_argument("--publish-interval-ms", type=float, default=50.0,
                        help="the workers' --publish-interval-ms: how long a running request's "
                             "tokens may wait to leave together (before the XADD)")
    parser.add_argument("--worker-nice", type=int, default=0,
                        help="niceness of the sim workers: above 0, the emulated accelerators "
                             "yield this machine's CPU to the delivery path (on a real "
                             "deployment they run elsewhere)")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()

    scheduler_metrics = free_port()
    os.environ["ANDES_SCHEDULER_METRICS_PORT"] = str(scheduler_metrics)
    config = ClusterConfig(
        workers=args.workers, policy=args.policy, profile=args.profile,
        gateway_port=free_port(), scheduler_port=free_port(),
        worker_args=("--max-batch", str(args.max_batch),
                     "--publish-interval-ms", str(args.publish_interval_ms)),
        gateway_args=("--max-streams", str(max(4096, 2 * args.streams))),
        scheduler_args=("--plan-interval-ms", str(args.plan_interval_ms)),
    )
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    with LocalCluster(config, log_dir=args.log_dir) as cluster:
        pids = {s.name: s.process.pid for s in cluster._services}
        if cluster._redis is not None:
            pids["redis"] = cluster._redis.pid
        pids["client"] = os.getpid()
        if args.worker_nice:
            for name, pid in pids.items():
                if name.startswith("worker"):
                    renice(pid, args.worker_nice)
        sampler = CpuSampler(pids, period_s=0.5)
        sampler.start()
        t0 = time.time()
        workload = burst(args.streams, args.prompt_tokens, args.output_tokens, args.tds,
                         args.trickle_rate, args.trickle_s, args.trickle_tokens)
        settle_heap()  # as andes-loadgen does before a run
        driven, loop_lag = uvloop.run(
            drive(cluster.gateway_addr, workload, args.channels, f"dl{int(t0)}")
        )
        streams, send_lag = driven.records, driven.send_lag_s
        wall_s = time.time() - t0
        sampler.halt.set()
        sampler.join()
        entries = asyncio.run(read_entries(cluster.redis_url, streams))
        plan_hist: Mapping[str, float | str]
        round_trip_hist: Mapping[str, float | str]
        delivery_hist: Mapping[str, float | str]
        try:
            plan_hist = scrape_histogram(scheduler_metrics, "andes_plan_latency_seconds")
            round_trip_hist = scrape_histogram(scheduler_metrics,
                                               "andes_plan_round_trip_seconds")
            delivery_hist = scrape_histogram(scheduler_metrics, "andes_plan_delivery_seconds")
        except OSError as err:
            plan_hist = round_trip_hist = delivery_hist = {"error": str(err)}

    result = analyse(streams, entries)
    errors = error_summary(streams)
    lag = np.array(loop_lag)
    busy = {name: [v for v in vals] for name, vals in sampler.samples.items()}
    # CPU over the samples where the cluster was doing something (the busy seconds).
    cpu = {
        name: {"mean_pct": float(np.mean(v)) if v else 0.0,
               "max_pct": float(np.max(v)) if v else 0.0}
        for name, v in busy.items()
    }
    document = {
        "config": vars(args) | {"json": str(args.json),
                                "log_dir": str(args.log_dir) if args.log_dir else None,
                                "cpu_cores": os.cpu_count()},
        "wall_s": wall_s,
        "requests": len(workload),
        "completed": sum(1 for s in streams if s.finish_reason and not s.error),
        "errors": errors,
        **result,
        "client": {
            "send_lag_ms_p50": 1e3 * pct(send_lag, 50),
            "send_lag_ms_max": 1e3 * float(send_lag.max()),
            "event_loop_lag_ms_p50": 1e3 * pct(lag, 50),
            "event_loop_lag_ms_p99": 1e3 * pct(lag, 99),
            "event_loop_lag_ms_max": 1e3 * float(lag.max()) if lag.size else float("nan"),
        },
        "cpu_percent": cpu,
        # Contention-proof: CPU time per delivered token, whatever else the machine runs.
        "cpu_us_per_token": {
            name: 1e6 * seconds / max(result["tokens_delivered"], 1)
            for name, seconds in sampler.cpu_s.items()
        },
        "cpu_percent_samples": {k: [round(x, 1) for x in v] for k, v in busy.items()},
        "plan_round_trip": {
            "plans_applied": float(round_trip_hist.get("count", 0.0)),
            "plans_applied_per_s": float(round_trip_hist.get("count", 0.0)) / wall_s,
            "p50_ms": 1e3 * histogram_quantile(round_trip_hist, 0.50),
            "p99_ms": 1e3 * histogram_quantile(round_trip_hist, 0.99),
            "mean_ms": 1e3 * float(round_trip_hist.get("sum", 0.0))
            / max(float(round_trip_hist.get("count", 0.0)), 1.0),
            "round_trip_seconds_histogram": round_trip_hist,
            # Snapshot -> the worker's session has the plan (the rest of the round trip is
            # the wait for the worker's next iteration boundary).
            "delivery_p50_ms": 1e3 * histogram_quantile(delivery_hist, 0.50),
            "delivery_p99_ms": 1e3 * histogram_quantile(delivery_hist, 0.99),
            "delivery_seconds_histogram": delivery_hist,
            "plan_compute_p50_ms": 1e3 * histogram_quantile(plan_hist, 0.50),
            "plan_compute_p99_ms": 1e3 * histogram_quantile(plan_hist, 0.99),
            "plan_compute_seconds_histogram": plan_hist,
        },
        "goals": {
            "delivered_tokens_per_s_min": 30000,
            "xadd_to_client_p99_ms_max": 25,
            "plan_round_trip_p99_ms_max": 5,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    printable = {k: v for k, v in document.items()
                 if k not in ("cpu_percent_samples", "by_second")}
    print(json.dumps(printable, indent=2))
    print("XADD to client receipt by second of the run (XADD time):")
    for row in document["by_second"]:
        print(f"  {row['second']:3d} s: {row['tokens']:6d} tokens, "
              f"p50 {row['p50_ms']:6.1f} ms, p99 {row['p99_ms']:6.1f} ms")


if __name__ == "__main__":
    main()
