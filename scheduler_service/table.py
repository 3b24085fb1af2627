"""The scheduler's view of the cluster: every live request and every worker.

A request's row has three sources: its metadata (the gateway's ``Submit``), its progress on
its worker (``StepReport``s: state, generated tokens, KV blocks; the scheduler derives
admissions and preemptions from state changes) and its delivery (the gateway's
``ReportDelivery``: the client pacer summary). From these rows :func:`build_snapshot` makes
the per-worker :class:`andes.policies.Snapshot` the policies plan on, with integer ids that
:class:`SchedulerTable` maps back to the wire's strings.

Times are Unix seconds on the scheduler's clock; a request's arrival is the gateway's stamp,
clamped to when the scheduler received it (a gateway clock running ahead must not make a
request look younger than it is).

Delivery vs generation. The planner needs each client's pacer summary (k, M_k, S_k; see
:mod:`andes.qoe`). Until a gateway reports, the table estimates it from the step reports,
taking every token as delivered at the end of the step that produced it (what the simulator
does). Once a gateway reports, its summary wins, extended by the tokens generated since
(in flight between worker and client) as if delivered when generated.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from andes.latency import LatencyProfile
from andes.policies.base import HOLDS_KV, RequestTable, Snapshot, State
from andes.v1 import generation_pb2, scheduler_pb2
from scheduler_service.convert import state_from_proto

DEFAULT_TTFT_S = 1.0
DEFAULT_TDS = 4.8
FORGET_LIMIT = 100_000
"""How many finished or aborted ids the table remembers (to abort stragglers, not adopt them)."""


@dataclass(frozen=True)
class RequestMeta:
    """What the gateway said about a request (``SubmitRequest``), validated."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    ttft_s: float
    tds: float
    arrival_s: float
    gateway_id: str = ""
    payload_key: str = ""
    token_stream_key: str = ""
    sampling: generation_pb2.SamplingParams | None = None


@dataclass
class RequestEntry:
    """One live request: metadata, progress on its worker, delivery to its client."""

    meta: RequestMeta
    int_id: int
    worker_id: str
    session_id: int
    """The worker session its assignment went out on."""
    resume_from_tokens: int = 0
    state: State = State.WAITING
    generated_tokens: int = 0
    kv_blocks: int = 0
    preemptions: int = 0
    admitted_seq: int = -1
    generated_at_admit: int = 0
    last_token_s: float = math.nan
    gen_digest_max: float = -math.inf
    gen_delay_sum: float = 0.0
    has_delivery: bool = False
    delivered_tokens: int = 0
    delivery_digest_max: float = -math.inf
    delivery_delay_sum: float = 0.0
    delivery_complete: bool = False
    orphaned_at: float | None = None
    """When its worker was declared dead (None while the worker lives)."""

    @property
    def request_id(self) -> str:
        return self.meta.request_id


@dataclass
class WorkerView:
    """One registered worker: what it can do and its latest reported state."""

    worker_id: str
    backend: str
    model: str
    profile: LatencyProfile
    """The registered latency model, with the registration's KV and batch figures."""
    session_id: int
    kv_blocks_free: int
    live: bool = True
    last_seen: float = 0.0
    plan_version_sent: int = 0
    plan_version_applied: int = 0
    step: int = 0
    requests: dict[str, RequestEntry] = field(default_factory=dict)
    """Its requests in placement order (orphans included while it is dead)."""
    kv_demand: int = 0
    """KV blocks its requests need to run now: the sum of :meth:`blocks_needed_now` over
    ``requests``, kept up to date by the table (placement reads it for every new request, and
    summing thousands of requests each time made a burst quadratic)."""

    @property
    def kv_blocks_total(self) -> int:
        return self.profile.kv_blocks_total

    @property
    def block_size(self) -> int:
        return self.profile.block_size

    @property
    def max_batch(self) -> int:
        return self.profile.max_batch

    def blocks_needed_now(self, entry: RequestEntry) -> int:
        """KV blocks ``entry``'s context (plus its next token) occupies on this worker."""
        block_size = self.profile.block_size
        return (entry.meta.prompt_tokens + entry.generated_tokens + block_size) // block_size


@dataclass
class ReportEffects:
    """What a step report changed, for the planner's cadence and the metrics."""

    finished: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    """Requests the worker holds that are no longer its own (aborted or moved): abort them."""
    admitted: int = 0
    preempted: int = 0


# -- pure functions ------------------------------------------------------------------------


