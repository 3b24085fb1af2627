"""The open loop both transports share, and the records they fill.

Every request of a :class:`~andes.workload.Workload` leaves at its arrival time whether or not
earlier ones finished (open loop: a slow server cannot slow the offered load down). A
transport (:mod:`loadgen.driver` for gRPC, :mod:`loadgen.http_driver` for HTTP/SSE) supplies
only a coroutine that sends one request and feeds its chunks into a :class:`StreamRecord`;
the clock, the send-lag measurement, stopping and draining, and the live counters of the
progress line live here once, so the two transports produce records that compare field by
field.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from andes.metrics import RequestOutcomes
from andes.qoe import qoe
from andes.workload import Workload

FloatArray = npt.NDArray[np.float64]

CLOCK = time.perf_counter
"""The run's clock: monotonic and sub-microsecond, unlike ``time.time``."""

INTERRUPTED = "INTERRUPTED"
"""Error kind of a stream still open when the drain after a stop ran out of time."""
CLIENT_ERROR = "CLIENT_ERROR"
"""Error kind of an exception in the load generator's own code (a bug, never the server)."""


def synthetic_prompt(tokens: int) -> str:
    """A prompt that any of our token counters (words, chars/4) counts as ``tokens`` long."""
    return " ".join(["abc"] * max(tokens, 1))


def prompt_text(workload: Workload, index: int) -> str:
    """Request ``index``'s prompt: the trace's text when it has one, else synthetic."""
    if workload.prompts is not None:
        return workload.prompts[index]
    return synthetic_prompt(int(workload.prompt_tokens[index]))


@dataclass
class StreamRecord:
    """One request as the client saw it. Times are seconds on the run's clock."""

    index: int
    request_id: str
    sent_s: float
    ttft_s: float
    """The TTFT the user expects (the workload's), not the measured one."""
    tds: float
    """The token delivery speed the user expects, tokens/s."""
    intended_s: float = 0.0
    """When the workload says the request arrives; ``sent_s - intended_s`` is the send lag."""
    max_tokens: int = 0
    token_times: array[float] = field(default_factory=lambda: array("d"))
    """Receipt time of every token (a message of k tokens gives k equal entries)."""
    message_index: array[int] = field(default_factory=lambda: array("q"))
    """Per message: the index of its first token."""
    message_tokens: array[int] = field(default_factory=lambda: array("q"))
    """Per message: its token count."""
    message_wall_s: array[float] = field(default_factory=lambda: array("d"))
    """Per message: its receipt time on the wall clock (``time.time``), comparable with Redis
    stream entry IDs, which are the same machine's wall clock."""
    indices_ok: bool = True
    """Token indices arrived contiguous from 0, nothing duplicated or missing (HTTP: the
    counted tokens agree with the server's final ``usage``)."""
    finish_reason: int = 0
    """``andes.v1.FinishReason`` (HTTP's ``stop``/``length`` are mapped onto it)."""
    error: str = ""
    """The failure's kind (a gRPC status code's name, also for HTTP statuses) if it failed."""
    error_detail: str = ""
    ended_s: float = math.nan
    """When the stream ended (finished, failed or was interrupted), on the run's clock."""
    usage_tokens: int | None = None
    """Completion tokens the server reported at the end (HTTP ``usage``; None: not sent)."""
    counted_by: str = "message"
    """How chunk token counts were known: ``message`` (gRPC: token ids per message),
    ``usage`` (HTTP: cumulative usage in every chunk), ``chunk`` (HTTP: one token per chunk
    with text), ``text`` (HTTP: the final usage spread over chunks by text length)."""

    # Per-token and per-message data live in arrays, not lists of floats or tuples: the garbage
    # collector never traverses an array, so thousands of long streams cannot make its full
    # collections slow enough to stall the event loop (and with it the send schedule).

    def add_chunk(self, first_index: int, count: int, now_s: float) -> None:
        """Record a message of ``count`` tokens starting at ``first_index``, received now."""
        if first_index != len(self.token_times):
            self.indices_ok = False
        self.message_index.append(first_index)
        self.message_tokens.append(count)
        self.message_wall_s.append(time.time())
        self.token_times.extend(array("d", [now_s]) * count)

    def clear_tokens(self) -> None:
        """Forget every message and token (to record them again, differently counted)."""
        for values in (self.token_times, self.message_wall_s):
            del values[:]
        for counts in (self.message_index, self.message_tokens):
            del counts[:]

    @property
    def messages(self) -> list[tuple[int, int, float]]:
        """(index of the first token, token count, wall-clock receipt time) per message."""
        return list(zip(self.message_index, self.message_tokens, self.message_wall_s,
                        strict=True))

    def chunk_times(self) -> list[float]:
        """Receipt time of every message that carried tokens (ITL is their gaps)."""
        times: list[float] = []
        position = 0
        for count in self.message_tokens:
            if count > 0 and position < len(self.token_times):
                times.append(self.token_times[position])
            position += count
        return times

    @property
    def completed(self) -> bool:
        return bool(self.token_times) and not self.error

    @property
    def qoe(self) -> float:
        """QoE by :func:`andes.qoe.qoe` (the client pacer's closed form), from the send."""
        times = np.frombuffer(self.token_times, dtype=np.float64) - self.sent_s
        return qoe(times, self.ttft_s, self.tds)


