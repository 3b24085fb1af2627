"""``andes-loadgen``: runs through a real local cluster over gRPC and HTTP, agreement with the
simulator, reports, the send-lag validity check, Ctrl-C, and the HTTP token-counting rules."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from andes.latency import load_profile
from andes.policies import make_policy
from andes.sim.simulator import SimConfig, simulate
from andes.up import ClusterConfig, LocalCluster
from andes.workload import Workload, make_workload
from loadgen.cli import main
from loadgen.http_driver import apportion, drive_http
from loadgen.openloop import DriveResult, StreamRecord
from loadgen.results import (
    LAG_P99_LIMIT_S,
    SUMMARY_KEYS,
    document,
    lag_stats,
    run_row,
    validity,
    write,
)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
KV_BLOCKS = 300
"""KV blocks per sim worker: few enough that memory binds under a burst, as in the demo."""
RESULT_KEYS = (*SUMMARY_KEYS, "errors", "send_lag", "valid", "invalid_reason", "interrupted",
               "per_request", "sent", "completed", "streams_contiguous")


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        backend="sim", workers=2, policy="andes", profile="a100-opt13b",
        gateway_port=free_port(), scheduler_port=free_port(), http_port=free_port(),
        redis_url=redis_url, worker_args=("--kv-blocks", str(KV_BLOCKS)),
    )
    with LocalCluster(config) as running:
        yield running


def _load_args(target: str, out: Path, *extra: str) -> list[str]:
    return ["run", "--target", target, "--workload", "alpaca", "--qoe-mix", "reading",
            "--arrival", "poisson", "--rate", "10", "--requests", "20", "--seed", "4",
            "--json", str(out), "--progress-interval", "1", *extra]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_run_writes_every_key_with_complete_streams(
    cluster: LocalCluster, tmp_path: Path, transport: str
) -> None:
    target = (f"grpc://{cluster.gateway_addr}" if transport == "grpc"
              else f"http://{cluster.http_addr}/v1")
    out = tmp_path / "run.json"
    assert main(_load_args(target, out)) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "run" and doc["config"]["transport"] == transport
    assert doc["interrupted"] is False
    (row,) = doc["results"]
    for key in RESULT_KEYS:
        assert key in row, key
    assert row["errors"] == {}
    assert row["sent"] == row["completed"] == row["requests"] == 20
    assert row["streams_contiguous"] is True
    assert 0.0 <= row["avg_qoe"] <= 1.0 and row["itl_p50_s"] > 0 and row["tpot_p50_s"] > 0
    assert set(row["send_lag"]) == {"p50_ms", "p99_ms", "max_ms"}
    workload = make_workload("alpaca", "reading", "poisson", 10, num_requests=20, seed=4)
    for request, tokens in zip(row["per_request"], workload.output_tokens, strict=True):
        assert request["tokens"] == request["max_tokens"] == int(tokens)
        assert request["finish_reason"] == "length" and request["error"] == ""
        times = request["token_times_s"]
        assert times == sorted(times) and times[0] == request["ttft_s"] > 0
    if transport == "http":
        assert all(r["usage_tokens"] == r["max_tokens"] for r in row["per_request"])
        assert all(r["counted_by"] in ("chunk", "text") for r in row["per_request"])
    if transport == "grpc":
        assert all(r["counted_by"] == "message" for r in row["per_request"])


@pytest.mark.slow
def test_measured_qoe_matches_the_simulator(cluster: LocalCluster, tmp_path: Path) -> None:
    """A burst that overloads the two workers (seconds of queueing; FCFS would average about
    0.63): the cluster's QoE, measured at the client, is the simulator's prediction for the
    same requests within 0.03."""
    flags = ["--workload", "sharegpt", "--qoe-mix", "reading", "--arrival", "burst:2,0.35,10",
             "--duration", "8", "--seed", "7"]
    out = tmp_path / "burst.json"
    status = main(["run", "--target", f"grpc://{cluster.gateway_addr}", *flags, "--rate", "24",
                   "--json", str(out), "--quiet"])
    assert status == 0
    (row,) = json.loads(out.read_text())["results"]
    workload = make_workload("sharegpt", "reading", "burst:2,0.35,10", 24, duration_s=8, seed=7)
    assert row["completed"] == len(workload) and row["errors"] == {}
    profile = dataclasses.replace(load_profile("a100-opt13b"), kv_blocks_total=KV_BLOCKS)
    simulated = simulate(workload, make_policy("andes"), SimConfig(profile=profile,
                                                                     num_workers=2)).summary()
    print(f"measured {row['avg_qoe']:.3f}, simulated {simulated['avg_qoe']:.3f}")
    assert abs(row["avg_qoe"] - float(simulated["avg_qoe"])) <= 0.03  # type: ignore[arg-type]


def test_sigint_drains_and_writes_interrupted_results(cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "stopped.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "loadgen", "run", "--target", f"grpc://{cluster.gateway_addr}",
         "--workload", "alpaca", "--rate", "4", "--duration", "120", "--seed", "5",
         "--json", str(out), "--progress-interval", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        for line in process.stdout:  # progress lines: wait until a few requests finished
            if "finished " in line and int(line.split("finished ")[1].split()[0]) >= 3:
                break
            assert time.monotonic() < deadline, "no request finished within 60 s"
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, 130), rest
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True
    (row,) = doc["results"]
    total = len(make_workload("alpaca", "reading", "poisson", 4, duration_s=120, seed=5))
    assert 3 <= row["completed"] <= row["sent"] < total
    assert row["errors"] == {}, "the drain let every stream in flight finish"
    assert all(r["tokens"] == r["max_tokens"] for r in row["per_request"])


# -- without a cluster ---------------------------------------------------------------------------


def _record(index: int, sent: float, gaps: list[float], ttft: float = 1.0) -> StreamRecord:
    record = StreamRecord(index=index, request_id=f"r-{index}", sent_s=sent, ttft_s=ttft,
                          tds=5.0, intended_s=sent, max_tokens=len(gaps))
    now = sent
    for i, gap in enumerate(gaps):
        now += gap
        record.add_chunk(i, 1, now)
    record.finish_reason = 2
    return record


def _result(lag_s: float, slow: float, count: int = 30) -> DriveResult:
    records = [_record(i, 0.1 * i, [0.4] + [slow] * 19) for i in range(count)]
    return DriveResult(records=records, send_lag_s=np.full(count, lag_s), wall_s=5.0)


def test_a_run_whose_client_lagged_is_invalid() -> None:
    assert validity(np.full(100, 0.001)) == (True, "")
    valid, reason = validity(np.r_[np.zeros(90), np.full(10, 0.05)])
    assert not valid and "exceeds 10 ms" in reason and "load generator" in reason
    assert lag_stats(np.array([0.001, 0.002, 0.05])) == {
        "p50_ms": 2.0, "p99_ms": pytest.approx(49.04), "max_ms": 50.0}
    good, bad = run_row(_result(0.0005, 0.2), 4.0), run_row(_result(0.05, 0.2), 6.0)
    assert good["valid"] and not bad["valid"] and bad["send_lag"]["p99_ms"] == 50.0
    doc = document("sweep", {}, [good, bad])
    assert doc["valid"] is False and "rate 6.0" in doc["invalid_reason"]
    assert doc["lag_p99_limit_ms"] == 1e3 * LAG_P99_LIMIT_S


def test_rows_use_the_simulator_keys_and_vllm_definitions() -> None:
    result = _result(0.0, 0.25, count=4)
    row = run_row(result, 2.0)
    assert row["requests"] == 4 and row["preemptions_per_request"] is None
    assert row["ttft_p50_s"] == pytest.approx(0.4)
    assert row["tpot_p50_s"] == pytest.approx(0.25) and row["itl_p50_s"] == pytest.approx(0.25)
    assert row["tds_p50"] == pytest.approx(4.0)
    simulated_keys = set(simulate(
        make_workload("alpaca", "reading", "poisson", 1, num_requests=3),
        make_policy("fcfs"), SimConfig(profile=load_profile("a100-opt13b"))).summary())
    assert (simulated_keys & set(SUMMARY_KEYS)) == set(SUMMARY_KEYS) - {"itl_p50_s"}


def test_report_writes_the_table_and_figures(tmp_path: Path) -> None:
    fast = document("sweep", {}, [run_row(_result(0.0, 0.1), 2.0),
                                  run_row(_result(0.0, 0.3), 4.0)])
    slow = document("run", {}, [run_row(_result(0.0, 0.5), 2.0)])
    write(tmp_path / "fast.json", fast)
    write(tmp_path / "slow.json", slow)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "fast.json"), str(tmp_path / "slow.json"),
                 "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| fast 2/s | fast 4/s | slow |" in markdown
    assert "avg QoE" in markdown and "capacity at average QoE >= 0.9" in markdown
    for name in ("qoe_vs_rate.png", "qoe_cdf.png", "ttft_cdf.png", "timeline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_bad_targets_and_extents_are_usage_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "x.json")
    assert main(["run", "--target", "localhost:1", "--rate", "1", "--requests", "1",
                 "--json", out]) == 2
    assert main(["run", "--target", "grpc://127.0.0.1:1", "--rate", "1", "--json", out]) == 2
    assert main(["run", "--target", "grpc://127.0.0.1:1", "--requests", "1", "--json", out]) == 2
    assert not Path(out).exists()


# -- HTTP token counting against a stub server ---------------------------------------------------


def test_apportion_spreads_tokens_by_text_length() -> None:
    assert apportion(6, [2, 2, 2]) == [2, 2, 2]
    assert apportion(5, [10, 1, 1]) == [3, 1, 1]
    assert sum(apportion(1000, list(range(1, 300)))) == 1000
    assert min(apportion(40, [1] * 39 + [1000])) == 1
    with pytest.raises(ValueError):
        apportion(2, [1, 1, 1])


async def _stub_server(chunks: list[dict[str, object]]) -> tuple[web.AppRunner, str]:
    """An OpenAI-style server that streams ``chunks`` as SSE events, then ``[DONE]``."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream"] and body["ignore_eos"] and body["qoe"]["tds"] == 5.0
        assert body["stream_options"]["include_usage"] and body["model"] == "stub"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/v1"


