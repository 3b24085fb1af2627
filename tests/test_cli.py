"""Tests of the ``andes`` command line: the files it writes, reproducibility, usage errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from andes.cli import main
from tests.conftest import free_port

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RESULT_KEYS = {
    "policy",
    "rate",
    "requests",
    "avg_qoe",
    "p10_qoe",
    "p50_qoe",
    "qoe_ge_0_9",
    "qoe_ge_0_95",
    "perfect_qoe",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tds_p50",
    "throughput_tok_s",
    "preemptions_per_request",
}

WORKLOAD_ARGS = [
    "--profile", "a100-opt13b",
    "--workload", "sharegpt",
    "--qoe-mix", "reading",
    "--arrival", "poisson",
]
"""Short runs: a few dozen requests each."""


def sim_run(tmp_path: Path, *extra: str) -> list[str]:
    return ["sim", "run", *WORKLOAD_ARGS, "--policy", "andes", "--rate", "2",
            "--duration", "10", "--json", str(tmp_path / "run.json"), *extra]


def sim_sweep(out: Path, *extra: str) -> list[str]:
    return ["sim", "sweep", *WORKLOAD_ARGS, "--policies", "fcfs,andes", "--rates", "2,6",
            "--duration", "10", "--seed", "3", "--json", str(out), *extra]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def check_report(report: dict[str, Any], policies: list[str], rates: list[float]) -> None:
    assert set(report) == {"config", "results", "capacity_at_qoe_0_9"}
    points = [(row["policy"], row["rate"]) for row in report["results"]]
    assert points == [(policy, rate) for policy in policies for rate in rates]
    for row in report["results"]:
        assert set(row) >= RESULT_KEYS
        assert "per_request" not in row
        assert row["requests"] > 0
        assert 0.0 <= row["avg_qoe"] <= 1.0
    assert set(report["capacity_at_qoe_0_9"]) == set(policies)


def test_sim_run_writes_one_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(sim_run(tmp_path)) == 0
    report = read_json(tmp_path / "run.json")
    check_report(report, ["andes"], [2.0])
    assert report["config"]["profile"] == "a100-opt13b"
    table = capsys.readouterr().out
    assert "avg_qoe" in table
    assert "andes" in table


def test_sim_sweep_json_plot_and_reproducibility(tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    assert main(sim_sweep(tmp_path / "a.json", "--jobs", "2", "--plot", str(plot))) == 0
    assert main(sim_sweep(tmp_path / "b.json", "--jobs", "1")) == 0
    first, second = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    check_report(first, ["fcfs", "andes"], [2.0, 6.0])
    assert first["results"] == second["results"]
    assert first["capacity_at_qoe_0_9"] == second["capacity_at_qoe_0_9"]
    # The seed fixes the requests: every policy sees as many at a given rate.
    counts = {(row["rate"], row["requests"]) for row in first["results"]}
    assert len(counts) == 2
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


def test_sim_sweep_per_request_arrays(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    assert main(sim_sweep(out, "--jobs", "1", "--per-request")) == 0
    for row in read_json(out)["results"]:
        assert len(row["per_request"]["qoe"]) == row["requests"]
        assert len(row["per_request"]["ttft_s"]) == row["requests"]


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (("--profile", "nope"), "unknown latency profile 'nope'"),
        (("--workload", "wiki"), "unknown workload 'wiki'"),
        (("--qoe-mix", "uniform:1"), "bad spec 'uniform:1'"),
        (("--arrival", "burst:2"), "bad spec 'burst:2'"),
        (("--policy", "sjf"), "invalid choice: 'sjf'"),
        (("--rate", "0"), "argument --rate: must be a finite number > 0"),
        (("--rate", "-3"), "argument --rate: must be a finite number > 0"),
        (("--duration", "ten"), "argument --duration: expected a float"),
        (("--duration", "0.01"), "no request arrives within 0.01 s"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    replace: tuple[str, str],
    expected: str,
) -> None:
    argv = sim_run(tmp_path)
    flag, value = replace
    argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expected in captured.err
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    assert not (tmp_path / "run.json").exists()


def test_bad_sweep_lists_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep.json"
    argv = sim_sweep(out)
    argv[argv.index("--policies") + 1] = "fcfs,sjf"
    assert main(argv) == 2
    assert "unknown policy 'sjf'" in capsys.readouterr().err
    argv = sim_sweep(out)
    argv[argv.index("--rates") + 1] = "2,x"
    assert main(argv) == 2
    assert "argument --rates: expected a float, got 'x'" in capsys.readouterr().err


def test_python_m_andes_help() -> None:
    done = subprocess.run([sys.executable, "-m", "andes", "--help"], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0
    for command in ("sim", "bench", "demo"):
        assert command in done.stdout


def test_bench_planner_runs_the_solver(tmp_path: Path) -> None:
    out = tmp_path / "planner.json"
    argv = ["bench", "planner", "--policy", "andes", "--requests", "40", "--repeats", "5",
            "--warmups", "1", "--json", str(out)]
    assert main(argv) == 0
    timing = read_json(out)
    assert set(timing) >= {"policy", "requests", "median_ms", "p99_ms", "solver_ran"}
    assert timing["requests"] == 40
    assert timing["solver_ran"] == 1.0
    assert 0.0 < timing["median_ms"] <= timing["p99_ms"]


def test_demo_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo end to end on a few seconds of traffic: real cluster, both policies."""
    plot = tmp_path / "demo.png"
    figures = tmp_path / "demo.json"
    argv = ["demo", "--duration", "4", "--rate", "3", "--plot", str(plot), "--json", str(figures)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fcfs" in out and "andes" in out and "simulator avg QoE" in out
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    rows = read_json(figures)["rows"]
    assert [row["policy"] for row in rows] == ["fcfs", "andes"]
    for row in rows:
        assert row["errors"] == {}
        assert row["streams_contiguous"]
        assert row["completed"] == row["requests"] > 0
        assert 0.0 <= row["measured"]["avg_qoe"] <= 1.0


def test_up_serves_until_interrupted(tmp_path: Path) -> None:
    """`andes up` in the foreground: ready, serves a real client, stops cleanly on Ctrl-C."""
    gateway_port, scheduler_port = free_port(), free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "andes", "up", "--workers", "1", "--gateway-port",
         str(gateway_port), "--scheduler-port", str(scheduler_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.startswith("ready"):
                break
        else:
            pytest.fail("andes up ended before it was ready")
        done = subprocess.run(
            [sys.executable, "-m", "andes", "generate", "hello there", "--no-pace",
             "--max-tokens", "8", "--target", f"127.0.0.1:{gateway_port}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "QoE" in done.stderr
        assert done.stdout.strip()
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0


def test_free_ports_are_free_distinct_and_out_of_the_ephemeral_range() -> None:
    """A service's port must not be one an outgoing connection can take before it binds."""
    import socket

    from andes.up import LOWEST_PORT, _ephemeral_low

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST_PORT <= port < _ephemeral_low() for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


@pytest.mark.parametrize(("cpus", "workers", "services", "engines"), [
    ([0, 1], 1, [0], [[1]]),
    ([1, 0, 2], 2, [0], [[1], [2]]),
    (list(range(16)), 2, [0, 1, 2, 3, 4], [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]),
    ([4, 5, 6, 7], 1, [4, 5], [[6, 7]]),
])
def test_pinned_engines_get_cpus_of_their_own(
        cpus: list[int], workers: int, services: list[int], engines: list[list[int]]) -> None:
    from andes.up import engine_cpu_plan

    assert engine_cpu_plan(cpus, workers) == (services, engines)


def test_pinning_needs_more_cpus_than_engines() -> None:
    from andes.up import engine_cpu_plan

    with pytest.raises(ValueError, match="pinning 2 engines needs more than 2 CPUs"):
        engine_cpu_plan([0, 1], 2)


def test_pinning_engines_is_for_the_vllm_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--pin-engines"]) == 2
    assert "--pin-engines is for --backend vllm" in capsys.readouterr().err
