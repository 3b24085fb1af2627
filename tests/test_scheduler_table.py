"""The scheduler's request table, wire conversions, planner fallback and placement (pure)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from andes.latency import load_profile
from andes.policies import FcfsPolicy, Plan, PreemptionMode, State, make_policy
from andes.qoe import TokenPacer
from andes.v1 import scheduler_pb2
from scheduler_service.convert import plan_to_proto, profile_from_proto, state_from_proto
from scheduler_service.placement import (
    NoLiveWorkerError,
    QueuesFullError,
    TooLargeError,
    WorkerLoad,
    choose_worker,
)
from scheduler_service.planner import Planner, leaves_idle
from scheduler_service.table import (
    RequestMeta,
    SchedulerTable,
    advance_pacer,
    pacer_summary,
)
from worker.wire import plan_from_proto, profile_to_proto, state_to_proto

PROFILE = load_profile("a100-opt13b")
NOW = 1_000_000.0


def registration(worker_id: str = "w0", kv_blocks: int = 100) -> scheduler_pb2.Registration:
    return scheduler_pb2.Registration(
        worker_id=worker_id,
        backend="sim",
        model="m",
        kv_blocks_total=kv_blocks,
        block_size=PROFILE.block_size,
        max_batch=PROFILE.max_batch,
        max_batched_tokens=PROFILE.max_batched_tokens,
        profile=profile_to_proto(PROFILE),
    )


def meta(request_id: str, arrival: float = NOW, prompt: int = 40, max_tokens: int = 50,
         ttft: float = 1.0, tds: float = 5.0) -> RequestMeta:
    return RequestMeta(request_id, prompt, max_tokens, ttft, tds, arrival,
                       token_stream_key=f"k:{request_id}")


def progress(request_id: str, generated: int, state: State, kv: int) -> (
    scheduler_pb2.RequestProgress
):
    return scheduler_pb2.RequestProgress(
        request_id=request_id, generated_tokens=generated, state=state_to_proto(state),
        kv_blocks=kv,
    )


def report(*items: scheduler_pb2.RequestProgress, end: float, free: int = 80,
           finished: tuple[str, ...] = (), forced: tuple[str, ...] = (),
           plan_version: int = 0) -> scheduler_pb2.StepReport:
    return scheduler_pb2.StepReport(
        step=1, start_unix_s=end - 0.02, duration_s=0.02, requests=list(items),
        kv_blocks_free=free, kv_blocks_total=100,
        finished=[scheduler_pb2.FinishedRequest(request_id=r, finish_reason=2)
                  for r in finished],
        forced_preemptions=list(forced), plan_version=plan_version,
    )


def table_with(*ids: str, kv_blocks: int = 100) -> SchedulerTable:
    table = SchedulerTable()
    table.register_worker(registration(kv_blocks=kv_blocks), PROFILE, 1, NOW)
    for i, rid in enumerate(ids):
        table.add(meta(rid, arrival=NOW + i), "w0")
    return table


# -- wire conversions ----------------------------------------------------------------------


def test_states_round_trip_shifted_by_one() -> None:
    for state in State:
        assert state_to_proto(state) == int(state) + 1
        assert state_from_proto(state_to_proto(state)) is state
    assert state_to_proto(State.PAUSED) == scheduler_pb2.REQUEST_STATE_PAUSED
    for bad in (scheduler_pb2.REQUEST_STATE_UNSPECIFIED, len(State) + 1):
        with pytest.raises(ValueError):
            state_from_proto(bad)


def test_profile_round_trips_through_registration() -> None:
    back = profile_from_proto(profile_to_proto(PROFILE))
    assert back == PROFILE
    assert back.provenance == PROFILE.provenance
    on_cpu = dataclasses.replace(PROFILE, attention_s_per_token=1.5e-6)
    assert profile_from_proto(profile_to_proto(on_cpu)) == on_cpu
    broken = profile_to_proto(PROFILE)
    broken.block_size = 0
    with pytest.raises(ValueError, match="block_size"):
        profile_from_proto(broken)


def test_plan_maps_int_ids_back_to_names() -> None:
    table = table_with("a", "b", "c")
    ids = {table.name_of(e.int_id): e.int_id for e in table.requests.values()}
    plan = Plan(preempt=(ids["c"],), pause=(ids["b"],), admit=(ids["a"],),
                preemption_mode=PreemptionMode.SWAP)
    message = plan_to_proto(plan, table.name_of, 7)
    assert message.plan_version == 7
    spec = plan_from_proto(message)
    assert (spec.preempt, spec.pause, spec.resume, spec.admit) == (("c",), ("b",), (), ("a",))
    assert spec.preemption_mode is PreemptionMode.SWAP
    assert spec.version == 7


# -- the table -----------------------------------------------------------------------------


def test_snapshot_from_submissions_and_step_reports() -> None:
    table = table_with("a", "b", "c", "d")
    empty = table.snapshot("w0", NOW + 5)
    assert len(empty.requests) == 4
    assert np.all(empty.requests.state == State.WAITING)
    assert empty.kv_blocks_free == 100 and empty.kv_blocks_total == 100

    effects = table.apply_report("w0", report(
        progress("a", 3, State.RUNNING, 4),
        progress("b", 1, State.RUNNING, 4),
        progress("c", 0, State.QUEUED, 0),
        end=NOW + 6, free=92,
    ), NOW + 6)
    assert effects.admitted == 2 and not effects.stale
    effects = table.apply_report("w0", report(
        progress("a", 5, State.RUNNING, 4),
        progress("b", 1, State.PREEMPTED, 0),
        progress("c", 2, State.PAUSED, 3),
        progress("d", 0, State.WAITING, 0),
        end=NOW + 7, free=93, forced=("b",),
    ), NOW + 7)
    assert effects.preempted == 1 and effects.forced == ["b"] and effects.admitted == 1

    snap = table.snapshot("w0", NOW + 8)
    t = snap.requests
    names = [table.name_of(int(i)) for i in t.request_id]
    assert names == ["a", "b", "c", "d"]  # placement order, every array aligned with it
    for column in (t.state, t.arrival_s, t.ttft_s, t.tds, t.prompt_tokens, t.generated_tokens,
                   t.max_tokens, t.digest_max, t.delay_sum, t.kv_blocks, t.preemptions,
                   t.admitted_seq, t.served_since_admit):
        assert column.shape == (4,)
    assert list(t.state) == [State.RUNNING, State.PREEMPTED, State.PAUSED, State.WAITING]
    assert list(t.generated_tokens) == [5, 1, 2, 0]
    assert list(t.kv_blocks) == [4, 0, 3, 0]
    assert list(t.preemptions) == [0, 1, 0, 0]
    assert list(t.arrival_s) == [NOW, NOW + 1, NOW + 2, NOW + 3]
    assert t.admitted_seq[0] < t.admitted_seq[2] and t.admitted_seq[3] == -1
    assert list(t.served_since_admit) == [5, 1, 2, 0]
    assert snap.kv_blocks_free == 93 and snap.now_s == NOW + 8
    assert snap.profile.kv_blocks_total == 100  # the registration's figure wins
    assert math.isinf(t.digest_max[3]) and t.digest_max[3] < 0


def test_generated_tokens_feed_the_pacer_like_the_client_would() -> None:
    table = table_with("a")
    pacer = TokenPacer(ttft=1.0, tds=5.0, arrival_s=NOW)
    for count, end in ((2, NOW + 1.5), (3, NOW + 1.6), (7, NOW + 3.0)):
        table.apply_report("w0", report(progress("a", count, State.RUNNING, 4), end=end),
                           end + 0.001)
        pacer.deliver(count - pacer.count, end)
    k, digest, delay = pacer_summary(table.requests["a"])
    assert k == pacer.count == 7
    assert digest == pytest.approx(pacer.digest_max)
    assert delay == pytest.approx(pacer.delay_sum)


def test_advance_pacer_matches_the_pacer_token_by_token() -> None:
    pacer = TokenPacer(ttft=0.5, tds=4.0)
    digest, delay = -math.inf, 0.0
    for n, at in ((1, 0.2), (4, 0.9), (2, 3.0), (5, 3.1)):
        digest, delay = advance_pacer(pacer.count, digest, delay, n, at, 0.5, 4.0)
        pacer.deliver(n, at)
        assert (digest, delay) == pytest.approx((pacer.digest_max, pacer.delay_sum))


def test_delivery_reports_win_and_in_flight_tokens_extend_them() -> None:
    table = table_with("a")
    table.apply_report("w0", report(progress("a", 6, State.RUNNING, 4), end=NOW + 2), NOW + 2)
    client = TokenPacer(ttft=1.0, tds=5.0, arrival_s=NOW)
    client.deliver(4, NOW + 2.5)  # the client got 4 of the 6 tokens, later than generated
    entry = table.apply_delivery(scheduler_pb2.DeliveryProgress(
        request_id="a", delivered_tokens=4, digest_max_s=client.digest_max,
        delay_sum_s=client.delay_sum, arrival_unix_s=NOW,
    ))
    assert entry is not None
    k, digest, delay = pacer_summary(entry)
    client.deliver(2, NOW + 2)  # the two in flight count as delivered when generated
    assert k == 6
    assert (digest, delay) == pytest.approx((client.digest_max, client.delay_sum))
    # An older report (fewer tokens) does not roll the summary back.
    table.apply_delivery(scheduler_pb2.DeliveryProgress(request_id="a", delivered_tokens=1))
    assert entry.delivered_tokens == 4
    assert table.apply_delivery(scheduler_pb2.DeliveryProgress(request_id="zz")) is None


def test_finished_requests_leave_and_stragglers_are_stale() -> None:
    table = table_with("a", "b")
    int_a = table.requests["a"].int_id
    effects = table.apply_report("w0", report(progress("b", 1, State.RUNNING, 4),
                                              end=NOW + 1, finished=("a", "nope")), NOW + 1)
    assert effects.finished == ["a"]
    assert "a" not in table.requests and "a" not in table.workers["w0"].requests
    with pytest.raises(KeyError):
        table.name_of(int_a)
    assert table.forgotten("a")
    late = table.apply_report("w0", report(progress("a", 9, State.RUNNING, 4),
                                           progress("b", 2, State.RUNNING, 4), end=NOW + 2),
                              NOW + 2)
    assert late.stale == ["a"]
    assert [table.name_of(int(i)) for i in table.snapshot("w0", NOW).requests.request_id] == [
        "b"
    ]
    with pytest.raises(KeyError):
        table.add(meta("b"), "w0")


def test_plan_version_catches_up_with_a_worker_that_outlived_us() -> None:
    table = table_with("a")
    table.apply_report("w0", report(end=NOW + 1, plan_version=41), NOW + 1)
    view = table.workers["w0"]
    assert view.plan_version_applied == 41 and view.plan_version_sent == 41


def test_registration_reconciles_held_requests() -> None:
    table = table_with("mine", "lost")
    table.add(meta("gone"), "w0")
    table.remove("gone")
    table.register_worker(registration(), PROFILE, 2, NOW + 1)  # a new session
    stale, missing = table.apply_registration("w0", [
        progress("mine", 3, State.RUNNING, 4),
        progress("gone", 1, State.RUNNING, 4),
        progress("adopted", 5, State.RUNNING, 6),
    ], NOW + 1)
    assert stale == ["gone"]
    assert missing == ["lost"]
    assert table.requests["mine"].generated_tokens == 3
    adopted = table.requests["adopted"]
    assert adopted.generated_tokens == 5 and adopted.state == State.RUNNING
    assert adopted.meta.prompt_tokens >= 1 and adopted.meta.max_tokens > 5


def test_dead_worker_orphans_then_moves() -> None:
    table = table_with("a")
    table.register_worker(registration("w1"), PROFILE, 2, NOW)
    table.apply_report("w0", report(progress("a", 4, State.RUNNING, 4), end=NOW + 1), NOW + 1)
    assert table.queue_length() == 0
    table.mark_dead("w0", NOW + 2)
    assert [e.request_id for e in table.orphans()] == ["a"]
    assert table.queue_length() == 1
    table.move(table.requests["a"], "w1")
    entry = table.requests["a"]
    assert entry.worker_id == "w1" and entry.resume_from_tokens == 4
    assert entry.state == State.WAITING and entry.orphaned_at is None
    assert not table.orphans() and "a" in table.workers["w1"].requests


OPS = st.lists(st.tuples(
    st.sampled_from(["add", "step", "finish", "die_and_move", "reregister"]),
    st.integers(0, 7), st.integers(1, 40),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_kv_demand_stays_the_sum_over_each_workers_requests(ops: list[tuple[str, int, int]]) -> (
    None
):
    """Placement reads a running total; any sequence of table changes keeps it exact."""
    table = SchedulerTable()
    for worker_id in ("w0", "w1"):
        table.register_worker(registration(worker_id), PROFILE, 1, NOW)
    session = 1
    for n, (op, pick, amount) in enumerate(ops):
        rid = f"r{pick}"
        entry = table.requests.get(rid)
        if op == "add" and entry is None:
            table.add(meta(rid, prompt=amount), f"w{pick % 2}")
        elif op == "step" and entry is not None:
            table.apply_report(entry.worker_id, report(progress(
                rid, entry.generated_tokens + amount, State.RUNNING, 1), end=NOW + n), NOW + n)
        elif op == "finish" and entry is not None:
            table.apply_report(entry.worker_id, report(end=NOW + n, finished=(rid,)), NOW + n)
        elif op == "die_and_move" and entry is not None:
            source = entry.worker_id
            table.mark_dead(source, NOW + n)
            for orphan in table.orphans():
                table.move(orphan, "w1" if source == "w0" else "w0")
            table.register_worker(registration(source), PROFILE, session := session + 1, NOW)
        elif op == "reregister":
            block_size = 8 * (1 + amount % 4)
            reg = registration(f"w{pick % 2}")
            reg.block_size = block_size
            table.register_worker(reg, PROFILE, session := session + 1, NOW)
        for view in table.workers.values():
            assert table.kv_demand(view.worker_id) == sum(
                (e.meta.prompt_tokens + e.generated_tokens) // view.block_size + 1
                for e in view.requests.values()
            )


# -- the planner ---------------------------------------------------------------------------


def test_planner_never_leaves_a_worker_idle_with_waiting_requests() -> None:
    table = table_with("a", "b")
    snap = table.snapshot("w0", NOW + 1)
    assert leaves_idle(Plan(), snap)
    assert not leaves_idle(Plan(admit=(int(snap.requests.request_id[0]),)), snap)

    class Lazy:
        name = "lazy"

        def plan(self, snapshot: object) -> Plan:
            return Plan()

    plan = Planner(Lazy()).plan(snap)
    assert plan == FcfsPolicy().plan(snap)
    assert plan.admit  # FCFS admits both, in arrival order


def test_every_shared_policy_plans_a_table_snapshot() -> None:
    table = table_with("a", "b", "c", kv_blocks=8)
    table.apply_report("w0", report(progress("a", 30, State.RUNNING, 5), end=NOW + 3, free=3),
                       NOW + 3)
    snap = table.snapshot("w0", NOW + 4)
    for name in ("fcfs", "rr", "lqf", "andes"):
        plan = Planner(make_policy(name)).plan(snap)
        known = set(snap.requests.request_id.tolist())
        assert set(plan.preempt + plan.pause + plan.resume + plan.admit) <= known


# -- placement -----------------------------------------------------------------------------


def load(worker_id: str, unfinished: int = 0, demand: int = 0, free: int = 100,
         live: bool = True, total: int = 100) -> WorkerLoad:
    return WorkerLoad(worker_id, live, unfinished, demand, free, total, 16)


def test_placement_spreads_load_across_workers() -> None:
    counts = {"w0": 0, "w1": 0, "w2": 0}
    for _ in range(30):
        loads = [load(w, unfinished=n, demand=3 * n) for w, n in counts.items()]
        counts[choose_worker(loads, prompt_tokens=30, max_tokens=10)] += 1
    assert counts == {"w0": 10, "w1": 10, "w2": 10}


def test_placement_weighs_kv_use_then_free_kv() -> None:
    busy_kv = load("w0", unfinished=4, demand=90, free=10)
    light_kv = load("w1", unfinished=4, demand=10, free=90)
    assert choose_worker([busy_kv, light_kv], prompt_tokens=10, max_tokens=10) == "w1"
    assert choose_worker([load("w0", free=10), load("w1", free=60)],
                         prompt_tokens=10, max_tokens=10) == "w1"


def test_placement_skips_dead_full_and_too_small_workers() -> None:
    assert choose_worker([load("w0", live=False), load("w1", unfinished=50)],
                         prompt_tokens=10, max_tokens=10) == "w1"
    with pytest.raises(NoLiveWorkerError):
        choose_worker([load("w0", live=False)], prompt_tokens=10, max_tokens=10)
    with pytest.raises(NoLiveWorkerError):
        choose_worker([], prompt_tokens=10, max_tokens=10)
    assert choose_worker([load("w0", unfinished=3), load("w1", unfinished=9, total=1000)],
                         prompt_tokens=1000, max_tokens=1000) == "w1"
    with pytest.raises(TooLargeError, match="KV capacity"):
        choose_worker([load("w0")], prompt_tokens=1000, max_tokens=1000)
    with pytest.raises(QueuesFullError):
        choose_worker([load("w0", unfinished=2)], prompt_tokens=10, max_tokens=10, max_queue=2)