def advance_pacer(
    count: int, digest_max: float, delay_sum: float, new_tokens: int, at_s: float,
    ttft_s: float, tds: float,
) -> tuple[float, float]:
    """The pacer summary after ``new_tokens`` more tokens arrive together at ``at_s``.

    ``at_s`` is relative to arrival. Token j (0-based) contributes ``a - j d`` to the running
    max, which is largest for the first new token, so the max moves once and every new token
    adds the same delay ``max(0, M - ttft)`` (the closed form of :class:`andes.qoe.TokenPacer`).
    """
    if new_tokens <= 0:
        return digest_max, delay_sum
    d = 1.0 / tds
    digest = max(digest_max, at_s - count * d)
    return digest, delay_sum + new_tokens * max(0.0, digest - ttft_s)


def pacer_summary(entry: RequestEntry) -> tuple[int, float, float]:
    """(k, M_k, S_k) the planner should assume for the request's client."""
    meta = entry.meta
    if not entry.has_delivery:
        return entry.generated_tokens, entry.gen_digest_max, entry.gen_delay_sum
    k = entry.delivered_tokens
    in_flight = entry.generated_tokens - k
    if in_flight <= 0 or math.isnan(entry.last_token_s):
        return k, entry.delivery_digest_max, entry.delivery_delay_sum
    digest, delay = advance_pacer(
        k, entry.delivery_digest_max, entry.delivery_delay_sum, in_flight,
        entry.last_token_s - meta.arrival_s, meta.ttft_s, meta.tds,
    )
    return entry.generated_tokens, digest, delay


def build_snapshot(
    entries: Sequence[RequestEntry], worker: WorkerView, now_s: float
) -> Snapshot:
    """The policy's view of one worker: its requests as a struct of arrays."""
    n = len(entries)
    summaries = [pacer_summary(e) for e in entries]

    def ints(values: Iterable[int]) -> np.ndarray:
        return np.fromiter(values, dtype=np.int64, count=n)

    def floats(values: Iterable[float]) -> np.ndarray:
        return np.fromiter(values, dtype=np.float64, count=n)

    table = RequestTable(
        request_id=ints(e.int_id for e in entries),
        state=ints(int(e.state) for e in entries),
        arrival_s=floats(e.meta.arrival_s for e in entries),
        ttft_s=floats(e.meta.ttft_s for e in entries),
        tds=floats(e.meta.tds for e in entries),
        prompt_tokens=ints(e.meta.prompt_tokens for e in entries),
        generated_tokens=ints(s[0] for s in summaries),
        max_tokens=ints(e.meta.max_tokens for e in entries),
        digest_max=floats(s[1] for s in summaries),
        delay_sum=floats(s[2] for s in summaries),
        kv_blocks=ints(e.kv_blocks for e in entries),
        preemptions=ints(e.preemptions for e in entries),
        admitted_seq=ints(e.admitted_seq for e in entries),
        served_since_admit=ints(
            max(e.generated_tokens - e.generated_at_admit, 0) for e in entries
        ),
    )
    return Snapshot(
        now_s=now_s,
        requests=table,
        profile=worker.profile,
        kv_blocks_total=worker.kv_blocks_total,
        kv_blocks_free=worker.kv_blocks_free,
        max_batch=worker.max_batch,
    )


def worker_profile(registration: scheduler_pb2.Registration, profile: LatencyProfile) -> (
    LatencyProfile
):
    """The registered profile with the registration's own capacity figures, which win."""
    return replace(
        profile,
        kv_blocks_total=registration.kv_blocks_total or profile.kv_blocks_total,
        block_size=registration.block_size or profile.block_size,
        max_batch=registration.max_batch or profile.max_batch,
        max_batched_tokens=registration.max_batched_tokens or profile.max_batched_tokens,
    )


# -- the table -----------------------------------------------------------------------------


