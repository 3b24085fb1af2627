"""Driving a vllm backend in tests the way the worker loop does, and greedy references."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from andes.policies.base import State
from andes.v1 import generation_pb2
from worker.engine import PlanSpec, Progress, RequestSpec, StepOutcome

_ids = itertools.count()
_versions = itertools.count(1)


def spec(prompt: str, max_tokens: int, *, request_id: str | None = None,
         **sampling: object) -> RequestSpec:
    payload = {
        b"prompt": prompt.encode(),
        b"max_tokens": str(max_tokens).encode(),
        b"sampling": json.dumps({"temperature": 0.0, **sampling}).encode(),
    }
    return RequestSpec(
        request_id=request_id or f"req-{next(_ids)}", prompt_tokens=len(prompt) // 4 + 1,
        max_tokens=max_tokens, arrival_unix_s=time.time(), ttft_s=1.0, tds=5.0,
        payload_key="", token_stream_key="", payload=payload,
    )


def plan(**actions: tuple[str, ...]) -> PlanSpec:
    return PlanSpec(version=next(_versions), **actions)


class Run:
    """Drives the backend like the worker loop does and collects what it streamed."""

    def __init__(self, backend: object) -> None:
        self.backend = backend
        self.tokens: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.finished: dict[str, int] = {}
        self.forced: list[str] = []
        self.steps = 0
        self.first_index: dict[str, int] = {}
        """Where a request's response starts (not 0 for one resumed from elsewhere)."""

    def step(self) -> StepOutcome:
        outcome: StepOutcome = self.backend.step(time.time())  # type: ignore[attr-defined]
        self.steps += 1
        for run in outcome.tokens:
            got = self.tokens.setdefault(run.request_id, [])
            start = self.first_index.get(run.request_id, 0)
            assert run.index == start + len(got), "token runs must be contiguous"
            got.extend(run.token_ids)
            self.text[run.request_id] = self.text.get(run.request_id, "") + run.text
        for done in outcome.finished:
            self.finished[done.request_id] = done.reason
            assert done.generated_tokens == self.first_index.get(done.request_id, 0) + len(
                self.tokens.get(done.request_id, []))
        self.forced.extend(outcome.forced_preemptions)
        return outcome

    def until_idle(self, limit: int = 2000) -> None:
        while self.backend.has_work():  # type: ignore[attr-defined]
            self.step()
            assert self.steps < limit, "the engine did not finish"

    def until_done(self, limit: int = 2000) -> None:
        """Step until nothing is held, bringing back what the engine parked when KV ran out
        (as the planner would)."""
        while True:
            self.until_idle(limit)
            states = self.states()
            if not states:
                return
            self.backend.apply(plan(  # type: ignore[attr-defined]
                resume=tuple(r for r, s in states.items() if s == State.PREEMPTED),
                admit=tuple(r for r, s in states.items() if s == State.WAITING)))
            assert self.backend.has_work(), f"stuck: {states}"  # type: ignore[attr-defined]

    def states(self) -> dict[str, State]:
        listed = self.backend.progress()  # type: ignore[attr-defined]
        assert listed == fresh_progress(self.backend)
        return {p.request_id: p.state for p in listed}


def fresh_progress(backend: Any) -> list[Progress]:
    """A vllm backend's held requests listed afresh: the entries of requests without KV are
    kept between calls until they make tokens; every request must be where they say."""
    kept = backend._waiting_entries
    backend._waiting_entries = {state: {} for state in kept}
    fresh: list[Progress] = backend.progress()
    backend._waiting_entries = kept
    return fresh


PROMPTS = ["The quick brown fox", "Once upon a time, in a city by the sea,",
           "Numbers: 1 2 3 4 5 6", "Bonjour, ça va? 你好 🙂"]


def greedy(backend: object, prompts: list[str], max_tokens: int,
           **sampling: object) -> list[list[int]]:
    """Each prompt's greedy response, all admitted together."""
    run = Run(backend)
    specs = [spec(p, max_tokens, **sampling) for p in prompts]
    for s in specs:
        assert backend.add([s]) == []  # type: ignore[attr-defined]
    backend.apply(plan(admit=tuple(s.request_id for s in specs)))  # type: ignore[attr-defined]
    run.until_done()
    assert all(len(run.tokens[s.request_id]) == max_tokens for s in specs
               if run.finished[s.request_id] == generation_pb2.FINISH_REASON_LENGTH)
    return [run.tokens[s.request_id] for s in specs]
