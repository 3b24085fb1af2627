"""Scheduling policies: the contract every plan keeps, and each policy's own behaviour."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.latency import load_profile
from andes.policies import POLICY_NAMES, make_policy
from andes.policies.andes import AndesPolicy
from andes.policies.base import (
    HOLDS_KV,
    Plan,
    PreemptionMode,
    RequestTable,
    Snapshot,
    State,
    blocks_for,
)
from andes.policies.outlook import make_outlook
from andes.policies.rr import RoundRobinPolicy
from andes.sim.engine import SimEngine

PROFILE = load_profile("a100-opt13b")
BLOCK = PROFILE.block_size
NOW = 1000.0


# -- snapshots ----------------------------------------------------------------------------------


def pacer_summary(
    generated: int, first_s: float, interval_s: float, stall_at: int, stall_s: float,
    ttft: float, tds: float,
) -> tuple[float, float, float]:
    """(digest_max, delay_sum, last delivery) of tokens at first + j*interval (+ one stall)."""
    if generated == 0:
        return -np.inf, 0.0, 0.0
    j = np.arange(generated)
    times = first_s + j * interval_s + np.where(j >= stall_at, stall_s, 0.0)
    running_max = np.maximum.accumulate(times - j / tds)
    return float(running_max[-1]), float(np.maximum(running_max - ttft, 0.0).sum()), float(
        times[-1]
    )


def make_snapshot(
    rows: list[dict[str, float]],
    *,
    total: int | None = None,
    free_extra: int = 0,
    max_batch: int = 256,
    now: float = NOW,
) -> Snapshot:
    """A consistent snapshot: holders' KV covers their context, free = total - held."""
    n = len(rows)

    def col(key: str, default: float, dtype: type) -> np.ndarray:
        return np.array([r.get(key, default) for r in rows], dtype=dtype).reshape(n)

    state = col("state", State.WAITING, np.int64)
    prompt = col("prompt", 100, np.int64)
    generated = col("gen", 0, np.int64)
    kv = np.where(np.isin(state, HOLDS_KV), blocks_for(prompt + generated, BLOCK), 0)
    held = int(kv.sum())
    total = held + free_extra if total is None else total
    table = RequestTable(
        request_id=col("id", 0, np.int64) if n and "id" in rows[0] else np.arange(n) + 10,
        state=state,
        arrival_s=col("arrival", now, np.float64),
        ttft_s=col("ttft", 1.0, np.float64),
        tds=col("tds", 4.0, np.float64),
        prompt_tokens=prompt,
        generated_tokens=generated,
        max_tokens=col("max_tokens", 1024, np.int64),
        digest_max=col("dmax", -np.inf, np.float64),
        delay_sum=col("dsum", 0.0, np.float64),
        kv_blocks=kv.astype(np.int64),
        preemptions=col("pre", 0, np.int64),
        admitted_seq=col("seq", -1, np.int64),
        served_since_admit=col("served", 0, np.int64),
    )
    return Snapshot(now_s=now, requests=table, profile=PROFILE, kv_blocks_total=total,
                    kv_blocks_free=total - held, max_batch=max_batch)


@st.composite
def request_rows(draw: st.DrawFn) -> dict[str, float]:
    state = draw(st.sampled_from(list(State)))
    prompt = draw(st.integers(1, 600))
    if state == State.WAITING:
        generated = 0
    elif state in (State.PREEMPTED, State.SWAPPED):
        generated = draw(st.integers(1, 400))
    else:
        generated = draw(st.integers(0, 400))
    fast = draw(st.booleans()) and draw(st.booleans())
    tds = draw(st.floats(30.0, 150.0) if fast else st.floats(2.0, 8.0))
    ttft = draw(st.floats(0.3, 5.0))
    first = draw(st.floats(0.05, 8.0))
    interval = draw(st.floats(0.2, 2.0)) / tds
    stall_at = draw(st.integers(0, 400))
    stall = draw(st.sampled_from([0.0, 0.5, 5.0, 30.0]))
    digest_max, delay_sum, last = pacer_summary(generated, first, interval, stall_at, stall,
                                                ttft, tds)
    idle = draw(st.floats(0.0, 20.0))
    ever_admitted = state != State.WAITING or draw(st.booleans())
    return {
        "state": int(state),
        "prompt": prompt,
        "gen": generated,
        "tds": tds,
        "ttft": ttft,
        "arrival": NOW - last - idle,
        "dmax": digest_max,
        "dsum": delay_sum,
        "pre": draw(st.integers(0, 3)),
        "seq": draw(st.integers(0, 10_000)) if ever_admitted else -1,
        "served": draw(st.integers(0, generated)) if generated else 0,
        "max_tokens": generated + draw(st.integers(1, 1000)),
    }