class SchedulerTable:
    """Live requests and registered workers, with the string <-> int id mapping."""

    def __init__(self) -> None:
        self.requests: dict[str, RequestEntry] = {}
        self.workers: dict[str, WorkerView] = {}
        self._names: dict[int, str] = {}
        self._next_int = 0
        self._admit_seq = 0
        self._forgotten: OrderedDict[str, None] = OrderedDict()

    # ids ------------------------------------------------------------------------------

    def name_of(self, int_id: int) -> str:
        return self._names[int_id]

    def _new_int(self, request_id: str) -> int:
        self._next_int += 1
        self._names[self._next_int] = request_id
        return self._next_int

    def forgotten(self, request_id: str) -> bool:
        return request_id in self._forgotten

    # workers --------------------------------------------------------------------------

    def register_worker(
        self, registration: scheduler_pb2.Registration, profile: LatencyProfile,
        session_id: int, now_s: float,
    ) -> WorkerView:
        """Add a worker, or bring a known one back with its new session."""
        profile = worker_profile(registration, profile)
        view = self.workers.get(registration.worker_id)
        if view is None:
            view = WorkerView(
                worker_id=registration.worker_id,
                backend=registration.backend,
                model=registration.model,
                profile=profile,
                session_id=session_id,
                kv_blocks_free=profile.kv_blocks_total,
                last_seen=now_s,
            )
            self.workers[view.worker_id] = view
        else:
            view.backend = registration.backend
            view.model = registration.model
            view.profile = profile  # its block size may differ now
            view.kv_demand = sum(view.blocks_needed_now(e) for e in view.requests.values())
            view.session_id = session_id
            view.live = True
            view.last_seen = now_s
        return view

    def mark_dead(self, worker_id: str, now_s: float) -> list[RequestEntry]:
        """The worker is gone: its requests become orphans (returned)."""
        view = self.workers[worker_id]
        view.live = False
        orphans = list(view.requests.values())
        for entry in orphans:
            if entry.orphaned_at is None:
                entry.orphaned_at = now_s
        return orphans

    def live_workers(self) -> list[WorkerView]:
        return [w for w in self.workers.values() if w.live]

    # requests -------------------------------------------------------------------------

    def add(self, meta: RequestMeta, worker_id: str) -> RequestEntry:
        if meta.request_id in self.requests:
            raise KeyError(f"request {meta.request_id!r} is already live")
        view = self.workers[worker_id]
        entry = RequestEntry(
            meta=meta,
            int_id=self._new_int(meta.request_id),
            worker_id=worker_id,
            session_id=view.session_id,
        )
        self.requests[meta.request_id] = entry
        _attach(view, entry)
        self._forgotten.pop(meta.request_id, None)
        return entry

    def remove(self, request_id: str) -> RequestEntry | None:
        """Forget a request (finished or aborted); stragglers about it get aborted."""
        entry = self.requests.pop(request_id, None)
        if entry is None:
            return None
        del self._names[entry.int_id]
        view = self.workers.get(entry.worker_id)
        if view is not None:
            _detach(view, entry)
        self._forgotten[request_id] = None
        while len(self._forgotten) > FORGET_LIMIT:
            self._forgotten.popitem(last=False)
        return entry

    def move(self, entry: RequestEntry, worker_id: str) -> None:
        """Re-place a request (its worker died): it resumes, by recompute, where it got to."""
        old = self.workers.get(entry.worker_id)
        if old is not None:
            _detach(old, entry)
        view = self.workers[worker_id]
        entry.worker_id = worker_id
        entry.session_id = view.session_id
        entry.resume_from_tokens = entry.generated_tokens
        entry.state = State.WAITING
        entry.kv_blocks = 0
        entry.orphaned_at = None
        _attach(view, entry)

    def orphans(self) -> list[RequestEntry]:
        return [
            e for w in self.workers.values() if not w.live for e in w.requests.values()
        ]

    # reports --------------------------------------------------------------------------

    def _progress(
        self, entry: RequestEntry, progress: scheduler_pb2.RequestProgress, at_s: float,
        effects: ReportEffects,
    ) -> None:
        try:
            state = state_from_proto(progress.state)
        except ValueError:
            return
        generated = int(progress.generated_tokens)
        previous = entry.generated_tokens
        if generated > previous:
            meta = entry.meta
            entry.gen_digest_max, entry.gen_delay_sum = advance_pacer(
                previous, entry.gen_digest_max, entry.gen_delay_sum, generated - previous,
                at_s - meta.arrival_s, meta.ttft_s, meta.tds,
            )
            self._set_generated(entry, generated)
            entry.last_token_s = at_s
        holds, held = state in HOLDS_KV, entry.state in HOLDS_KV
        if holds and not held:
            self._admit_seq += 1
            entry.admitted_seq = self._admit_seq
            entry.generated_at_admit = previous
            effects.admitted += 1
        elif held and not holds:
            entry.preemptions += 1
            effects.preempted += 1
        entry.state = state
        entry.kv_blocks = int(progress.kv_blocks)

    def _set_generated(self, entry: RequestEntry, generated: int) -> None:
        view = self.workers.get(entry.worker_id)
        if view is not None and view.requests.get(entry.request_id) is entry:
            view.kv_demand -= view.blocks_needed_now(entry)
            entry.generated_tokens = generated
            view.kv_demand += view.blocks_needed_now(entry)
        else:
            entry.generated_tokens = generated

    def apply_report(
        self, worker_id: str, report: scheduler_pb2.StepReport, now_s: float
    ) -> ReportEffects:
        """Fold a step report into the table."""
        view = self.workers[worker_id]
        effects = ReportEffects()
        view.last_seen = now_s
        view.kv_blocks_free = int(report.kv_blocks_free)
        view.step = max(view.step, int(report.step))
        view.plan_version_applied = int(report.plan_version)
        # A worker that outlived a scheduler restart has applied newer plans than we sent.
        view.plan_version_sent = max(view.plan_version_sent, view.plan_version_applied)
        # Tokens of the report count as delivered when its step ended (never in the future).
        at_s = min(report.start_unix_s + report.duration_s, now_s) if report.start_unix_s else (
            now_s
        )
        for progress in report.requests:
            entry = view.requests.get(progress.request_id)
            if entry is None:
                effects.stale.append(progress.request_id)
                continue
            self._progress(entry, progress, at_s, effects)
        for done in report.finished:
            entry = view.requests.get(done.request_id)
            if entry is not None:
                self.remove(done.request_id)
                effects.finished.append(done.request_id)
        effects.forced = [r for r in report.forced_preemptions if r in view.requests]
        return effects

    def apply_registration(
        self, worker_id: str, held: Sequence[scheduler_pb2.RequestProgress], now_s: float
    ) -> tuple[list[str], list[str]]:
        """Reconcile what a (re)registering worker holds with the table.

        Returns ``(stale, missing)``: requests it holds that are not its own any more (to be
        aborted), and requests placed on it in an earlier session that it does not hold (they
        finished meanwhile, or were lost: the first step report tells). Requests the table
        does not know at all are adopted (the scheduler restarted), with default QoE specs.
        """
        view = self.workers[worker_id]
        stale: list[str] = []
        listed = set()
        effects = ReportEffects()
        for progress in held:
            rid = progress.request_id
            listed.add(rid)
            entry = self.requests.get(rid)
            if entry is None and not self.forgotten(rid):
                entry = self._adopt(view, progress, now_s)
            if entry is None or entry.worker_id != worker_id:
                stale.append(rid)
                continue
            entry.orphaned_at = None
            self._progress(entry, progress, now_s, effects)
        missing = [
            rid for rid, e in view.requests.items()
            if rid not in listed and e.session_id < view.session_id
        ]
        return stale, missing

    def _adopt(
        self, view: WorkerView, progress: scheduler_pb2.RequestProgress, now_s: float
    ) -> RequestEntry:
        generated = int(progress.generated_tokens)
        context = max(int(progress.kv_blocks) * view.block_size - 1, generated + 1)
        meta = RequestMeta(
            request_id=progress.request_id,
            prompt_tokens=max(context - generated, 1),
            max_tokens=max(view.profile.kv_capacity_tokens - context, generated + 1),
            ttft_s=DEFAULT_TTFT_S,
            tds=DEFAULT_TDS,
            arrival_s=now_s,
        )
        entry = self.add(meta, view.worker_id)
        self._set_generated(entry, generated)
        entry.resume_from_tokens = generated
        entry.last_token_s = now_s
        return entry

    def apply_delivery(self, progress: scheduler_pb2.DeliveryProgress) -> RequestEntry | None:
        """Record a client's pacer summary; the request (None if unknown)."""
        entry = self.requests.get(progress.request_id)
        if entry is None:
            return None
        k = int(progress.delivered_tokens)
        if entry.has_delivery and k < entry.delivered_tokens:
            return entry  # an older report overtaken by a newer one
        entry.has_delivery = True
        entry.delivered_tokens = k
        entry.delivery_digest_max = progress.digest_max_s if k else -math.inf
        entry.delivery_delay_sum = progress.delay_sum_s
        entry.delivery_complete = progress.complete
        return entry

    # views ----------------------------------------------------------------------------

    def snapshot(self, worker_id: str, now_s: float) -> Snapshot:
        view = self.workers[worker_id]
        return build_snapshot(list(view.requests.values()), view, now_s)

    def queue_length(self) -> int:
        """Requests waiting to run: placed but holding no KV, or orphaned. Safe to call from
        another thread (the metrics server's): it walks a copy of the table."""
        return sum(
            1 for e in list(self.requests.values())
            if e.orphaned_at is not None or e.state not in HOLDS_KV
        )

    def kv_demand(self, worker_id: str) -> int:
        """KV blocks the worker's unfinished requests need to run now."""
        return self.workers[worker_id].kv_demand


def _attach(view: WorkerView, entry: RequestEntry) -> None:
    view.requests[entry.request_id] = entry
    view.kv_demand += view.blocks_needed_now(entry)


def _detach(view: WorkerView, entry: RequestEntry) -> None:
    if view.requests.get(entry.request_id) is entry:
        del view.requests[entry.request_id]
        view.kv_demand -= view.blocks_needed_now(entry)
