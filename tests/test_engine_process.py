"""The engine in a child process (``worker/engine_process.py``): calls and their answers cross
a real pipe to a real child, with the sim backend as the engine (the vllm backend runs the same
way in the cluster tests)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from andes.policies.base import State
from worker.engine import PlanSpec, RequestSpec
from worker.engine_process import EngineDiedError, EngineProcess
from worker.service import WorkerConfig, build_engine


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

    assert engine.add(_spec("a")) == [] and engine.holds("a") and not engine.holds("b")
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
    engine.add(_spec("b"))
    assert [f.request_id for f in engine.cancel(("b",))] == ["b"] and not engine.holds("b")


def test_progress_after_a_change_asks_the_child(engine: EngineProcess) -> None:
    engine.add(_spec("a"))
    engine.step(time.time())  # nothing admitted: the step's progress shows "a" waiting
    engine.add(_spec("b"))
    states = {p.request_id: p.state for p in engine.progress()}
    assert states == {"a": State.WAITING, "b": State.WAITING}


def test_an_engine_error_reaches_the_caller_and_the_engine_goes_on(
        engine: EngineProcess) -> None:
    with pytest.raises(TypeError):
        engine.step("not a time")  # type: ignore[arg-type]
    assert engine.add(_spec("a")) == []
    assert engine.holds("a")


def test_a_dead_child_fails_every_call(engine: EngineProcess) -> None:
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(EngineDiedError, match="died"):
        engine.add(_spec("a"))


def test_an_engine_that_cannot_start_raises_its_error() -> None:
    with pytest.raises(ValueError, match="no-such-profile"):
        EngineProcess(build_engine, _config(profile="no-such-profile"))