@st.composite
def snapshots(draw: st.DrawFn, max_size: int = 24) -> Snapshot:
    rows = draw(st.lists(request_rows(), min_size=0, max_size=max_size))
    ids = draw(st.lists(st.integers(0, 10**6), min_size=len(rows), max_size=len(rows),
                        unique=True))
    for row, request_id in zip(rows, ids, strict=True):
        row["id"] = request_id
    free = draw(st.sampled_from([0, 1, 5, 20, 60, 200, 2000]))
    max_batch = draw(st.sampled_from([1, 2, 4, 8, 256]))
    return make_snapshot(rows, free_extra=free, max_batch=max_batch)


def frozen_copy(snapshot: Snapshot) -> dict[str, np.ndarray]:
    table = snapshot.requests
    return {name: getattr(table, name).copy() for name in table.__dataclass_fields__}


def states_of(snapshot: Snapshot, ids: tuple[int, ...]) -> list[State]:
    table = snapshot.requests
    rows = {int(i): r for r, i in enumerate(table.request_id)}
    return [State(int(table.state[rows[i]])) for i in ids]


def assert_plan_contract(snapshot: Snapshot, plan: Plan) -> None:
    known = {int(i) for i in snapshot.requests.request_id}
    lists = {"preempt": plan.preempt, "pause": plan.pause, "resume": plan.resume,
             "admit": plan.admit}
    seen: set[int] = set()
    for name, ids in lists.items():
        assert all(isinstance(i, int) for i in ids), name
        assert set(ids) <= known, f"{name} names ids that are not in the snapshot"
        assert len(set(ids)) == len(ids), f"{name} repeats an id"
        assert not seen & set(ids), f"an id in {name} is also in another action list"
        seen |= set(ids)
    assert set(states_of(snapshot, plan.preempt)) <= {State.RUNNING, State.PAUSED, State.QUEUED}
    assert set(states_of(snapshot, plan.pause)) <= {State.RUNNING}
    assert set(states_of(snapshot, plan.admit)) <= {State.WAITING}
    assert set(states_of(snapshot, plan.resume)) <= {
        State.PREEMPTED, State.SWAPPED, State.PAUSED
    }


def kv_after(snapshot: Snapshot, plan: Plan) -> tuple[int, int]:
    """(Blocks the worker holds once the plan is applied and everything it queued started,
    blocks of the requests that start)."""
    table = snapshot.requests
    preempted = np.isin(table.request_id, np.asarray(plan.preempt, dtype=np.int64))
    started = np.isin(table.request_id, np.asarray(plan.admit + plan.resume, dtype=np.int64))
    holds = np.isin(table.state, HOLDS_KV)
    queued = (table.state == State.QUEUED) & ~preempted
    newcomers = (started & ~holds) | queued
    weights = blocks_for(table.context_tokens, snapshot.block_size)
    starting = int(weights[newcomers].sum())
    return int(table.kv_blocks[holds & ~preempted].sum()) + starting, starting


