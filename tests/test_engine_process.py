"""The engine in a child process (``worker/engine_process.py``): calls and their answers cross
a real pipe to a real child, with the sim backend as the engine (the vllm backend runs the same
way in the cluster tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from andes.policies.base import State
from andes.v1 import generation_pb2
from worker.engine import Engine, Finished, PlanSpec, RequestSpec, TokenRun
from worker.engine_process import (
    EngineDiedError,
    EngineProcess,
    _columns,
    _runs,
    autogroup_nice,
    avoid_cpus,
    parse_cpus,
    pin_to_cpus,
)
from worker.service import WorkerConfig, build_engine
from worker.sim_backend import SimBackend


def _spec(request_id: str, max_tokens: int = 4) -> RequestSpec:
    return RequestSpec(
        request_id=request_id, prompt_tokens=8, max_tokens=max_tokens,
        arrival_unix_s=time.time(), ttft_s=1.0, tds=5.0, payload_key="p", token_stream_key="s",
    )


def _config(profile: str = "a100-opt13b") -> WorkerConfig:
    return WorkerConfig(worker_id="w", scheduler="127.0.0.1:1", redis_url="redis://x",
                        backend="sim", profile=profile, kv_blocks=100)


@pytest.fixture()
def engine() -> Iterator[EngineProcess]:
    process = EngineProcess(build_engine, _config())
    yield process
    process.close()


def test_calls_run_in_the_child_and_answer_like_the_engine(engine: EngineProcess) -> None:
    local = build_engine(_config())
    assert engine.pid is not None and engine.pid != os.getpid()
    assert (engine.backend, engine.model, engine.needs_payload) == (
        local.backend, local.model, local.needs_payload)
    assert engine.profile == local.profile
    assert engine.kv_blocks_free == local.kv_blocks_free == 100
    assert not engine.has_work()

    assert engine.add([_spec("a")]) == [] and engine.holds("a") and not engine.holds("b")
    engine.apply(PlanSpec(version=1, admit=("a",)))
    assert engine.has_work()
    tokens, finished = 0, []
    while engine.has_work():
        outcome = engine.step(time.time())
        tokens += sum(len(run.token_ids) for run in outcome.tokens)
        finished += outcome.finished
        held = engine.progress()  # answered from the step's reply
        assert all(p.request_id == "a" for p in held)
    assert tokens == 4 and engine.kv_blocks_free == 100
    assert [(f.request_id, f.generated_tokens) for f in finished] == [("a", 4)]
    assert not engine.holds("a") and engine.cancel(("a",)) == []
    engine.add([_spec("b")])
    assert [f.request_id for f in engine.cancel(("b",))] == ["b"] and not engine.holds("b")


def test_progress_after_a_change_asks_the_child(engine: EngineProcess) -> None:
    engine.add([_spec("a")])
    engine.step(time.time())  # nothing admitted: the step's progress shows "a" waiting
    engine.add([_spec("b")])
    states = {p.request_id: p.state for p in engine.progress()}
    assert states == {"a": State.WAITING, "b": State.WAITING}


def test_an_engine_error_reaches_the_caller_and_the_engine_goes_on(
        engine: EngineProcess) -> None:
    with pytest.raises(TypeError):
        engine.cancel(5)  # type: ignore[arg-type]
    engine.apply(PlanSpec(version=1, admit=5))  # type: ignore[arg-type]  # logged, skipped
    assert engine.add([_spec("a")]) == []
    assert engine.holds("a")


def _ahead_computed() -> None:
    """Give the child time to compute its next step (the sim backend's are instant)."""
    time.sleep(0.3)


def test_the_child_runs_ahead_and_its_progress_matches_the_engine(
        engine: EngineProcess) -> None:
    """Step by step, the proxy's held requests (sent as changes) are the engine's own."""
    local = build_engine(_config())
    plan = PlanSpec(version=1, admit=("a", "b", "c"))
    for name, tokens in (("a", 3), ("b", 6), ("c", 9)):
        assert engine.add([_spec(name, tokens)]) == local.add([_spec(name, tokens)]) == []
    engine.apply(plan)
    local.apply(plan)
    steps = 0
    while engine.has_work():
        outcome, expected = engine.step(time.time()), local.step(time.time())
        _ahead_computed()
        assert outcome.tokens == expected.tokens and outcome.finished == expected.finished
        assert engine.progress() == local.progress()
        steps += 1
    assert steps == 9 and not local.has_work() and engine.progress() == []


def test_token_runs_cross_the_pipe_as_columns_and_come_back_as_they_were() -> None:
    runs = [TokenRun("a", 0, (1, 2), "hi"), TokenRun("b", 5, (7,), "\u00e9"),
            TokenRun("c", 9, (), "")]
    back = _runs(_columns(runs))
    assert back == runs and all(type(run) is TokenRun for run in back)
    assert _runs(_columns([])) == []


def test_a_cancel_takes_the_request_out_of_the_step_computed_ahead(
        engine: EngineProcess) -> None:
    """The worker ends a cancelled stream at once: no token of it may come after."""
    engine.add([_spec("a", 10)])
    engine.add([_spec("b", 10)])
    engine.apply(PlanSpec(version=1, admit=("a", "b")))
    first = engine.step(time.time())
    assert {run.request_id for run in first.tokens} == {"a", "b"}
    _ahead_computed()  # the second step is done, with a token of "a" the worker has not got
    cancelled = engine.cancel(("a",))
    assert [(f.request_id, f.generated_tokens) for f in cancelled] == [("a", 1)]
    assert [p.request_id for p in engine.progress()] == ["b"]
    second = engine.step(time.time())
    assert [(run.request_id, run.index) for run in second.tokens] == [("b", 1)]


def test_a_request_that_ended_in_the_step_ahead_is_cancelled_whole(
        engine: EngineProcess) -> None:
    engine.add([_spec("a", 2)])
    engine.apply(PlanSpec(version=1, admit=("a",)))
    assert [run.index for run in engine.step(time.time()).tokens] == [0]
    _ahead_computed()  # the step ahead made the last token and finished "a"
    cancelled = engine.cancel(("a",))
    assert [(f.request_id, f.reason, f.generated_tokens) for f in cancelled] == [
        ("a", generation_pb2.FINISH_REASON_CANCELLED, 1)]
    assert not engine.holds("a")
    while engine.has_work():
        outcome = engine.step(time.time())
        assert not outcome.tokens and not outcome.finished


def test_a_step_asked_of_an_engine_without_work_is_idle(engine: EngineProcess) -> None:
    engine.add([_spec("a")])
    assert engine.has_work()  # as far as the worker knows: the engine may refuse it
    assert engine.step(time.time()).idle  # held, not admitted
    assert not engine.has_work()
    engine.apply(PlanSpec(version=1))  # admits nothing
    assert engine.has_work()  # as far as the worker knows
    outcome = engine.step(time.time())
    assert outcome.idle and not outcome.tokens and outcome.duration_s == 0.0
    assert not engine.has_work()


class _Picky(SimBackend):
    """Refuses requests whose id starts with "bad", as a real engine refuses a prompt longer
    than its model takes."""

    def add(self, specs: Sequence[RequestSpec]) -> list[Finished]:
        refused = [Finished(s.request_id, generation_pb2.FINISH_REASON_ERROR, 0)
                   for s in specs if s.request_id.startswith("bad")]
        super().add([s for s in specs if not s.request_id.startswith("bad")])
        return refused


def _build_picky(config: WorkerConfig) -> Engine:
    engine = build_engine(config)
    engine.__class__ = _Picky
    return engine


@pytest.fixture()
def picky() -> Iterator[EngineProcess]:
    process = EngineProcess(_build_picky, _config())
    yield process
    process.close()


def test_requests_the_engine_refuses_come_back_with_the_next_step(
        picky: EngineProcess) -> None:
    """An add is not answered (the worker would wait for the step under way): what the engine
    refused ends with the next step's outcome, as finished with ERROR, beside the tokens."""
    assert picky.add([_spec("a", 3), _spec("bad-1"), _spec("b", 3)]) == []
    picky.apply(PlanSpec(version=1, admit=("a", "b")))
    outcome = picky.step(time.time())
    assert [(f.request_id, f.reason) for f in outcome.finished] == [
        ("bad-1", generation_pb2.FINISH_REASON_ERROR)]
    assert {run.request_id for run in outcome.tokens} == {"a", "b"}
    assert not picky.holds("bad-1") and picky.holds("a")
    assert {p.request_id for p in picky.progress()} == {"a", "b"}


def test_refused_alone_the_step_is_idle_and_carries_the_refusal(picky: EngineProcess) -> None:
    picky.add([_spec("bad-1")])
    assert picky.has_work()  # the refusal has to be fetched
    outcome = picky.step(time.time())
    assert outcome.idle and [f.request_id for f in outcome.finished] == ["bad-1"]
    assert not picky.has_work() and not picky.holds("bad-1")


def test_a_refused_request_cancelled_before_the_step_is_cancelled(picky: EngineProcess) -> None:
    picky.add([_spec("bad-1")])
    cancelled = picky.cancel(("bad-1",))
    assert [(f.request_id, f.reason) for f in cancelled] == [
        ("bad-1", generation_pb2.FINISH_REASON_CANCELLED)]
    assert not picky.step(time.time()).finished


def test_a_plan_that_leaves_nothing_to_compute_does_not_hang_a_step(
        engine: EngineProcess) -> None:
    engine.add([_spec("a", 50)])
    engine.apply(PlanSpec(version=1, admit=("a",)))
    engine.step(time.time())
    engine.apply(PlanSpec(version=2, preempt=("a",)))
    assert engine.has_work()  # as far as the worker knows: the plan may have made work
    steps = 0
    while engine.has_work():
        engine.step(time.time())
        steps += 1
    assert steps <= 2  # the step computed before the plan came, then nothing
    assert {p.request_id: p.state for p in engine.progress()} == {"a": State.PREEMPTED}


def test_a_dead_child_fails_every_call(engine: EngineProcess) -> None:
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    with contextlib.suppress(EngineDiedError):  # unanswered: the pipe may still take it
        engine.add([_spec("a")])
    for call in (lambda: engine.step(time.time()), lambda: engine.cancel(("a",)),
                 engine.progress):
        with pytest.raises(EngineDiedError, match="died"):
            call()


def test_an_engine_that_cannot_start_raises_its_error() -> None:
    with pytest.raises(ValueError, match="no-such-profile"):
        EngineProcess(build_engine, _config(profile="no-such-profile"))


def test_the_child_runs_at_the_niceness_asked_for() -> None:
    """The engine runs before the services beside it; a niceness the process may not take
    (raising priority without CAP_SYS_NICE) leaves it at the worker's, and it still serves."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for asked in (min(mine + 3, 19), -10):
        process = EngineProcess(build_engine, _config(), nice=asked)
        try:
            assert process.pid is not None
            child = os.getpriority(os.PRIO_PROCESS, process.pid)
            # Raising priority needs CAP_SYS_NICE, which a container may lack even as root.
            assert child == asked if asked >= mine else child in (asked, mine)
            # In a session of its own, whose scheduling group (where the kernel has
            # autogroups) has the same niceness: only its own processes are in it.
            assert os.getsid(process.pid) == process.pid != os.getsid(0)
            assert autogroup_nice(process.pid) in (None, child)
            assert process.add([_spec("a")]) == [] and process.holds("a")
        finally:
            process.close()


def test_the_child_runs_on_the_cpus_asked_for() -> None:
    last = max(os.sched_getaffinity(0))
    process = EngineProcess(build_engine, _config(), cpus=frozenset({last}))
    try:
        assert process.pid is not None
        assert os.sched_getaffinity(process.pid) == {last}
        assert process.add([_spec("a")]) == [] and process.holds("a")
    finally:
        process.close()


def test_pinning_sets_one_compute_thread_per_cpu_unless_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In a thread of its own (affinity is per thread on Linux, and the child's main thread
    pins itself before it starts any)."""
    import threading

    cpus = frozenset(os.sched_getaffinity(0))

    def pin_in_a_thread() -> None:
        thread = threading.Thread(target=pin_to_cpus, args=(cpus, "engine"))
        thread.start()
        thread.join()

    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # restored after the test
    monkeypatch.delenv("OMP_NUM_THREADS")
    pin_in_a_thread()
    assert os.environ["OMP_NUM_THREADS"] == str(len(cpus))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the operator's choice stands
    pin_in_a_thread()
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_an_engine_pinned_to_cpus_it_may_not_use_does_not_start() -> None:
    missing = max(os.sched_getaffinity(0)) + 1000
    with pytest.raises(ValueError, match=f"cannot run on CPUs \\[{missing}\\]"):
        EngineProcess(build_engine, _config(), cpus=frozenset({missing}))


def test_the_worker_keeps_off_the_engines_cpus() -> None:
    """In a thread of its own (affinity is per thread on Linux), as the worker's main thread
    does it before it starts any."""
    import threading

    mine = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    def run(cpus: frozenset[int]) -> None:
        avoid_cpus(cpus, "worker")
        seen.append(os.sched_getaffinity(0))

    for cpus in (frozenset({max(mine)}), frozenset(mine)):
        thread = threading.Thread(target=run, args=(cpus,))
        thread.start()
        thread.join()
    # Off the engine's CPU where others remain; where none would, where it was.
    assert seen == [mine - {max(mine)} or mine, mine]
    assert os.sched_getaffinity(0) == mine


@pytest.mark.parametrize(("text", "cpus"), [
    ("", set()), ("3", {3}), ("0,2", {0, 2}), ("4-7,12", {4, 5, 6, 7, 12}), (" 1 , 1-2 ", {1, 2}),
])
def test_cpu_lists_read_as_taskset_writes_them(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["x", "3-1", "-1", "1-", "2.5"])
def test_a_cpu_list_that_is_not_one_is_refused_by_its_part(text: str) -> None:
    with pytest.raises(ValueError, match="is not a CPU number or range"):
        parse_cpus(text)


def test_the_engine_cpus_come_from_the_flag_or_the_environment(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import parse_args

    base = ["--backend", "vllm", "--model", "/m"]
    last = max(os.sched_getaffinity(0))
    assert parse_args(base).engine_cpus == frozenset()
    monkeypatch.setenv("ANDES_ENGINE_CPUS", str(last))
    assert parse_args(base).engine_cpus == {last}
    assert parse_args([*base, "--engine-cpus", f"{last}-{last}"]).engine_cpus == {last}
    with pytest.raises(SystemExit):
        parse_args([*base, "--engine-cpus", "one"])
    assert "--engine-cpus: 'one' is not a CPU number" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "variable", "default"), [
    ("--engine-nice", "ANDES_ENGINE_NICE", -10),
    ("--worker-nice", "ANDES_WORKER_NICE", -5),
])
def test_the_niceness_comes_from_the_flags_or_the_environment(
        monkeypatch: pytest.MonkeyPatch, flag: str, variable: str, default: int) -> None:
    from worker.cli import parse_args

    base = ["--backend", "vllm", "--model", "/m"]
    attribute = flag[2:].replace("-", "_")
    assert getattr(parse_args(base), attribute) == default
    monkeypatch.setenv(variable, "2")
    assert getattr(parse_args(base), attribute) == 2
    assert getattr(parse_args([*base, flag, "5"]), attribute) == 5
    for out_of_range in ("-21", "20"):
        with pytest.raises(SystemExit):
            parse_args([*base, flag, out_of_range])


