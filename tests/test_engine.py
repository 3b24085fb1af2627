"""The emulated accelerator: KV accounting, token streams and forced preemption under any plan.

A seeded loop drives engines with random plans (including stale and nonsensical actions),
arrivals, cancellations and steps, and checks the engine's invariants after every operation.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from andes.latency import LatencyProfile, load_profile
from andes.policies import make_policy
from andes.policies.base import HOLDS_KV, Plan, PreemptionMode, State, blocks_for
from andes.qoe import qoe
from andes.sim.engine import FinishedRequest, SimEngine, StepResult

PROFILE = load_profile("a100-opt13b")
BLOCK = PROFILE.block_size


def internals(engine: SimEngine) -> dict[str, np.ndarray]:
    """The engine's own columns (the snapshot leaves out host blocks and prefill progress)."""
    columns: dict[str, np.ndarray] = {name: engine._col(name).copy() for name in engine._ints}
    columns.update({name: engine._fcol(name).copy() for name in engine._floats})
    return columns


def assert_invariants(engine: SimEngine) -> None:
    c = internals(engine)
    state, kv, host = c["state"], c["kv_blocks"], c["host_blocks"]
    assert engine.kv_blocks_free >= 0
    assert np.all(kv >= 0) and np.all(host >= 0)
    assert engine.kv_blocks_free + int(kv.sum()) == engine.kv_blocks_total
    assert engine.host_blocks_free >= 0
    assert engine.host_blocks_free + int(host.sum()) == engine.host_kv_blocks
    holds = np.isin(state, HOLDS_KV)
    context = c["prompt_tokens"] + c["generated_tokens"]
    # KV only where the state says so; a holder's KV covers its whole context.
    assert np.all(kv[~holds] == 0)
    assert np.all(kv[holds] * BLOCK >= context[holds])
    assert np.all(kv[holds] > 0)
    # Host KV only for swapped requests (or swapped ones queued to come back).
    assert np.all(host[~np.isin(state, (State.SWAPPED, State.QUEUED))] == 0)
    assert np.all(host[state == State.SWAPPED] > 0)
    assert np.all(c["generated_tokens"][state == State.PREEMPTED] > 0)
    assert np.all(c["generated_tokens"] < np.minimum(c["output_tokens"], c["max_tokens"]))
    # The snapshot shows the same numbers.
    snapshot = engine.snapshot(0.0)
    assert snapshot.kv_blocks_free == engine.kv_blocks_free
    np.testing.assert_array_equal(snapshot.requests.kv_blocks, kv)
    np.testing.assert_array_equal(snapshot.requests.state, state)


def expected_forced_victims(engine: SimEngine) -> list[int]:
    """Reference: before any queued request starts (vLLM V1 schedules running requests
    first), evict the newest running request until the decoding ones can grow into free KV."""
    probe = copy.deepcopy(engine)
    c = internals(probe)
    running = list(np.flatnonzero(c["state"] == State.RUNNING))
    decoding = {int(r) for r in running if c["prefill_left"][r] == 0}
    context = c["prompt_tokens"] + c["generated_tokens"]
    free = probe.kv_blocks_free
    victims: list[int] = []

    def shortfall() -> int:
        rows = np.array(sorted(decoding), dtype=np.int64)
        need = blocks_for(context[rows], BLOCK) - c["kv_blocks"][rows] if rows.size else []
        return int(np.maximum(need, 0).sum()) - free if rows.size else 0

    while decoding and shortfall() > 0:
        victim = max(running, key=lambda r: c["admitted_seq"][r])
        running.remove(victim)
        decoding.discard(int(victim))
        free += int(c["kv_blocks"][victim])
        victims.append(int(c["request_id"][victim]))
    return victims