# -- the contract, for every policy --------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
@settings(max_examples=60, deadline=None)
@given(snapshot=snapshots())
def test_plans_keep_the_contract(name: str, snapshot: Snapshot) -> None:
    policy = make_policy(name)
    before = frozen_copy(snapshot)
    free_before = snapshot.kv_blocks_free
    plan = policy.plan(snapshot)
    assert_plan_contract(snapshot, plan)
    # Pure: the snapshot is untouched and the same snapshot gives the same plan.
    after = frozen_copy(snapshot)
    for column, values in before.items():
        np.testing.assert_array_equal(after[column], values, err_msg=column)
    assert snapshot.kv_blocks_free == free_before
    assert policy.plan(snapshot) == plan
    assert make_policy(name).plan(snapshot) == plan


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_empty_and_single_request_snapshots(name: str) -> None:
    policy = make_policy(name)
    empty = make_snapshot([], total=100)
    plan = policy.plan(empty)
    assert (plan.preempt, plan.pause, plan.resume, plan.admit) == ((), (), (), ())
    one = make_snapshot([{"state": State.WAITING, "arrival": NOW - 0.5}], total=100)
    plan = policy.plan(one)
    assert_plan_contract(one, plan)
    assert plan.admit == (10,), "a lone waiting request that fits is admitted"
    running = make_snapshot([{"state": State.RUNNING, "gen": 5, "seq": 1, "served": 5,
                              "dmax": 1.0, "arrival": NOW - 3.0}], free_extra=50)
    plan = policy.plan(running)
    assert_plan_contract(running, plan)
    assert plan.preempt == () and plan.pause == ()


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("sjf")
    with pytest.raises(ValueError):
        make_policy("andes", preemption_mode="teleport")


# -- FCFS ---------------------------------------------------------------------------------------


def test_fcfs_admits_in_arrival_order_and_resumes_first() -> None:
    rows = [
        {"id": 1, "state": State.WAITING, "arrival": NOW - 1.0},
        {"id": 2, "state": State.WAITING, "arrival": NOW - 3.0},
        {"id": 3, "state": State.PREEMPTED, "gen": 5, "arrival": NOW - 0.5, "dmax": 1.0},
        {"id": 4, "state": State.RUNNING, "gen": 5, "arrival": NOW - 9.0, "dmax": 1.0},
        {"id": 5, "state": State.WAITING, "arrival": NOW - 2.0},
        {"id": 6, "state": State.PREEMPTED, "gen": 5, "arrival": NOW - 4.0, "dmax": 1.0},
    ]
    plan = make_policy("fcfs").plan(make_snapshot(rows, total=40))
    assert plan.admit == (2, 5, 1)
    assert plan.resume == (6, 3)
    assert plan.preempt == () and plan.pause == ()


def test_fcfs_plan_starts_a_preempted_request_before_an_earlier_waiting_one() -> None:
    engine = SimEngine(PROFILE, kv_blocks_total=12)
    engine.add(1, arrival_s=0.0, prompt_tokens=150, output_tokens=50, ttft_s=1.0, tds=4.0)
    engine.apply(Plan(admit=(1,)))
    now = 0.0
    for _ in range(3):
        now = engine.step(now).end_s
    engine.apply(Plan(preempt=(1,)))
    # Request 2 arrived first and waits; 1 was preempted. Only one fits (10 blocks each).
    engine.add(2, arrival_s=-1.0, prompt_tokens=150, output_tokens=50, ttft_s=1.0, tds=4.0)
    snapshot = engine.snapshot(now)
    plan = make_policy("fcfs").plan(snapshot)
    assert plan.resume == (1,) and plan.admit == (2,)
    engine.apply(plan)
    result = engine.step(now)
    states = dict(zip(engine.snapshot(result.end_s).requests.request_id.tolist(),
                      engine.snapshot(result.end_s).requests.state.tolist(), strict=True))
    assert states == {1: State.RUNNING, 2: State.QUEUED}


# -- round robin ----------------------------------------------------------------------------


def rr_rows(served: list[int], waiting: int) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = [
        {"id": i, "state": State.RUNNING, "prompt": 150, "gen": 60, "seq": 10 - i,
         "served": s, "dmax": 2.0, "arrival": NOW - 20.0}
        for i, s in enumerate(served)
    ]
    rows += [{"id": 100 + j, "state": State.WAITING, "prompt": 150,
              "arrival": NOW - 1.0 + 0.1 * j} for j in range(waiting)]
    return rows


def test_rr_does_not_preempt_before_the_quantum() -> None:
    policy = RoundRobinPolicy(quantum_tokens=50)
    plan = policy.plan(make_snapshot(rr_rows([49, 10, 0], waiting=2)))
    assert plan.preempt == ()
    assert plan.admit == (100, 101)


def test_rr_does_not_preempt_when_nobody_waits() -> None:
    plan = RoundRobinPolicy(quantum_tokens=50).plan(make_snapshot(rr_rows([80, 90, 50], 0)))
    assert plan == Plan()


