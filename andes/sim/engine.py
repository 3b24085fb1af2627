"""An emulated accelerator: continuous batching over paged KV memory, priced by a profile.

This is the engine the simulator steps and the ``sim`` worker backend runs in real time. It
behaves like vLLM V1 where that matters to scheduling:

* a plan moves requests between states (see :class:`~andes.policies.base.State`); each
  iteration first grows the running requests' KV, then gives QUEUED requests KV and a prefill
  in queue order, stopping at the first one that does not fit (head-of-line, as vLLM's waiting
  queue), and starts none in an iteration that had to preempt (vLLM V1's ``schedule()``);
* prefill is chunked under ``max_batched_tokens``; the step that finishes a prefill samples
  the request's next token;
* when decoding requests outgrow free KV the engine preempts the most recently admitted
  running request by recompute, as vLLM does, and reports it as *forced*: it is parked as
  PREEMPTED, so the planner stays in charge of when it comes back;
* a recompute resumes from vLLM's prefix cache where it can: freed blocks join the back of
  the free queue (a request's last block first) and stay reusable until allocations from the
  front reach them, so only the overwritten part of the context is prefilled again;
* preemption by swap moves KV to a bounded host pool; both directions stall the step.

Rows hold only unfinished requests; finished ones leave through :class:`StepResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from andes.latency import LatencyProfile
from andes.policies.base import (
    FloatArray,
    IntArray,
    Plan,
    PreemptionMode,
    RequestTable,
    Snapshot,
    State,
    blocks_for,
    room_for_everyone,
)
from andes.qoe import qoe_from_state

_INT_COLUMNS = (
    "request_id",
    "state",
    "prompt_tokens",
    "generated_tokens",
    "output_tokens",
    "max_tokens",
    "kv_blocks",
    "host_blocks",
    "preemptions",
    "forced_preemptions",
    "admitted_seq",
    "served_since_admit",
    "prefill_left",
    "queue_key",
    "cache_blocks",
    "cache_full",
    "cache_front",
)
_FRONT = 1 << 40
_FLOAT_COLUMNS = ("arrival_s", "ttft_s", "tds", "digest_max", "delay_sum", "first_token_s")


@dataclass
class FinishedRequest:
    request_id: int
    arrival_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: float
    tds: float
    qoe: float
    preemptions: int
    forced_preemptions: int


@dataclass
class StepResult:
    """What one iteration did: how long it took and which tokens it produced."""

    start_s: float
    end_s: float
    token_request_ids: IntArray
    """One entry per request that received a token at ``end_s``."""
    token_indices: IntArray
    """0-based index of that token in its response."""
    finished: list[FinishedRequest] = field(default_factory=list)
    forced_preemptions: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    decode_batch: int = 0
    prefill_tokens: int = 0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class SimEngine:
    """One emulated accelerator; single-threaded, driven by :meth:`step`."""

    def __init__(
        self,
        profile: LatencyProfile,
        *,
        kv_blocks_total: int | None = None,
        max_batch: int | None = None,
        host_kv_blocks: int = 0,
    ) -> None:
        self.profile = profile
        self.kv_blocks_total = kv_blocks_total or profile.kv_blocks_total
        self.max_batch = max_batch or profile.max_batch
        self.host_kv_blocks = host_kv_blocks
        self.kv_blocks_free = self.kv_blocks_total
        self.host_blocks_free = host_kv_blocks
        self._seq = 0
        self._pending_stall_s = 0.0
        self._pops = 0
        """Blocks taken from the front of the free queue so far (the prefix cache's clock)."""
        self._ints: dict[str, IntArray] = {c: np.zeros(0, dtype=np.int64) for c in _INT_COLUMNS}
        self._floats: dict[str, FloatArray] = {
            c: np.zeros(0, dtype=np.float64) for c in _FLOAT_COLUMNS
        }
        self.preemptions_planned = 0
        self.preemptions_forced = 0

    # -- request table -------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._ints["request_id"].size)

    def _col(self, name: str) -> IntArray:
        return self._ints[name]

    def _fcol(self, name: str) -> FloatArray:
        return self._floats[name]

    def add(
        self,
        request_id: int,
        *,
        arrival_s: float,
        prompt_tokens: int,
        output_tokens: int,
        ttft_s: float,
        tds: float,
        max_tokens: int | None = None,
    ) -> None:
        """Place a new request on this worker (state WAITING)."""
        ints = {
            "request_id": request_id,
            "state": int(State.WAITING),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": 0,
            "output_tokens": output_tokens,
            "max_tokens": max_tokens if max_tokens is not None else output_tokens,
            "kv_blocks": 0,
            "host_blocks": 0,
            "preemptions": 0,
            "forced_preemptions": 0,
            "admitted_seq": -1,
            "served_since_admit": 0,
            "prefill_left": 0,
            "queue_key": 0,
            "cache_blocks": 0,
            "cache_full": 0,
            "cache_front": 0,
        }
        floats = {
            "arrival_s": arrival_s,
            "ttft_s": ttft_s,
            "tds": tds,
            "digest_max": -np.inf,
            "delay_sum": 0.0,
            "first_token_s": np.nan,
        }
        for name, value in ints.items():
            self._ints[name] = np.append(self._ints[name], np.int64(value))
        for name, fvalue in floats.items():
            self._floats[name] = np.append(self._floats[name], np.float64(fvalue))

    def rows_of(self, request_ids: tuple[int, ...] | IntArray) -> IntArray:
        """Row positions of the given ids that are still on this worker, in the given order."""
        ids = np.asarray(request_ids, dtype=np.int64)
        if ids.size == 0 or len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        table = self._col("request_id")
        order = np.argsort(table, kind="stable")
        pos = np.searchsorted(table, ids, sorter=order)
        pos = np.minimum(pos, table.size - 1)
        rows = order[pos]
        return np.asarray(rows[table[rows] == ids], dtype=np.int64)

    def snapshot(self, now_s: float) -> Snapshot:
        """The planner's view. Arrays are copies: a plan is computed from a frozen state."""
        c = {name: arr.copy() for name, arr in self._ints.items()}
        f = {name: arr.copy() for name, arr in self._floats.items()}
        table = RequestTable(
            request_id=c["request_id"],
            state=c["state"],
            arrival_s=f["arrival_s"],
            ttft_s=f["ttft_s"],
            tds=f["tds"],
            prompt_tokens=c["prompt_tokens"],
            generated_tokens=c["generated_tokens"],
            max_tokens=c["max_tokens"],
            digest_max=f["digest_max"],
            delay_sum=f["delay_sum"],
            kv_blocks=c["kv_blocks"],
            preemptions=c["preemptions"],
            admitted_seq=c["admitted_seq"],
            served_since_admit=c["served_since_admit"],
        )
        return Snapshot(
            now_s=now_s,
            requests=table,
            profile=self.profile,
            kv_blocks_total=self.kv_blocks_total,
            kv_blocks_free=self.kv_blocks_free,
            max_batch=self.max_batch,
        )

    def has_room_for_everyone(self) -> bool:
        """:func:`~andes.policies.base.room_for_everyone` for this worker's requests, held or
        not (their KV demand is summed only where the batch has room for them)."""
        if len(self) > self.max_batch:
            return False
        context = self._col("prompt_tokens") + self._col("generated_tokens")
        demand = int(blocks_for(context, self.profile.block_size).sum())
        return room_for_everyone(len(self), demand, self.max_batch, self.kv_blocks_total)

    def has_work(self) -> bool:
        """Whether a step would do anything (something runs or could start)."""
        state = self._col("state")
        return bool(np.any((state == State.RUNNING) | (state == State.QUEUED)))

    # -- plans ---------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Apply a plan at an iteration boundary; actions that no longer fit are skipped."""
        state = self._col("state")
        for row in self.rows_of(plan.preempt):
            self._preempt(int(row), plan.preemption_mode, forced=False)
        for row in self.rows_of(plan.pause):
            if state[row] == State.RUNNING:
                state[row] = State.PAUSED
        for row in self.rows_of(plan.resume):
            if state[row] == State.PAUSED:
                # A paused request holds KV but still needs a batch slot to run again.
                if np.count_nonzero(state == State.RUNNING) < self.max_batch:
                    state[row] = State.RUNNING
            elif state[row] in (State.PREEMPTED, State.SWAPPED):
                self._enqueue(int(row), front=True)
        for row in self.rows_of(plan.admit):
            if state[row] == State.WAITING:
                self._enqueue(int(row), front=False)

    def _enqueue(self, row: int, *, front: bool) -> None:
        self._seq += 1
        # Front entries sort before every back entry and among themselves in plan order.
        self._col("queue_key")[row] = self._seq - _FRONT if front else self._seq
        self._col("state")[row] = State.QUEUED

    def _preempt(self, row: int, mode: PreemptionMode, *, forced: bool) -> None:
        state = self._col("state")
        current = state[row]
        if current == State.QUEUED:
            # Never got KV back: return it to where it was, nothing to free.
            swapped = self._col("host_blocks")[row] > 0
            preempted_before = self._col("generated_tokens")[row] > 0
            state[row] = (
                State.SWAPPED if swapped else State.PREEMPTED if preempted_before else State.WAITING
            )
            return
        if current not in (State.RUNNING, State.PAUSED):
            return
        blocks = int(self._col("kv_blocks")[row])
        context = int(self._col("prompt_tokens")[row] + self._col("generated_tokens")[row])
        in_prefill = self._col("prefill_left")[row] > 0
        computed = context - int(self._col("prefill_left")[row])
        # The freed blocks join the back of the free queue, last block first (vLLM frees in
        # reverse so a prefix survives longest); its full blocks stay reusable by a prefix-cache
        # hit until allocations from the front of the queue reach them.
        self._col("cache_blocks")[row] = blocks
        self._col("cache_full")[row] = computed // self.profile.block_size
        self._col("cache_front")[row] = self._pops + self.kv_blocks_free
        self.kv_blocks_free += blocks
        self._col("kv_blocks")[row] = 0
        self._col("prefill_left")[row] = 0
        self._col("preemptions")[row] += 1
        if forced:
            self._col("forced_preemptions")[row] += 1
            self.preemptions_forced += 1
        else:
            self.preemptions_planned += 1
        if (
            mode == PreemptionMode.SWAP
            and not in_prefill
            and not forced
            and self.host_blocks_free >= blocks
        ):
            self._col("cache_blocks")[row] = 0
            self._col("cache_full")[row] = 0
            self.host_blocks_free -= blocks
            self._col("host_blocks")[row] = blocks
            self._pending_stall_s += self.profile.swap_time(context)
            state[row] = State.SWAPPED
        else:
            started = self._col("generated_tokens")[row] > 0
            state[row] = State.PREEMPTED if started else State.WAITING
            if not started:
                # Preempted before its first token: it goes back to waiting for admission.
                self._col("admitted_seq")[row] = -1

    # -- one iteration -------------------------------------------------------------------

    def _start_queued(self) -> None:
        """Give queued requests KV in queue order; stop at the first that does not fit."""
        state = self._col("state")
        queued = np.flatnonzero(state == State.QUEUED)
        if queued.size == 0:
            return
        running = int(np.count_nonzero(state == State.RUNNING))
        block_size = self.profile.block_size
        for row in queued[np.argsort(self._col("queue_key")[queued], kind="stable")]:
            context = int(self._col("prompt_tokens")[row] + self._col("generated_tokens")[row])
            need = int(blocks_for(context, block_size))
            if need > self.kv_blocks_free or running >= self.max_batch:
                break
            self.kv_blocks_free -= need
            self._col("kv_blocks")[row] = need
            host = int(self._col("host_blocks")[row])
            if host > 0:
                self.host_blocks_free += host
                self._col("host_blocks")[row] = 0
                self._pending_stall_s += self.profile.swap_time(context)
                self._col("prefill_left")[row] = 0
                self._pops += need
            else:
                hit = self._take_cached(row)
                # A full hit still computes the last token, as vLLM does.
                self._col("prefill_left")[row] = context - min(hit * block_size, context - 1)
                self._pops += need - hit
            state[row] = State.RUNNING
            self._seq += 1
            self._col("admitted_seq")[row] = self._seq
            self._col("served_since_admit")[row] = 0
            running += 1

    def _take_cached(self, row: int) -> int:
        """Blocks of ``row``'s own KV still in the prefix cache, taken back (0 if none)."""
        total = int(self._col("cache_blocks")[row])
        if total == 0:
            return 0
        front = self._col("cache_front")
        consumed = min(max(self._pops - int(front[row]), 0), total)
        hit = min(int(self._col("cache_full")[row]), total - consumed)
        # Blocks queued behind the ones taken back move up by as many.
        behind = (self._col("cache_blocks") > 0) & (front > front[row])
        front[behind] -= hit
        self._col("cache_blocks")[row] = 0
        self._col("cache_full")[row] = 0
        return hit

    def _make_room_for_decode(self, decoding: IntArray) -> IntArray:
        """Preempt (forced, recompute) the newest running requests until decoders fit."""
        block_size = self.profile.block_size
        context = self._col("prompt_tokens") + self._col("generated_tokens")
        forced: list[int] = []
        while True:
            need = blocks_for(context[decoding], block_size) - self._col("kv_blocks")[decoding]
            shortfall = int(np.maximum(need, 0).sum()) - self.kv_blocks_free
            if shortfall <= 0 or decoding.size == 0:
                break
            state = self._col("state")
            running = np.flatnonzero(state == State.RUNNING)
            victim = int(running[np.argmax(self._col("admitted_seq")[running])])
            self._preempt(victim, PreemptionMode.RECOMPUTE, forced=True)
            forced.append(int(self._col("request_id")[victim]))
            decoding = decoding[decoding != victim]
        grow = np.maximum(
            blocks_for(context[decoding], block_size) - self._col("kv_blocks")[decoding], 0
        )
        self._col("kv_blocks")[decoding] += grow
        self.kv_blocks_free -= int(grow.sum())
        self._pops += int(grow.sum())
        return np.asarray(forced, dtype=np.int64)

    def step(self, now_s: float) -> StepResult:
        """Run one iteration starting at ``now_s``."""
        # vLLM V1's order: running requests first (decode growth, preempting the newest when
        # it does not fit), then the waiting queue, and only in a step without preemptions.
        state = self._col("state")
        prefill_left = self._col("prefill_left")
        decoding = np.flatnonzero((state == State.RUNNING) & (prefill_left == 0))
        forced = self._make_room_for_decode(decoding)
        if forced.size == 0:
            self._start_queued()
        state = self._col("state")
        running = state == State.RUNNING
        decoding = np.flatnonzero(running & (prefill_left == 0))

        # Chunked prefill in admission order under the iteration's token budget.
        budget = max(self.profile.max_batched_tokens - decoding.size, 0)
        prefilling = np.flatnonzero(running & (prefill_left > 0))
        prefill_done = np.zeros(0, dtype=np.int64)
        prefill_tokens = 0
        if prefilling.size and budget > 0:
            prefilling = prefilling[np.argsort(self._col("admitted_seq")[prefilling])]
            wanted = prefill_left[prefilling]
            granted = np.clip(budget - (np.cumsum(wanted) - wanted), 0, wanted)
            prefill_left[prefilling] -= granted
            prefill_tokens = int(granted.sum())
            prefill_done = prefilling[(granted > 0) & (prefill_left[prefilling] == 0)]

        context = self._col("prompt_tokens") + self._col("generated_tokens")
        duration = self.profile.iteration_time(
            float(decoding.size), float(context[decoding].sum()), float(prefill_tokens)
        )
        duration += self._pending_stall_s
        self._pending_stall_s = 0.0
        end_s = now_s + duration

        producing = np.concatenate([decoding, prefill_done])
        result = StepResult(
            start_s=now_s,
            end_s=end_s,
            token_request_ids=self._col("request_id")[producing].copy(),
            token_indices=self._col("generated_tokens")[producing].copy(),
            forced_preemptions=forced,
            decode_batch=int(decoding.size),
            prefill_tokens=prefill_tokens,
        )
        if producing.size:
            self._deliver(producing, end_s)
            result.finished = self._retire(end_s)
        return result

    def _deliver(self, rows: IntArray, at_s: float) -> None:
        """One new token for each row at ``at_s``: advance the pacer summary (andes.qoe)."""
        generated = self._col("generated_tokens")
        relative = at_s - self._fcol("arrival_s")[rows]
        d = 1.0 / self._fcol("tds")[rows]
        digest_max = np.maximum(self._fcol("digest_max")[rows], relative - generated[rows] * d)
        self._fcol("digest_max")[rows] = digest_max
        self._fcol("delay_sum")[rows] += np.maximum(digest_max - self._fcol("ttft_s")[rows], 0.0)
        first = self._fcol("first_token_s")
        first[rows] = np.where(generated[rows] == 0, at_s, first[rows])
        generated[rows] += 1
        self._col("served_since_admit")[rows] += 1

    def _retire(self, at_s: float) -> list[FinishedRequest]:
        generated = self._col("generated_tokens")
        done = generated >= np.minimum(self._col("output_tokens"), self._col("max_tokens"))
        if not np.any(done):
            return []
        rows = np.flatnonzero(done)
        self.kv_blocks_free += int(self._col("kv_blocks")[rows].sum())
        self.host_blocks_free += int(self._col("host_blocks")[rows].sum())
        f = self._floats
        c = self._ints
        qoes = np.atleast_1d(
            qoe_from_state(
                generated[rows], f["digest_max"][rows], f["delay_sum"][rows], f["ttft_s"][rows],
                f["tds"][rows],
            )
        )
        finished = [
            FinishedRequest(
                request_id=int(c["request_id"][r]),
                arrival_s=float(f["arrival_s"][r]),
                first_token_s=float(f["first_token_s"][r]),
                finish_s=at_s,
                output_tokens=int(generated[r]),
                prompt_tokens=int(c["prompt_tokens"][r]),
                ttft_s=float(f["ttft_s"][r]),
                tds=float(f["tds"][r]),
                qoe=float(q),
                preemptions=int(c["preemptions"][r]),
                forced_preemptions=int(c["forced_preemptions"][r]),
            )
            for r, q in zip(rows, qoes, strict=True)
        ]
        keep = ~done
        for name in self._ints:
            self._ints[name] = self._ints[name][keep]
        for name in self._floats:
            self._floats[name] = self._floats[name][keep]
        return finished

    def cancel(self, request_ids: tuple[int, ...]) -> int:
        """Drop requests (client gone): frees their KV at once; returns how many were here."""
        rows = self.rows_of(request_ids)
        if rows.size == 0:
            return 0
        self.kv_blocks_free += int(self._col("kv_blocks")[rows].sum())
        self.host_blocks_free += int(self._col("host_blocks")[rows].sum())
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        for name in self._ints:
            self._ints[name] = self._ints[name][keep]
        for name in self._floats:
            self._floats[name] = self._floats[name][keep]
        return int(rows.size)
