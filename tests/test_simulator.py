"""End-to-end simulations (small ones) and the summary figures they report."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

import andes.sim.simulator as simulator
from andes.latency import load_profile
from andes.metrics import RequestOutcomes, capacity_at, summarize
from andes.policies import POLICY_NAMES, make_policy
from andes.policies.base import Plan, Snapshot
from andes.sim.engine import SimEngine
from andes.sim.simulator import SimConfig, SimResult, simulate
from andes.workload import Workload, make_workload

PROFILE = load_profile("a100-opt13b")
CONFIG = SimConfig(profile=PROFILE)
TIMINGS = ("wall_seconds", "planner_ms_per_plan")

SUMMARY_KEYS = {
    "requests", "avg_qoe", "p10_qoe", "p50_qoe", "qoe_ge_0_9", "qoe_ge_0_95", "perfect_qoe",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tds_p50", "tpot_p50_s", "throughput_tok_s",
    "preemptions_per_request",
}


def sharegpt(rate: float, duration_s: float, seed: int = 0) -> Workload:
    return make_workload("sharegpt", "reading", "poisson", rate, duration_s=duration_s,
                         seed=seed)


def expected_outputs(workload: Workload, config: SimConfig) -> np.ndarray:
    """What the simulator generates per request: the workload's, clipped to fit in KV."""
    kv_tokens = config.profile.kv_capacity_tokens
    prompt = np.minimum(workload.prompt_tokens, kv_tokens // 2)
    limit = kv_tokens - prompt - config.profile.block_size
    return np.asarray(np.minimum(workload.output_tokens, limit))


def assert_everything_finished_once(result: SimResult, workload: Workload,
                                    config: SimConfig) -> None:
    ids = [f.request_id for f in result.finished]
    assert ids == list(range(len(workload))), "every request finishes exactly once"
    outputs = np.array([f.output_tokens for f in result.finished])
    np.testing.assert_array_equal(outputs, expected_outputs(workload, config))
    for f in result.finished:
        assert f.arrival_s == workload.arrival_s[f.request_id]
        assert f.arrival_s < f.first_token_s <= f.finish_s
        assert 0.0 <= f.qoe <= 1.0
    assert len(result.outcomes) == len(workload)
    np.testing.assert_array_equal(result.outcomes.output_tokens, outputs)


def avg_qoe(result: SimResult) -> float:
    return float(result.summary()["avg_qoe"])  # type: ignore[arg-type]


def stable(summary: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in summary.items() if k not in TIMINGS}


# -- end to end --------------------------------------------------------------------------------


def test_low_rate_every_policy_is_perfect_and_serves_the_same_tokens() -> None:
    workload = sharegpt(rate=1.0, duration_s=60.0)
    assert len(workload) >= 40
    totals = {}
    for name in POLICY_NAMES:
        result = simulate(workload, make_policy(name), CONFIG)
        assert_everything_finished_once(result, workload, CONFIG)
        assert result.summary()["policy"] == name
        assert avg_qoe(result) >= 0.99, name
        assert result.preemptions_forced == 0
        totals[name] = int(result.outcomes.output_tokens.sum())
    assert len(set(totals.values())) == 1, totals


@pytest.fixture(scope="module")
def overloaded() -> tuple[Workload, dict[str, SimResult]]:
    """Rate 12 on one A100 with OPT-13B: well past its capacity for two minutes."""
    workload = sharegpt(rate=12.0, duration_s=120.0)
    return workload, {name: simulate(workload, make_policy(name), CONFIG)
                      for name in ("fcfs", "andes")}


def test_overloaded_andes_beats_fcfs(overloaded: tuple[Workload, dict[str, SimResult]]) -> None:
    workload, results = overloaded
    for result in results.values():
        assert_everything_finished_once(result, workload, CONFIG)
    fcfs, andes = avg_qoe(results["fcfs"]), avg_qoe(results["andes"])
    assert fcfs < 0.8, "the rate must overload FCFS"
    assert andes >= 1.3 * fcfs, f"andes {andes:.3f} vs fcfs {fcfs:.3f}"
    # Andes gets there by starting users in time, not by serving fewer tokens.
    ttft = {n: results[n].summary()["ttft_p50_s"] for n in results}
    assert ttft["andes"] < ttft["fcfs"]  # type: ignore[operator]
    np.testing.assert_array_equal(results["andes"].outcomes.output_tokens,
                                  results["fcfs"].outcomes.output_tokens)
    assert results["andes"].solver_runs > 0 and results["fcfs"].solver_runs == 0
    # FCFS overflows KV and gets preempted by the engine; Andes plans around it.
    assert results["fcfs"].preemptions_forced > 5 * max(results["andes"].preemptions_forced, 1)


def test_same_seed_same_summary() -> None:
    workload = sharegpt(rate=10.0, duration_s=30.0, seed=3)
    first = simulate(workload, make_policy("andes"), CONFIG)
    again = simulate(sharegpt(rate=10.0, duration_s=30.0, seed=3), make_policy("andes"), CONFIG)
    assert stable(first.summary()) == stable(again.summary())
    assert [f.qoe for f in first.finished] == [f.qoe for f in again.finished]
    assert [f.finish_s for f in first.finished] == [f.finish_s for f in again.finished]
    other = simulate(sharegpt(rate=10.0, duration_s=30.0, seed=4), make_policy("andes"), CONFIG)
    assert stable(other.summary()) != stable(first.summary())


def test_two_workers_finish_everything_and_share_the_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placed: dict[int, int] = {}

    class RecordingEngine(SimEngine):
        def add(self, request_id: int, **kwargs: Any) -> None:
            placed[request_id] = id(self)
            super().add(request_id, **kwargs)

    monkeypatch.setattr(simulator, "SimEngine", RecordingEngine)
    workload = sharegpt(rate=12.0, duration_s=30.0, seed=1)
    two = SimConfig(profile=PROFILE, num_workers=2)
    result = simulate(workload, make_policy("andes"), two)
    assert_everything_finished_once(result, workload, two)
    assert len(placed) == len(workload)
    counts = sorted(np.unique(list(placed.values()), return_counts=True)[1].tolist())
    assert len(counts) == 2, "both workers receive requests"
    assert counts[0] >= 0.35 * len(workload), counts
    # Twice the hardware serves the same overload at least as well.
    one = simulate(workload, make_policy("andes"), CONFIG)
    assert avg_qoe(result) >= avg_qoe(one)


def test_swap_preemption_run_finishes_everything() -> None:
    workload = sharegpt(rate=12.0, duration_s=20.0, seed=2)
    config = SimConfig(profile=PROFILE, host_kv_blocks=2000)
    result = simulate(workload, make_policy("rr", preemption_mode="swap"), config)
    assert_everything_finished_once(result, workload, config)
    assert result.preemptions_planned > 0


def test_max_tokens_cap_is_what_the_planner_sees_not_what_is_generated() -> None:
    workload = sharegpt(rate=4.0, duration_s=15.0, seed=5)
    config = SimConfig(profile=PROFILE, max_tokens=64)
    result = simulate(workload, make_policy("andes"), config)
    assert_everything_finished_once(result, workload, config)


class HoldingBack:
    """FCFS that admits one request per plan and says when it held others back."""

    name = "holding-back"

    def __init__(self, say_so: bool) -> None:
        self.say_so = say_so
        self.plan_times: list[float] = []

    def plan(self, snapshot: Snapshot) -> Plan:
        self.plan_times.append(snapshot.now_s)
        plan = make_policy("fcfs").plan(snapshot)
        held = len(plan.admit) - 1
        notes = {"deferred": float(held)} if self.say_so and held > 0 else {}
        return Plan(resume=plan.resume, admit=plan.admit[:1], notes=notes)


def test_a_plan_that_holds_starts_back_is_followed_by_another() -> None:
    # Ten requests at the same instant: planned one at a time, they all start within ten plan
    # intervals when the plan says it held some back, and wait for events (finishes) when it
    # does not.
    spread = make_workload("sharegpt", "uniform:1,4", "poisson", 1000.0, num_requests=10,
                           seed=3)
    workload = replace(spread, arrival_s=np.full(10, spread.arrival_s[0]))
    eager, silent = HoldingBack(say_so=True), HoldingBack(say_so=False)
    for policy in (eager, silent):
        result = simulate(workload, policy, CONFIG)
        assert_everything_finished_once(result, workload, CONFIG)
    first = float(workload.arrival_s[0])
    spacing = np.diff(eager.plan_times[:10])
    assert np.all(spacing >= CONFIG.plan_interval_s - 1e-12)
    assert eager.plan_times[9] - first < 10 * 0.1
    assert silent.plan_times[9] - first > 1.0


class Recording:
    """FCFS that records when it plans and how many it admits each time."""

    name = "recording"

    def __init__(self) -> None:
        self.plans: list[tuple[float, int]] = []

    def plan(self, snapshot: Snapshot) -> Plan:
        plan = make_policy("fcfs").plan(snapshot)
        self.plans.append((snapshot.now_s, len(plan.admit)))
        return plan


def test_arrivals_at_a_worker_with_room_are_planned_at_once() -> None:
    # Ten requests 1 ms apart onto an idle worker. The first is planned at its arrival; the
    # other nine arrive during its first iteration (about 20 ms) and, with room for all of
    # them, are planned at its end, before the cadence (50 ms) would allow. With room for one
    # (max_batch 1) they wait for the cadence.
    spread = make_workload("sharegpt", "uniform:1,4", "poisson", 1000.0, num_requests=10,
                           seed=3)
    workload = replace(spread, arrival_s=spread.arrival_s[0] + 0.001 * np.arange(10))
    interval = CONFIG.plan_interval_s
    roomy, cramped = Recording(), Recording()
    for policy, max_batch in ((roomy, 64), (cramped, 1)):
        config = SimConfig(profile=replace(PROFILE, max_batch=max_batch))
        assert_everything_finished_once(simulate(workload, policy, config), workload, config)
    (first_at, first_admits), (second_at, second_admits) = roomy.plans[:2]
    assert (first_admits, second_admits) == (1, 9)
    assert second_at - first_at < interval
    assert np.all(np.diff([at for at, _ in cramped.plans]) >= interval - 1e-12)


# -- summary figures ---------------------------------------------------------------------------


def test_summarize_hand_values() -> None:
    outcomes = RequestOutcomes(
        arrival_s=np.array([0.0, 1.0]),
        first_token_s=np.array([0.5, 3.0]),
        finish_s=np.array([2.5, 3.0]),
        output_tokens=np.array([5.0, 1.0]),
        qoe=np.array([1.0, 0.5]),
        preemptions=np.array([0.0, 2.0]),
    )
    summary = summarize(outcomes)
    assert set(summary) == SUMMARY_KEYS
    assert summary["requests"] == 2
    assert summary["avg_qoe"] == pytest.approx(0.75)
    assert summary["p10_qoe"] == pytest.approx(0.55)
    assert summary["p50_qoe"] == pytest.approx(0.75)
    assert summary["qoe_ge_0_9"] == pytest.approx(0.5)
    assert summary["qoe_ge_0_95"] == pytest.approx(0.5)
    assert summary["perfect_qoe"] == pytest.approx(0.5)
    assert summary["ttft_p50_s"] == pytest.approx(1.25)
    assert summary["ttft_p90_s"] == pytest.approx(1.85)
    # Only the 5-token response has a decode phase: 4 tokens over 2 s.
    assert summary["tpot_p50_s"] == pytest.approx(0.5)
    assert summary["tds_p50"] == pytest.approx(2.0)
    assert summary["throughput_tok_s"] == pytest.approx(6.0 / 3.0)
    assert summary["preemptions_per_request"] == pytest.approx(1.0)
    with_itl = summarize(outcomes, itl_s=np.array([0.1, 0.2, 0.9]))
    assert set(with_itl) == SUMMARY_KEYS | {"itl_p50_s"}
    assert with_itl["itl_p50_s"] == pytest.approx(0.2)


def test_summarize_empty_run() -> None:
    empty = np.zeros(0)
    assert summarize(RequestOutcomes(empty, empty, empty, empty, empty, empty)) == {
        "requests": 0
    }


def test_sim_result_summary_keys() -> None:
    result = simulate(sharegpt(rate=2.0, duration_s=5.0), make_policy("fcfs"), CONFIG)
    summary = result.summary()
    assert set(summary) >= SUMMARY_KEYS | {"policy", "iterations", "plans", "solver_runs",
                                           "planner_ms_per_plan", "preemptions_forced",
                                           "wall_seconds"}
    assert summary["iterations"] == result.iterations > 0
    assert summary["plans"] == result.plans > 0


@pytest.mark.parametrize(
    ("rates", "qoes", "expected"),
    [
        ([1.0, 2.0, 3.0], [1.0, 0.95, 0.85], 2.5),
        ([3.0, 1.0, 2.0], [0.85, 1.0, 0.95], 2.5),  # any order
        ([1.0, 2.0, 3.0], [0.8, 0.7, 0.6], 0.0),  # never above the threshold
        ([1.0, 2.0, 3.0], [1.0, 0.99, 0.91], 3.0),  # always above: the highest rate
        ([1.0, 2.0, 3.0], [1.0, 0.9, 0.8], 2.0),  # exactly at the threshold counts
        ([2.0, 4.0], [1.0, 0.5], 2.4),
        ([], [], 0.0),
    ],
)
def test_capacity_at(rates: list[float], qoes: list[float], expected: float) -> None:
    assert capacity_at(rates, qoes) == pytest.approx(expected)


def test_capacity_at_other_threshold() -> None:
    assert capacity_at([1.0, 2.0, 3.0], [1.0, 0.95, 0.85], threshold=0.95) == pytest.approx(2.0)
    assert capacity_at([1.0, 2.0], [1.0, 0.98], threshold=0.99) == pytest.approx(1.5)