def test_rr_preempts_expired_requests_oldest_admission_first_until_the_queue_fits() -> None:
    # Each request holds 14 blocks; two are waiting, 10 blocks each; no free KV.
    plan = RoundRobinPolicy(quantum_tokens=50).plan(
        make_snapshot(rr_rows([60, 10, 70, 55], waiting=2))
    )
    # Expired: 0 (seq 10), 2 (seq 8), 3 (seq 7). Oldest admission first: 3, then 2 frees 28.
    assert plan.preempt == (3, 2)
    assert plan.admit == (100, 101)
    # With enough free KV for the queue nobody is preempted.
    roomy = RoundRobinPolicy(quantum_tokens=50).plan(
        make_snapshot(rr_rows([60, 10, 70, 55], waiting=2), free_extra=20)
    )
    assert roomy.preempt == ()


def test_rr_requeues_least_recently_served_first() -> None:
    rows = [
        {"id": 1, "state": State.PREEMPTED, "gen": 60, "seq": 5, "dmax": 2.0,
         "arrival": NOW - 30.0},
        {"id": 2, "state": State.PREEMPTED, "gen": 60, "seq": 3, "dmax": 2.0,
         "arrival": NOW - 10.0},
        {"id": 3, "state": State.WAITING, "arrival": NOW - 1.0},
        {"id": 4, "state": State.WAITING, "arrival": NOW - 2.0},
    ]
    plan = RoundRobinPolicy().plan(make_snapshot(rows, total=200))
    assert plan.admit == (4, 3)
    assert plan.resume == (2, 1)


@settings(max_examples=80, deadline=None)
@given(snapshot=snapshots(), quantum=st.integers(1, 100))
def test_rr_preempts_only_expired_requests_when_someone_waits(
    snapshot: Snapshot, quantum: int
) -> None:
    plan = RoundRobinPolicy(quantum_tokens=quantum).plan(snapshot)
    table = snapshot.requests
    rows = {int(i): r for r, i in enumerate(table.request_id)}
    if plan.preempt:
        assert np.isin(table.state, (State.WAITING, State.PREEMPTED, State.SWAPPED)).any()
    for request_id in plan.preempt:
        assert table.served_since_admit[rows[request_id]] >= quantum
        assert table.state[rows[request_id]] in HOLDS_KV


# -- least QoE first ----------------------------------------------------------------------


def test_lqf_ranks_by_qoe_gain_ignoring_kv_size() -> None:
    # Request 1 would gain the most from service but needs 94 blocks; 2 and 3 need 7 each and
    # together gain more. Only 1, or 2 and 3, fit in 100 blocks.
    rows = [
        {"id": 1, "state": State.WAITING, "prompt": 1500, "arrival": NOW - 1.5},
        {"id": 2, "state": State.WAITING, "prompt": 100, "arrival": NOW - 4.0},
        {"id": 3, "state": State.WAITING, "prompt": 100, "arrival": NOW - 4.5},
    ]
    snapshot = make_snapshot(rows, total=100)
    policy = AndesPolicy()
    sizes = np.array([2])
    gains = policy._values(make_outlook(snapshot, sizes, policy.horizon_s))[0]
    assert gains[0] > gains[1] > gains[2] and gains[1] + gains[2] > gains[0]
    lqf = make_policy("lqf").plan(snapshot)
    assert lqf.solver_ran and lqf.admit == (1,)
    # Both fit; pacing (tested on its own below) would start one prefill per plan.
    andes = AndesPolicy(pace_prefill=False).plan(snapshot)
    assert andes.solver_ran and andes.admit == (2, 3)


def test_lqf_admits_in_order_of_gain() -> None:
    # Equal sizes; the further past its TTFT a waiting request is, the less ten seconds of
    # service can repair: the gain order is the reverse of the lateness order.
    lateness = [4.0, 2.0, 8.0, 3.0, 6.0]
    rows = [
        {"id": i, "state": State.WAITING, "prompt": 100, "arrival": NOW - late}
        for i, late in enumerate(lateness)
    ]
    snapshot = make_snapshot(rows, total=23)  # 7 blocks each: three fit
    lqf = make_policy("lqf")
    assert isinstance(lqf, AndesPolicy)
    # Without pacing all three start now; with it, the first ones in that order.
    plan = dataclasses.replace(lqf, pace_prefill=False).plan(snapshot)
    assert plan.solver_ran
    assert plan.admit == (1, 3, 0)
    paced = lqf.plan(snapshot).admit
    assert 1 <= len(paced) < 3 and paced == plan.admit[: len(paced)]
    assert make_policy("fcfs").plan(snapshot).admit == (2, 4, 0, 3, 1)


