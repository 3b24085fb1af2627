"""The engine interface the worker loop drives, and the values that cross it.

The loop only ever talks to an engine through :class:`Engine`, so the emulated accelerator
(``sim``) and a real one (``vllm``) are interchangeable. Request ids are the wire's strings:
mapping them to whatever the engine uses internally is the backend's business. Everything
here is synchronous: a backend whose ``step`` blocks on real hardware sets ``blocking`` and
the loop then calls it (and every other method, engines are single-threaded) from one
dedicated thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from andes.latency import LatencyProfile
from andes.policies.base import PreemptionMode, State


@dataclass(frozen=True)
class RequestSpec:
    """A request the scheduler assigned to this worker (an ``Assignment``, decoded)."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_unix_s: float
    ttft_s: float
    tds: float
    payload_key: str
    token_stream_key: str
    resume_from_tokens: int = 0
    """Tokens already published by another worker: generation continues at this index."""
    payload: Mapping[bytes, bytes] | None = None
    """The payload hash from Redis, fetched only for engines that set ``needs_payload``."""
    generated_token_ids: tuple[int, ...] = ()
    """For ``needs_payload`` engines: the ``resume_from_tokens`` tokens already published,
    which a real engine recomputes after the prompt."""
    generated_text: str = ""
    """For ``needs_payload`` engines: the text of those tokens as the client received it,
    which the rest of the response's text continues."""


@dataclass(frozen=True)
class PlanSpec:
    """A plan with wire ids, applied in the order preempt, pause, resume, admit."""

    version: int
    preempt: tuple[str, ...] = ()
    pause: tuple[str, ...] = ()
    resume: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE


class TokenRun(NamedTuple):
    """Consecutive new tokens of one request from one iteration.

    A named tuple, not a dataclass, for the same reason as :class:`Progress`: a vllm
    worker's engine process builds one per running request every step and pickles them all
    to its worker, which unpickles them. For a step of 64 requests, building and pickling
    them took 83 + 88 us in the engine's process and unpickling 63 us in the worker's as
    frozen dataclasses; 21 + 49 and 22 us as named tuples (timeit, the 2-core machine), next
    to steps of 6-9 ms with the tiny model."""

    request_id: str
    # The wire's name for it (GenerateResponse.index, TokenChunk.index); it hides the tuple
    # method ``index``, which nothing calls on a run.
    index: int  # type: ignore[assignment]
    """Position of the first token in the response."""
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Finished:
    """A request that left the engine, with an ``andes.v1.FinishReason`` value."""

    request_id: str
    reason: int
    generated_tokens: int


class Progress(NamedTuple):
    """One held request as the step report describes it.

    A named tuple, not a dataclass: a vllm worker's engine process lists every held request
    after every step and sends the ones that changed, so with a thousand queued requests
    building and comparing these is a few percent of the engine's time; tuples build and
    compare in C at about half the cost."""

    request_id: str
    generated_tokens: int
    state: State
    kv_blocks: int


@dataclass
class StepOutcome:
    """What one iteration did."""

    start_s: float
    duration_s: float
    """How long the accelerator needs for it: the loop makes the iteration last this long."""
    tokens: list[TokenRun] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    """Requests that completed in this iteration; their last tokens are in ``tokens``."""
    forced_preemptions: list[str] = field(default_factory=list)
    """Requests the engine preempted by itself because KV ran out."""
    scheduled_tokens: int = 0
    """Tokens the iteration computed (prefill chunks plus one per decoding request)."""
    idle: bool = False
    """No iteration ran: the engine had nothing to compute when asked (an engine in another
    process can be asked just as a plan left it without work)."""
    held_changed: bool = True
    """Whether the iteration may have changed a held request's state or KV blocks (beyond
    its count of tokens, which ``tokens`` tell, and requests leaving, which ``finished``
    tells): an engine that knows it did not (a batch that only decoded, some requests
    finishing) spares its process the listing of every held request."""


class Engine(Protocol):
    """A continuous-batching engine that executes plans one iteration at a time."""

    backend: str
    """``sim`` or ``vllm``: sent in the registration."""
    model: str
    profile: LatencyProfile
    """The latency model the scheduler plans this worker with (KV figures included)."""
    blocking: bool
    """Whether ``step`` blocks the calling thread for the iteration's real duration."""
    needs_payload: bool
    """Whether ``add`` needs the payload hash (a real engine needs the prompt)."""

    @property
    def kv_blocks_free(self) -> int: ...

    def add(self, specs: Sequence[RequestSpec]) -> list[Finished]:
        """Hold new requests in WAITING (each has tokens left to generate: the loop sees to
        that; one already held is left as it is); returns at once those the engine cannot
        take. A batch, because requests arrive in bursts: a burst's requests then cost an
        engine in another process one round trip, not one each."""
        ...

    def holds(self, request_id: str) -> bool: ...

    def apply(self, plan: PlanSpec) -> None:
        """Apply a plan at an iteration boundary, skipping actions that no longer fit."""
        ...

    def has_work(self) -> bool:
        """Whether a step would compute anything (a request runs or waits for KV)."""
        ...

    def step(self, now_s: float) -> StepOutcome:
        """Run one iteration that starts at ``now_s`` (Unix seconds)."""
        ...

    def cancel(self, request_ids: tuple[str, ...]) -> list[Finished]:
        """Drop held requests and free their KV now; returns those that were held."""
        ...

    def progress(self) -> list[Progress]:
        """Every request the engine holds."""
        ...


@runtime_checkable
class ReportsProgressChanges(Protocol):
    """An engine that can tell which held requests may have changed, for an engine process
    that sends its worker only what changed (:mod:`worker.engine_process`)."""

    def progress_changes(self) -> tuple[list[Progress], list[Progress], int]:
        """The held requests that hold KV, listed afresh; those without KV that may have
        joined, left or changed queue since the last call; and how many are held without
        KV (a listing kept up to date from these is complete when its count matches)."""
        ...