def _one_request(tokens: int) -> Workload:
    return Workload(arrival_s=[0.0], prompt_tokens=[4], output_tokens=[tokens], ttft_s=[1.0],
                    tds=[5.0])


def _drive_stub(chunks: list[dict[str, object]], tokens: int) -> StreamRecord:
    async def body() -> StreamRecord:
        runner, url = await _stub_server(chunks)
        try:
            result = await drive_http(url, _one_request(tokens), model="stub", run_id="stub")
        finally:
            await runner.cleanup()
        (record,) = result.records
        return record

    return asyncio.run(body())


def _text(text: str, finish: str | None = None, used: int | None = None) -> dict[str, object]:
    chunk: dict[str, object] = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if used is not None:
        chunk["usage"] = {"completion_tokens": used}
    return chunk


def test_http_chunks_without_counts_are_spread_by_text_to_match_usage() -> None:
    chunks = [_text("one two "), _text("x "), _text("three four five ", "length"),
              {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}]
    record = _drive_stub(chunks, 6)
    assert record.error == "" and record.counted_by == "text" and record.usage_tokens == 6
    assert [count for _, count, _ in record.messages] == [2, 1, 3]
    assert len(record.token_times) == 6 and record.indices_ok


def test_http_per_chunk_usage_counts_exactly_and_one_per_chunk_otherwise() -> None:
    counted = _drive_stub([_text("a b ", used=2), _text("c ", "length", used=3)], 3)
    assert counted.counted_by == "usage" and len(counted.token_times) == 3
    assert [count for _, count, _ in counted.messages] == [2, 1]
    unverified = _drive_stub([_text("a b "), _text("c ", "length")], 3)
    assert unverified.counted_by == "chunk" and unverified.usage_tokens is None
    assert len(unverified.token_times) == 2, "no usage: one token per chunk, as documented"