# -- Andes --------------------------------------------------------------------------------------


def test_andes_without_pressure_admits_everyone_without_solving() -> None:
    rows = [
        {"id": 1, "state": State.WAITING, "arrival": NOW - 1.0},
        {"id": 2, "state": State.WAITING, "arrival": NOW - 3.0},
        {"id": 3, "state": State.PREEMPTED, "gen": 5, "arrival": NOW - 2.0, "dmax": 1.0},
        {"id": 4, "state": State.RUNNING, "gen": 5, "arrival": NOW - 9.0, "dmax": 1.0},
        {"id": 5, "state": State.PAUSED, "gen": 5, "arrival": NOW - 8.0, "dmax": 1.0},
    ]
    plan = make_policy("andes").plan(make_snapshot(rows, total=200))
    assert not plan.solver_ran
    assert plan.admit == (2, 1)
    assert plan.resume == (5, 3)
    assert plan.preempt == () and plan.pause == ()


def memory_bound(snapshot: Snapshot, policy: AndesPolicy) -> bool:
    demand = int(blocks_for(snapshot.requests.context_tokens, snapshot.block_size).sum())
    return demand > policy.memory_trigger * snapshot.kv_blocks_total


@pytest.mark.parametrize("max_preemptions", [0, 1, 2])
@settings(max_examples=60, deadline=None)
@given(snapshot=snapshots())
def test_andes_plans_fit_memory_and_respect_the_preemption_cap(
    max_preemptions: int, snapshot: Snapshot
) -> None:
    policy = AndesPolicy(max_preemptions=max_preemptions)
    plan = policy.plan(snapshot)
    table = snapshot.requests
    used, starting = kv_after(snapshot, plan)
    if memory_bound(snapshot, policy):
        assert plan.solver_ran
        if starting:
            # What it starts fits next to what it keeps, leaving the decode reserve free.
            reserve = int(snapshot.kv_blocks_total * policy.kv_reserve)
            assert used <= snapshot.kv_blocks_total - reserve
    else:
        assert used <= snapshot.kv_blocks_total
    rows = {int(i): r for r, i in enumerate(table.request_id)}
    for request_id in plan.preempt:
        row = rows[request_id]
        if table.state[row] in HOLDS_KV:
            assert table.preemptions[row] < max_preemptions
    if max_preemptions == 0:
        assert all(table.state[rows[i]] == State.QUEUED for i in plan.preempt)


@settings(max_examples=60, deadline=None)
@given(snapshot=snapshots())
def test_andes_overhead_awareness_only_removes_preemptions(snapshot: Snapshot) -> None:
    aware = AndesPolicy(max_preemptions=2).plan(snapshot)
    blind = AndesPolicy(max_preemptions=2, overhead_aware=False).plan(snapshot)
    table = snapshot.requests
    holders = {int(i) for i in table.request_id[np.isin(table.state, HOLDS_KV)]}
    # Victims (requests that hold KV) only; a queued request may be taken out of the queue
    # because its admission was refused.
    assert set(aware.preempt) & holders <= set(blind.preempt) & holders
    assert set(aware.admit) <= set(blind.admit)
    assert set(aware.resume) <= set(blind.resume)


def test_andes_admits_a_late_waiting_request_over_a_buffered_preempted_one() -> None:
    # Both need 26 blocks; 40 blocks hold one. Request 1 arrived earlier and was preempted
    # with 300 tokens delivered at once: its user has 15 s of reading buffered. Request 2
    # has waited 5 s for a first token it expected after 1 s.
    rows = [
        {"id": 1, "state": State.PREEMPTED, "prompt": 100, "gen": 300, "arrival": NOW - 60.0,
         "dmax": 0.5, "pre": 1, "seq": 3},
        {"id": 2, "state": State.WAITING, "prompt": 400, "arrival": NOW - 5.0},
    ]
    snapshot = make_snapshot(rows, total=40)
    assert blocks_for(snapshot.requests.context_tokens, BLOCK).tolist() == [26, 26]
    plan = AndesPolicy().plan(snapshot)
    assert plan.solver_ran
    assert plan.admit == (2,) and plan.resume == ()
    # FCFS, by contrast, resumes the preempted one first.
    assert make_policy("fcfs").plan(snapshot).resume == (1,)


