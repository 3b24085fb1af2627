"""The ``sim`` backend: :class:`andes.sim.engine.SimEngine` behind the worker's engine interface.

It runs exactly the engine the simulator steps (continuous batching, paged KV, forced
preemption, prices from a latency profile); the loop makes each iteration last as long as the
profile says, so the whole distributed system can be exercised without an accelerator. Every
request generates exactly ``max_tokens`` tokens of deterministic pseudo-text: token ``i`` of a
request is a word picked by hashing ``(request_id, i)``, so tests can predict any token.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from andes.latency import LatencyProfile
from andes.policies.base import Plan, State
from andes.sim.engine import SimEngine
from andes.v1 import generation_pb2
from worker.engine import Finished, PlanSpec, Progress, RequestSpec, StepOutcome, TokenRun

VOCABULARY = (
    "the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on",
    "are", "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had",
    "by", "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said",
    "there", "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up",
    "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would",
    "make", "like",
)
"""The sim's whole vocabulary: token id ``t`` is ``VOCABULARY[t]`` followed by a space."""


def token_id(request_id: str, index: int) -> int:
    """The sim's token at position ``index`` of ``request_id``'s response."""
    digest = hashlib.blake2b(f"{request_id}\x00{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % len(VOCABULARY)


def token_text(token: int) -> str:
    return VOCABULARY[token] + " "


class SimBackend:
    """An emulated accelerator; single-threaded and non-blocking (the loop does the waiting)."""

    backend = "sim"
    blocking = False
    needs_payload = False

    def __init__(
        self,
        profile: LatencyProfile,
        *,
        kv_blocks: int | None = None,
        max_batch: int | None = None,
        host_kv_blocks: int = 0,
        model: str | None = None,
    ) -> None:
        # The registered profile must describe this engine, overrides included.
        self.profile = dataclasses.replace(
            profile,
            kv_blocks_total=profile.kv_blocks_total if kv_blocks is None else kv_blocks,
            max_batch=profile.max_batch if max_batch is None else max_batch,
        )
        self.profile.validate()
        self.model = model or f"sim:{profile.name}"
        self._engine = SimEngine(self.profile, host_kv_blocks=host_kv_blocks)
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._offset: dict[str, int] = {}
        self._next_id = 0

    @property
    def kv_blocks_free(self) -> int:
        return self._engine.kv_blocks_free

    def holds(self, request_id: str) -> bool:
        return request_id in self._ids

    def add(self, specs: Sequence[RequestSpec]) -> list[Finished]:
        for spec in specs:
            if spec.request_id not in self._ids:
                self._add(spec)
        return []

    def _add(self, spec: RequestSpec) -> None:
        done = spec.resume_from_tokens
        left = spec.max_tokens - done
        self._next_id += 1
        self._ids[spec.request_id] = self._next_id
        self._names[self._next_id] = spec.request_id
        self._offset[spec.request_id] = done
        # A resumed request recomputes its prompt plus what was generated elsewhere.
        self._engine.add(
            self._next_id,
            arrival_s=spec.arrival_unix_s,
            prompt_tokens=spec.prompt_tokens + done,
            output_tokens=left,
            ttft_s=spec.ttft_s,
            tds=spec.tds,
        )

    def _int_ids(self, names: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._ids[n] for n in names if n in self._ids)

    def apply(self, plan: PlanSpec) -> None:
        self._engine.apply(
            Plan(
                preempt=self._int_ids(plan.preempt),
                pause=self._int_ids(plan.pause),
                resume=self._int_ids(plan.resume),
                admit=self._int_ids(plan.admit),
                preemption_mode=plan.preemption_mode,
            )
        )

    def has_work(self) -> bool:
        return self._engine.has_work()

    def _forget(self, request_id: str) -> int:
        del self._names[self._ids.pop(request_id)]
        return self._offset.pop(request_id)

    def step(self, now_s: float) -> StepOutcome:
        result = self._engine.step(now_s)
        tokens: list[TokenRun] = []
        for rid, index in zip(
            result.token_request_ids.tolist(), result.token_indices.tolist(), strict=True
        ):
            name = self._names[rid]
            position = self._offset[name] + index
            token = token_id(name, position)
            tokens.append(TokenRun(name, position, (token,), token_text(token)))
        finished = []
        for done in result.finished:
            name = self._names[done.request_id]
            offset = self._forget(name)
            finished.append(
                Finished(name, generation_pb2.FINISH_REASON_LENGTH, offset + done.output_tokens)
            )
        forced = [self._names[r] for r in result.forced_preemptions.tolist()]
        return StepOutcome(
            start_s=now_s,
            duration_s=result.duration_s,
            tokens=tokens,
            finished=finished,
            forced_preemptions=forced,
        )

    def cancel(self, request_ids: tuple[str, ...]) -> list[Finished]:
        held = [r for r in dict.fromkeys(request_ids) if r in self._ids]
        if not held:
            return []
        generated = {p.request_id: p.generated_tokens for p in self.progress()}
        self._engine.cancel(tuple(self._ids[r] for r in held))
        for name in held:
            self._forget(name)
        return [
            Finished(name, generation_pb2.FINISH_REASON_CANCELLED, generated[name])
            for name in held
        ]

    def progress(self) -> list[Progress]:
        table = self._engine.snapshot(0.0).requests
        return [
            Progress(
                request_id=(name := self._names[rid]),
                generated_tokens=self._offset[name] + generated,
                state=State(state),
                kv_blocks=kv,
            )
            for rid, state, generated, kv in zip(
                table.request_id.tolist(),
                table.state.tolist(),
                table.generated_tokens.tolist(),
                table.kv_blocks.tolist(),
                strict=True,
            )
        ]