def test_a_vllm_engines_held_requests_as_the_proxy_follows_them(
        tiny_model: str, vllm_backend: object) -> None:
    """A vLLM engine in its process sends a request's progress only when its state or KV
    blocks change, and lists nothing after a step that only decoded: step by step, through
    admissions, new blocks, engine preemptions and resumes, requests queued for a batch
    slot, the proxy's view (counts of tokens taken from the tokens) is what the same engine
    in-process lists afresh (no entry kept, nothing taken from the last listing)."""
    from tests.conftest import VLLM_BLOCK_SIZE, VLLM_KV_BLOCKS
    from tests.vllm_support import PROMPTS, fresh_progress, plan, spec
    from worker.vllm_backend import VllmConfig

    config = WorkerConfig(
        worker_id="w", scheduler="127.0.0.1:1", redis_url="redis://x", backend="vllm",
        vllm=VllmConfig(model=tiny_model, dtype="float32", max_num_seqs=8,
                        max_num_batched_tokens=256, max_model_len=256,
                        num_gpu_blocks=VLLM_KV_BLOCKS, block_size=VLLM_BLOCK_SIZE,
                        measure_profile=False))
    process = EngineProcess(build_engine, config)
    local: Any = vllm_backend
    try:
        # 12 x (prompt + 70 tokens) is more KV than the 12 blocks of 32: the engine preempts;
        # and 4 of them queue for a batch slot of the 8, joining as others end.
        specs = [spec(PROMPTS[i % len(PROMPTS)], 70, ignore_eos=True, request_id=f"r{i}")
                 for i in range(12)]
        first = plan(admit=tuple(s.request_id for s in specs))
        for engine in (process, local):
            engine.add(specs)
            engine.apply(first)
        steps = quiet = forced = 0
        while True:
            while process.has_work():
                outcome, expected = process.step(time.time()), local.step(time.time())
                time.sleep(0.05)  # the child computes its next step meanwhile
                assert outcome.tokens == expected.tokens
                assert outcome.finished == expected.finished
                assert sorted(process.progress()) == sorted(fresh_progress(local))
                steps += 1
                quiet += not expected.held_changed
                forced += len(expected.forced_preemptions)
            assert not local.has_work()
            parked = tuple(p.request_id for p in local.progress())
            if not parked:
                break
            resume = plan(resume=parked)  # as the planner would, once KV is free
            process.apply(resume)
            local.apply(resume)
        assert forced > 0, "this much KV pressure must make the engine preempt"
        assert 0 < quiet < steps  # the listing was skipped, and not always
    finally:
        process.close()
        for rid in [p.request_id for p in local.progress()]:
            local.cancel((rid,))