def test_andes_resumes_a_late_preempted_request_over_a_patient_waiting_one() -> None:
    # The mirror image: the preempted user is late, the waiting one expects a first token
    # only in a minute.
    rows = [
        {"id": 1, "state": State.PREEMPTED, "prompt": 100, "gen": 300, "arrival": NOW - 90.0,
         "dmax": 10.0, "dsum": 300 * 9.0, "pre": 1, "seq": 3},
        {"id": 2, "state": State.WAITING, "prompt": 400, "arrival": NOW - 0.1, "ttft": 60.0},
    ]
    plan = AndesPolicy().plan(make_snapshot(rows, total=40))
    assert plan.solver_ran
    assert plan.resume == (1,) and plan.admit == ()


def overhead_rows() -> list[dict[str, float]]:
    # A long-context request 5 s into its answer (recompute would stall the worker ~0.3 s)
    # and a late waiting request that needs 4 blocks more than are free.
    return [
        {"id": 1, "state": State.RUNNING, "prompt": 1600, "gen": 10, "arrival": NOW - 5.0,
         "dmax": 1.0, "seq": 1, "served": 10},
        {"id": 2, "state": State.WAITING, "prompt": 50, "arrival": NOW - 5.0},
    ]


def test_andes_refiner_rejects_a_preemption_that_costs_more_than_it_gains() -> None:
    snapshot = make_snapshot(overhead_rows(), free_extra=3)
    blind = AndesPolicy(max_preemptions=1, overhead_aware=False).plan(snapshot)
    assert blind.solver_ran
    assert blind.preempt == (1,) and blind.admit == (2,)
    aware = AndesPolicy(max_preemptions=1).plan(snapshot)
    assert aware.solver_ran
    assert aware.preempt == () and aware.admit == ()


def test_andes_never_preempts_a_request_at_the_cap() -> None:
    rows = overhead_rows()
    rows[0]["pre"] = 1
    snapshot = make_snapshot(rows, free_extra=3)
    for policy in (AndesPolicy(max_preemptions=1, overhead_aware=False),
                   AndesPolicy(max_preemptions=0, overhead_aware=False)):
        plan = policy.plan(snapshot)
        assert plan.solver_ran and plan.preempt == () and plan.admit == ()


def test_andes_pauses_instead_of_preempting_under_latency_pressure() -> None:
    # Memory is plentiful, but two users read at 100 tokens/s, faster than a batch of six
    # decodes; the four slow readers have a minute of text buffered and can be skipped.
    rows = [
        {"id": i, "state": State.RUNNING, "prompt": 100, "gen": 200, "tds": 4.0, "dmax": 0.5,
         "seq": i, "served": 200, "arrival": NOW - 3.0}
        for i in range(4)
    ]
    rows += [
        {"id": 4 + i, "state": State.RUNNING, "prompt": 100, "gen": 20, "tds": 100.0,
         "dmax": 2.5, "dsum": 1.0, "seq": 4 + i, "served": 20, "arrival": NOW - 3.0}
        for i in range(2)
    ]
    snapshot = make_snapshot(rows, total=1000)
    assert not memory_bound(snapshot, AndesPolicy())
    plan = AndesPolicy().plan(snapshot)
    assert plan.solver_ran
    assert plan.preempt == ()
    assert plan.pause == (0, 1, 2, 3)


# -- prefill pacing ------------------------------------------------------------------------


def prefill_slack(snapshot: Snapshot, decoding: np.ndarray) -> float:
    """Prefill tokens the iterations until the next plan hide under the memory time of
    ``decoding`` (the requests decode the whole time)."""
    context = snapshot.requests.context_tokens[decoding].astype(np.float64)
    memory = PROFILE.weights_read_s + PROFILE.kv_read_s_per_token * float(context.sum())
    compute = PROFILE.compute_s_per_token * float(context.size)
    iteration = PROFILE.step_overhead_s + max(memory, compute)
    iterations = max(1.0, AndesPolicy.plan_interval_s / iteration)
    return iterations * (memory - compute) / PROFILE.prefill_per_token_s