@dataclass
class DriveResult:
    records: list[StreamRecord]
    """Every request that was sent, in arrival order."""
    send_lag_s: FloatArray
    """Actual minus intended send time of every sent request: the client's own lag."""
    interrupted: bool = False
    """Arrivals were stopped early (SIGINT); only the sent requests are in ``records``."""
    wall_s: float = 0.0

    def outcomes(self) -> RequestOutcomes:
        done = [r for r in self.records if r.completed]
        return RequestOutcomes(
            arrival_s=np.array([r.sent_s for r in done]),
            first_token_s=np.array([r.token_times[0] for r in done]),
            finish_s=np.array([r.token_times[-1] for r in done]),
            output_tokens=np.array([len(r.token_times) for r in done], dtype=np.float64),
            qoe=np.array([r.qoe for r in done]),
            preemptions=np.zeros(len(done)),
        )

    def itl_s(self) -> FloatArray:
        """vLLM's ITL: the gaps between consecutive token-carrying chunks, pooled."""
        gaps = [np.diff(r.chunk_times()) for r in self.records if r.completed]
        return np.concatenate(gaps) if gaps else np.zeros(0)

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            if record.error:
                counts[record.error] = counts.get(record.error, 0) + 1
        return counts


@dataclass
class LiveCounts:
    """What the progress line shows; updated by the open loop as streams start and end."""

    total: int
    sent: int = 0
    finished: int = 0
    errors: int = 0
    stopping: bool = False
    started_s: float = field(default_factory=CLOCK)

    @property
    def in_flight(self) -> int:
        return self.sent - self.finished - self.errors


StreamFn = Callable[[StreamRecord, float], Awaitable[None]]
"""A transport's part: send ``record``'s request and feed its chunks (``add_chunk``, times
relative to the clock origin given as the second argument); set ``record.error`` on failure
and return normally."""


@dataclass
class Stop:
    """How a run is ended early: ``stop`` ends arrivals and starts a drain of at most
    ``drain_timeout_s``; ``abort`` cancels every open stream at once."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    drain_timeout_s: float = 60.0


async def run_open_loop(
    workload: Workload,
    stream: StreamFn,
    *,
    run_id: str,
    stop: Stop | None = None,
    counts: LiveCounts | None = None,
) -> DriveResult:
    """Send every request of ``workload`` at its arrival time through ``stream``; wait for
    every stream to end (or, after ``stop``, for the drain)."""
    stop = stop or Stop()
    counts = counts or LiveCounts(total=len(workload))
    records: list[StreamRecord] = []
    lags = np.full(len(workload), math.nan)
    open_streams = [0]
    all_ended = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    clock = CLOCK()
    counts.started_s = clock

    async def one(record: StreamRecord) -> None:
        # Stamped here, when the task first runs, not when it was created: a client whose
        # event loop is too busy to start streams on time must show that as send lag.
        record.sent_s = CLOCK() - clock
        lags[record.index] = record.sent_s - record.intended_s
        counts.sent += 1
        try:
            await stream(record, clock)
        except asyncio.CancelledError:
            record.error = record.error or INTERRUPTED
            raise
        except Exception as err:  # a bug here must cost one request, not the whole run
            record.error = CLIENT_ERROR
            record.error_detail = repr(err)
        finally:
            record.ended_s = CLOCK() - clock
            if record.error:
                counts.errors += 1
            else:
                counts.finished += 1
            open_streams[0] -= 1
            if open_streams[0] == 0 and sender.done():
                all_ended.set()

    async def send_all() -> None:
        for i in range(len(workload)):
            intended = float(workload.arrival_s[i])
            # Timers may fire a little early (libuv's millisecond clock): sleep again.
            while (delay := intended - (CLOCK() - clock)) > 0:
                await asyncio.sleep(delay)
            record = StreamRecord(
                index=i,
                request_id=f"{run_id}-{i}",
                sent_s=intended,
                ttft_s=float(workload.ttft_s[i]),
                tds=float(workload.tds[i]),
                intended_s=intended,
                max_tokens=int(workload.output_tokens[i]),
            )
            records.append(record)
            open_streams[0] += 1
            tasks.append(asyncio.create_task(one(record)))

    sender = asyncio.create_task(send_all())
    stopped = asyncio.create_task(stop.stop.wait())
    aborted = asyncio.create_task(stop.abort.wait())
    ended = asyncio.create_task(all_ended.wait())
    try:
        await asyncio.wait({sender, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        if open_streams[0] == 0:
            all_ended.set()
        deadline: float | None = None
        while not all_ended.is_set():
            if stop.stop.is_set() and deadline is None:
                deadline = CLOCK() + stop.drain_timeout_s
                counts.stopping = True
            guards = {ended, aborted} | (set() if deadline is not None else {stopped})
            timeout = None if deadline is None else max(deadline - CLOCK(), 0.0)
            await asyncio.wait(guards, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if stop.abort.is_set() or (deadline is not None and CLOCK() >= deadline):
                break
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for record, task in zip(records, tasks, strict=True):
            if task.cancelled() and not record.error:  # cancelled before it ever ran
                record.error = INTERRUPTED
    finally:
        for guard in (sender, stopped, aborted, ended):
            guard.cancel()
        await asyncio.gather(sender, stopped, aborted, ended, return_exceptions=True)
    return DriveResult(
        records=records,
        send_lag_s=lags[: len(records)],
        interrupted=len(records) < len(workload) or stop.stop.is_set(),
        wall_s=CLOCK() - clock,
    )