class Harness:
    """Drives one engine and records every token it produces."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.now = 0.0
        self.tokens: dict[int, list[float]] = defaultdict(list)
        self.specs: dict[int, dict[str, Any]] = {}
        self.finished: dict[int, FinishedRequest] = {}
        self.cancelled: set[int] = set()
        self.forced = 0

    def add(self, request_id: int, **spec: Any) -> None:
        self.engine.add(request_id, arrival_s=self.now, **spec)
        self.specs[request_id] = {"arrival_s": self.now, **spec}

    def step(self) -> StepResult:
        engine = self.engine
        expected = expected_forced_victims(engine)
        result = engine.step(self.now)
        assert result.start_s == self.now and result.end_s > self.now
        assert result.forced_preemptions.tolist() == expected
        self.forced += len(expected)
        # Tokens: one per producing request, numbered from 0 without gaps across preemptions.
        ids = result.token_request_ids.tolist()
        assert len(set(ids)) == len(ids)
        for request_id, index in zip(ids, result.token_indices.tolist(), strict=True):
            assert index == len(self.tokens[request_id]), f"request {request_id}"
            self.tokens[request_id].append(result.end_s)
        assert result.decode_batch <= len(ids)
        # A request that just produced a token had KV for it (context + 1 before the token).
        c = internals(engine)
        rows = engine.rows_of(np.asarray(ids, dtype=np.int64))
        context = c["prompt_tokens"][rows] + c["generated_tokens"][rows]
        assert np.all(c["kv_blocks"][rows] * BLOCK >= context)
        assert np.all(c["state"][rows] == State.RUNNING)
        for done in result.finished:
            self.check_finished(done, result.end_s)
        self.now = result.end_s
        return result

    def check_finished(self, done: FinishedRequest, at: float) -> None:
        request_id = done.request_id
        assert request_id not in self.finished, "finished twice"
        assert request_id not in self.cancelled
        self.finished[request_id] = done
        spec = self.specs[request_id]
        want = min(int(spec["output_tokens"]), int(spec.get("max_tokens") or 10**9))
        times = np.asarray(self.tokens[request_id])
        assert done.output_tokens == want == times.size
        assert done.finish_s == at == times[-1]
        assert done.first_token_s == times[0]
        assert done.arrival_s == spec["arrival_s"]
        expected = qoe(times - spec["arrival_s"], spec["ttft_s"], spec["tds"])
        assert done.qoe == pytest.approx(expected, abs=1e-9)
        assert engine_rows(self.engine, request_id) == 0

    def cancel(self, request_ids: tuple[int, ...]) -> None:
        engine = self.engine
        rows = engine.rows_of(request_ids)
        held = int(engine._col("kv_blocks")[rows].sum())
        free = engine.kv_blocks_free
        assert engine.cancel(request_ids) == rows.size
        assert engine.kv_blocks_free == free + held
        for request_id in request_ids:
            assert engine_rows(engine, request_id) == 0
            if request_id in self.specs and request_id not in self.finished:
                self.cancelled.add(request_id)


def engine_rows(engine: SimEngine, request_id: int) -> int:
    return int(engine.rows_of((request_id,)).size)


def random_plan(rng: np.random.Generator, ids: list[int], unknown: int) -> Plan:
    def pick() -> tuple[int, ...]:
        pool = [*ids, unknown]
        count = int(rng.integers(0, min(len(pool), 4) + 1))
        return tuple(int(i) for i in rng.choice(pool, size=count, replace=False))

    mode = PreemptionMode.SWAP if rng.random() < 0.5 else PreemptionMode.RECOMPUTE
    return Plan(preempt=pick(), pause=pick(), resume=pick(), admit=pick(), preemption_mode=mode)


def random_profile(rng: np.random.Generator) -> LatencyProfile:
    if rng.random() < 0.5:
        # Small prefill budget: prompts take several chunked iterations.
        return dataclasses.replace(PROFILE, max_batched_tokens=int(rng.integers(16, 200)))
    return PROFILE


@pytest.mark.parametrize("seed", range(8))
def test_engine_invariants_under_random_plans(seed: int) -> None:
    rng = np.random.default_rng(seed)
    engine = SimEngine(
        random_profile(rng),
        kv_blocks_total=int(rng.integers(16, 60)),
        max_batch=int(rng.choice([2, 3, 8, 256])),
        host_kv_blocks=int(rng.choice([0, 8, 40])),
    )
    h = Harness(engine)
    next_id = 0
    for _ in range(400):
        ids = [int(i) for i in engine.snapshot(h.now).requests.request_id]
        op = rng.random()
        if op < 0.15 and next_id < 60:
            prompt = int(rng.integers(1, 180))
            output = int(rng.integers(1, 60))
            cap = None if rng.random() < 0.7 else int(rng.integers(1, 80))
            h.add(next_id, prompt_tokens=prompt, output_tokens=output,
                  ttft_s=float(rng.uniform(0.3, 3.0)), tds=float(rng.uniform(2.0, 12.0)),
                  max_tokens=cap)
            next_id += 1
        elif op < 0.40:
            engine.apply(random_plan(rng, ids, unknown=10_000 + next_id))
        elif op < 0.45:
            engine.apply(make_policy("fcfs").plan(engine.snapshot(h.now)))
        elif op < 0.48 and ids:
            h.cancel((int(rng.choice(ids)), 99_999))
        elif engine.has_work():
            h.step()
        else:
            h.now += float(rng.uniform(0.0, 0.5))
        assert_invariants(engine)
    # Drain: run everything that is left to completion.
    for _ in range(20_000):
        if len(engine) == 0:
            break
        snapshot = engine.snapshot(h.now)
        table = snapshot.requests
        paused = tuple(int(i) for i in table.request_id[table.state == State.PAUSED])
        plan = make_policy("fcfs").plan(snapshot)
        engine.apply(dataclasses.replace(plan, resume=plan.resume + paused))
        h.step()
        assert_invariants(engine)
    assert len(engine) == 0
    assert engine.kv_blocks_free == engine.kv_blocks_total
    assert engine.host_blocks_free == engine.host_kv_blocks
    assert set(h.finished) | h.cancelled == set(h.specs)
    assert not set(h.finished) & h.cancelled
    assert h.finished, "the run must finish requests to check anything"


def test_random_runs_exercise_preemption_and_swap() -> None:
    """The random loop above is only meaningful if it hits the interesting paths."""
    forced = planned = swapped = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        engine = SimEngine(random_profile(rng), kv_blocks_total=int(rng.integers(16, 60)),
                           max_batch=int(rng.choice([2, 3, 8, 256])),
                           host_kv_blocks=int(rng.choice([0, 8, 40])))
        h = Harness(engine)
        for request_id in range(20):
            h.add(request_id, prompt_tokens=int(rng.integers(1, 180)),
                  output_tokens=int(rng.integers(20, 60)), ttft_s=1.0, tds=4.0)
        for _ in range(300):
            ids = [int(i) for i in engine.snapshot(h.now).requests.request_id]
            if not ids:
                break
            if rng.random() < 0.3:
                engine.apply(random_plan(rng, ids, unknown=-1))
            engine.apply(make_policy("fcfs").plan(engine.snapshot(h.now)))
            if engine.has_work():
                h.step()
            swapped += int(np.sum(engine._col("host_blocks") > 0))
        forced += engine.preemptions_forced
        planned += engine.preemptions_planned
    assert forced > 0 and planned > 0 and swapped > 0


# -- directed cases -------------------------------------------------------------------------


def started_engine(blocks: int, *, host: int = 0, prompts: tuple[int, ...] = (31, 31)) -> Harness:
    h = Harness(SimEngine(PROFILE, kv_blocks_total=blocks, host_kv_blocks=host))
    for i, prompt in enumerate(prompts):
        h.add(i, prompt_tokens=prompt, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=tuple(range(len(prompts)))))
    return h


def test_forced_preemption_takes_the_newest_request_when_decode_outgrows_kv() -> None:
    # Prompts of 31 tokens take 2 blocks each (31 + 1 next token = 32). After the prefill
    # samples token 0, both need a third block to decode: 4 blocks hold only one of them.
    h = started_engine(4)
    first = h.step()
    assert sorted(first.token_request_ids.tolist()) == [0, 1]
    assert first.forced_preemptions.size == 0
    second = h.step()
    assert second.forced_preemptions.tolist() == [1]  # admitted after 0
    assert second.token_request_ids.tolist() == [0]
    snapshot = h.engine.snapshot(h.now)
    assert snapshot.requests.state.tolist() == [State.RUNNING, State.PREEMPTED]
    assert snapshot.requests.kv_blocks.tolist() == [3, 0]
    assert h.engine.preemptions_forced == 1 and h.engine.preemptions_planned == 0


def test_no_forced_preemption_while_decode_growth_fits() -> None:
    # Two requests of 31 + 16 tokens still fit in 3 blocks each; the 17th token needs a 4th.
    h = started_engine(6)
    for _ in range(17):
        assert h.step().forced_preemptions.size == 0
    assert h.engine.preemptions_forced == 0
    assert len(h.tokens[0]) == len(h.tokens[1]) == 17
    assert h.step().forced_preemptions.tolist() == [1]


def test_forced_victim_is_the_latest_admission_not_the_latest_arrival() -> None:
    h = Harness(SimEngine(PROFILE, kv_blocks_total=6))
    h.add(0, prompt_tokens=31, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.add(1, prompt_tokens=31, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.add(2, prompt_tokens=31, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(2, 0, 1)))  # admission order 2, 0, 1
    h.step()
    result = h.step()
    # Three decoders need 9 blocks, 6 exist: evicting 1 (admitted last, arrived second)
    # frees enough for the other two.
    assert result.forced_preemptions.tolist() == [1]
    assert sorted(result.token_request_ids.tolist()) == [0, 2]


def test_token_indices_continue_after_recompute_and_qoe_matches_the_stream() -> None:
    h = started_engine(40, prompts=(50,))
    for _ in range(5):
        h.step()
    h.engine.apply(Plan(preempt=(0,)))
    assert h.engine.snapshot(h.now).requests.state.tolist() == [State.PREEMPTED]
    h.now += 3.0  # the user waits
    h.engine.apply(Plan(resume=(0,)))
    # Nothing reused its freed blocks: the prefix cache still holds the 3 full blocks of its
    # 55 tokens, so only the other 7 are prefilled again; token 5 follows.
    recompute = h.step()
    assert recompute.prefill_tokens == 55 - 3 * BLOCK
    assert recompute.token_indices.tolist() == [5]
    while len(h.engine):
        h.step()
    assert list(h.finished) == [0]
    assert h.finished[0].preemptions == 1


def preempted_with_cache(free_after: int) -> Harness:
    """Request 0 (55 tokens in 4 blocks) preempted with ``free_after`` blocks free ahead of
    its own in the free queue; request 1 (prompt 100, 7 blocks) waits to be admitted."""
    h = started_engine(4 + free_after, prompts=(50,))
    for _ in range(5):
        h.step()
    h.add(1, prompt_tokens=100, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(preempt=(0,)))
    return h


@pytest.mark.parametrize(
    ("free_ahead", "reused_blocks"),
    [
        (7, 3),  # request 1's 7 blocks come from the 7 ahead: all 3 full blocks survive
        (5, 2),  # 2 of its 4 blocks taken, tail first: the partial one and block 3
        (4, 1),  # 3 taken: only block 1 survives
        (3, 0),  # all 4 taken: a full recompute
    ],
)
def test_recompute_reuses_the_blocks_the_prefix_cache_still_holds(
    free_ahead: int, reused_blocks: int
) -> None:
    h = preempted_with_cache(free_ahead)
    h.engine.apply(Plan(admit=(1,)))
    h.step()  # request 1 takes 7 blocks from the front of the free queue
    h.cancel((1,))  # its blocks go to the back: they do not protect request 0's
    h.engine.apply(Plan(resume=(0,)))
    assert h.step().prefill_tokens == 55 - reused_blocks * BLOCK


def test_prefix_cache_hits_shift_the_queue_for_blocks_behind() -> None:
    # Requests 0 and 1 are preempted in that order with nothing free: 0's 4 blocks are at the
    # front of the free queue, 1's 4 behind them. 0 takes its own back (a cache hit, not an
    # allocation), then a new request allocates 4 blocks: they are 1's, not 0's.
    h = started_engine(8, prompts=(50, 50))
    for _ in range(5):
        h.step()
    h.engine.apply(Plan(preempt=(0, 1)))
    h.engine.apply(Plan(resume=(0,)))
    assert h.step().prefill_tokens == 55 - 3 * BLOCK
    h.add(2, prompt_tokens=50, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(2,)))
    h.step()
    h.cancel((0, 2))
    h.engine.apply(Plan(resume=(1,)))
    assert h.step().prefill_tokens == 55


def test_no_admission_in_an_iteration_that_preempts() -> None:
    # vLLM V1 starts waiting requests only when the running ones did not need a preemption.
    h = started_engine(5)  # 0 and 1 decode in 4 blocks; each needs a 3rd after token 0
    h.step()
    h.add(2, prompt_tokens=1, output_tokens=100, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(2,)))
    result = h.step()  # 0 grows into the free block, 1 is preempted: 2 stays queued
    assert result.forced_preemptions.tolist() == [1]
    assert result.token_request_ids.tolist() == [0]
    assert h.engine.snapshot(h.now).requests.state.tolist() == [
        State.RUNNING, State.PREEMPTED, State.QUEUED
    ]


def test_swap_preemption_moves_kv_to_host_and_back_without_prefill() -> None:
    h = started_engine(40, host=20, prompts=(50,))
    for _ in range(3):
        h.step()
    held = int(h.engine._col("kv_blocks")[0])
    h.engine.apply(Plan(preempt=(0,), preemption_mode=PreemptionMode.SWAP))
    assert h.engine.snapshot(h.now).requests.state.tolist() == [State.SWAPPED]
    assert h.engine.host_blocks_free == 20 - held
    assert h.engine.kv_blocks_free == 40
    h.engine.apply(Plan(resume=(0,)))
    result = h.step()
    assert result.prefill_tokens == 0
    assert result.token_indices.tolist() == [3]
    # Both copies stall the iterations that do them.
    swap_out_and_in = 2 * PROFILE.swap_time(53.0)
    assert result.duration_s >= swap_out_and_in
    assert h.engine.host_blocks_free == 20
    assert_invariants(h.engine)


def test_swap_without_host_room_falls_back_to_recompute() -> None:
    h = started_engine(40, host=1, prompts=(50,))
    h.step()
    h.engine.apply(Plan(preempt=(0,), preemption_mode=PreemptionMode.SWAP))
    assert h.engine.snapshot(h.now).requests.state.tolist() == [State.PREEMPTED]
    assert h.engine.host_blocks_free == 1


def test_cancel_frees_kv_immediately() -> None:
    h = started_engine(20, prompts=(100, 60))
    h.step()
    held = h.engine.snapshot(h.now).requests.kv_blocks.tolist()
    assert held == [7, 4]
    free = h.engine.kv_blocks_free
    assert h.engine.cancel((0, 12345)) == 1
    assert h.engine.kv_blocks_free == free + 7
    assert h.engine.snapshot(h.now).requests.request_id.tolist() == [1]
    assert h.engine.cancel((0,)) == 0
    assert_invariants(h.engine)


def test_chunked_prefill_produces_the_first_token_when_the_prompt_is_done() -> None:
    profile = dataclasses.replace(PROFILE, max_batched_tokens=40)
    h = Harness(SimEngine(profile, kv_blocks_total=40))
    h.add(0, prompt_tokens=100, output_tokens=3, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(0,)))
    steps = [h.step() for _ in range(3)]
    assert [s.prefill_tokens for s in steps] == [40, 40, 20]
    assert [s.token_request_ids.tolist() for s in steps] == [[], [], [0]]
    while len(h.engine):
        h.step()
    assert h.finished[0].output_tokens == 3


def test_stale_actions_are_ignored() -> None:
    h = started_engine(40, prompts=(50, 50))
    h.add(2, prompt_tokens=20, output_tokens=5, ttft_s=1.0, tds=4.0)
    h.step()
    before = internals(h.engine)
    # Admit running ones, resume ones that never ran, pause a waiting one, unknown ids.
    h.engine.apply(Plan(admit=(0, 1, 77), resume=(2, 78), pause=(2,), preempt=(2, 79)))
    after = internals(h.engine)
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values, err_msg=name)


def test_preempting_a_queued_request_puts_it_back_where_it_was() -> None:
    h = started_engine(40, prompts=(50,))
    h.add(1, prompt_tokens=20, output_tokens=5, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(1,)))
    h.engine.apply(Plan(preempt=(1,)))
    assert h.engine.snapshot(h.now).requests.state.tolist()[1] == State.WAITING
    h.step()
    h.engine.apply(Plan(preempt=(0,)))
    h.engine.apply(Plan(resume=(0,)))
    h.engine.apply(Plan(preempt=(0,)))
    snapshot = h.engine.snapshot(h.now)
    assert snapshot.requests.state.tolist() == [State.PREEMPTED, State.WAITING]
    assert snapshot.requests.preemptions.tolist() == [1, 0]
    assert_invariants(h.engine)


def test_paused_requests_keep_kv_and_produce_nothing() -> None:
    h = started_engine(40, prompts=(50, 50))
    h.step()
    h.engine.apply(Plan(pause=(1,)))
    held = h.engine.snapshot(h.now).requests.kv_blocks.tolist()
    for _ in range(20):
        assert h.step().token_request_ids.tolist() == [0]
    now_held = h.engine.snapshot(h.now).requests.kv_blocks.tolist()
    assert now_held[1] == held[1] and now_held[0] > held[0]  # only request 0 grew
    h.engine.apply(Plan(resume=(1,)))
    assert sorted(h.step().token_request_ids.tolist()) == [0, 1]
    assert h.tokens[1] and len(h.tokens[1]) == 2


def test_max_batch_bounds_the_running_set() -> None:
    """Never more than ``max_batch`` sequences run in one iteration, whatever the plans."""
    h = Harness(SimEngine(PROFILE, kv_blocks_total=100, max_batch=2))
    for i in range(3):
        h.add(i, prompt_tokens=20, output_tokens=50, ttft_s=1.0, tds=4.0)
    h.engine.apply(Plan(admit=(0, 1, 2)))
    result = h.step()
    assert result.token_request_ids.size == 2
    h.engine.apply(Plan(pause=(0,)))
    h.step()  # 2 starts in the free slot
    h.engine.apply(Plan(resume=(0,)))  # a stale resume: the batch is full again
    for _ in range(3):
        result = h.step()
        running = int(np.sum(h.engine.snapshot(h.now).requests.state == State.RUNNING))
        assert running <= 2
        assert result.decode_batch <= 2