def paced_rows(waiting: int = 8) -> list[dict[str, float]]:
    # 60 readers with a minute of text buffered, decoding 400-token contexts, and late
    # arrivals with prompts of 50..120 tokens.
    rows: list[dict[str, float]] = [
        {"id": i, "state": State.RUNNING, "prompt": 100, "gen": 300, "arrival": NOW - 20.0,
         "dmax": -40.0, "seq": i, "served": 300, "pre": 1}
        for i in range(60)
    ]
    rows += [
        {"id": 100 + j, "state": State.WAITING, "prompt": 50 + 10 * j, "arrival": NOW - 2.0}
        for j in range(waiting)
    ]
    return rows


def test_andes_paces_starts_to_the_next_iterations_compute_slack() -> None:
    snapshot = make_snapshot(paced_rows(), free_extra=120)
    policy = AndesPolicy()
    assert memory_bound(snapshot, policy)
    table = snapshot.requests
    running = table.state == State.RUNNING
    slack = prefill_slack(snapshot, running)
    unpaced = AndesPolicy(pace_prefill=False).plan(snapshot)
    paced = policy.plan(snapshot)
    assert paced.solver_ran
    # The same requests in the same order, cut where their prompts outgrow the slack.
    assert len(unpaced.admit) > len(paced.admit) >= 1
    assert paced.admit == unpaced.admit[: len(paced.admit)]
    prompts = {int(i): int(p) for i, p in zip(table.request_id, table.prompt_tokens,
                                               strict=True)}
    started = sum(prompts[i] for i in paced.admit)
    assert started <= slack < started + prompts[unpaced.admit[len(paced.admit)]]
    assert paced.notes == {"deferred": float(len(unpaced.admit) - len(paced.admit))}
    assert unpaced.notes == {}


def test_andes_pacing_always_starts_one_and_counts_queued_prefill() -> None:
    rows = paced_rows(waiting=1)
    rows[60]["prompt"] = 1500  # far beyond the slack, but nothing else is starting
    snapshot = make_snapshot(rows, free_extra=200)
    assert prefill_slack(snapshot, snapshot.requests.state == State.RUNNING) < 1500
    assert AndesPolicy().plan(snapshot).admit == (100,)
    # A queued prefill already takes the slack: nothing new starts (the queued one stays).
    rows = paced_rows(waiting=2)
    rows[60]["state"] = State.QUEUED
    rows[60]["prompt"] = 400
    plan = AndesPolicy().plan(make_snapshot(rows, free_extra=200))
    assert plan.admit == () and 100 not in plan.preempt


def test_andes_pacing_counts_recompute_resumes() -> None:
    rows = paced_rows(waiting=0)
    rows += [
        {"id": 200 + j, "state": State.PREEMPTED, "prompt": 100, "gen": 20, "pre": 1,
         "arrival": NOW - 10.0, "dmax": 5.0, "dsum": 20 * 4.0, "seq": 70 + j}
        for j in range(4)
    ]
    snapshot = make_snapshot(rows, free_extra=150)
    unpaced = AndesPolicy(pace_prefill=False).plan(snapshot)
    paced = AndesPolicy().plan(snapshot)
    assert len(unpaced.resume) > 1
    slack = prefill_slack(snapshot, snapshot.requests.state == State.RUNNING)
    assert len(paced.resume) == max(1, int(slack // 120))
    assert paced.resume == unpaced.resume[: len(paced.resume)]


def test_andes_plan_carries_the_preemption_mode() -> None:
    snapshot = make_snapshot(overhead_rows(), free_extra=3)
    plan = make_policy("andes", preemption_mode="swap").plan(snapshot)
    assert plan.preemption_mode == PreemptionMode.SWAP


def test_andes_exact_solver_keeps_the_contract_under_pressure() -> None:
    rows = [
        {"id": i, "state": State.WAITING, "prompt": 100 + 37 * i, "arrival": NOW - 0.4 * i}
        for i in range(12)
    ]
    snapshot = make_snapshot(rows, total=60)
    for name in ("andes", "andes-exact"):
        plan = make_policy(name).plan(snapshot)
        assert plan.solver_ran and plan.admit
        assert_plan_contract(snapshot, plan)
        assert kv_after(snapshot, plan)[0] <= 60 - int(60 * 0.03)
