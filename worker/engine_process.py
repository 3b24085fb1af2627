"""A blocking engine in a process of its own, behind the same :class:`~worker.engine.Engine`.

Why a process: Python runs one thread at a time per process (the GIL). A real engine's step
is mostly Python around short kernels that release the GIL, so an engine sharing its process
with the worker's asyncio thread (publishing to Redis, step reports, plans) waits for the GIL
at every kernel boundary: on the CPU build with a small model its steps ran about 1.5x slower,
and the worker's I/O slowed the engine exactly when it mattered. vLLM's own server splits the
same way (its engine core runs in a process of its own).

Why the child runs ahead: an engine that waits for its worker between steps idles while the
worker takes the last step's outcome in and decides the next one (a pipe hop each way, a
thread hop, the event loop's turn). The child therefore computes the next step as soon as it
has answered for the last one, and holds its outcome until the worker asks: while the worker
publishes step N's tokens, the engine computes step N+1. It runs at most one step ahead, so a
worker that stops asking (Redis is backlogged) stops the engine after one step. Everything the
worker sends is taken in at the next iteration boundary, as before: a plan applies to the step
after the one being computed, a cancel frees KV before the next step starts.

Protocol (one pickled tuple per message, each answer after the messages before it):

* ``("call", method, args)`` for ``cancel`` and ``progress``: answered with
  ``("reply", ok, value, state)`` once the step being computed (if any) is done;
* ``("add", specs)`` and ``("apply", plan)``: not answered, so the worker never waits for a
  step to end to hand over requests or a plan (in a burst of arrivals, waiting for each
  add's answer idled the engine for about a third of its time). Requests the engine refuses
  go back with the next step's answer, as finished; a plan the engine cannot apply is logged
  by the child, which goes on with the last one (a bug, but not a reason to stop serving);
* ``("step",)``: answered with the outcome computed ahead (or computed now, if none was), as
  ``("step", ok, answer, state)`` (the outcome, the changed requests and those gone,
  in plain values: :func:`_answer`), or
  ``("idle", True, refused, state)`` when there is nothing to compute (a plan paused
  everything meanwhile, or every request added was refused).

``state`` is the engine's ``has_work()`` and ``kv_blocks_free`` when the answer leaves, so the
proxy answers those without a round trip. A step's answer carries the held requests whose
state or KV blocks changed since the worker last heard of them, as they are when it leaves (a
plan taken in after the step shows); the proxy counts each request's tokens from the tokens
themselves. All of them after every step of a thousand held requests would cost more to
pickle than the step, and where neither a message nor the step (``StepOutcome.held_changed``)
can have changed any, the child does not even list them. A request cancelled while its step
was computed ahead leaves that outcome before it is sent: its cancel answer counts only the
tokens the worker got. When the pipe breaks (the child died) every call raises
:class:`EngineDiedError`; when the parent dies the child's next read ends and it exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import select
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from andes.heap import settle_heap
from andes.latency import LatencyProfile
from andes.policies.base import State
from andes.v1 import generation_pb2
from worker.engine import (
    Engine,
    Finished,
    PlanSpec,
    Progress,
    ReportsProgressChanges,
    RequestSpec,
    StepOutcome,
    TokenRun,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0
"""A real engine may measure its profile at start-up: minutes on a slow machine."""

ENGINE_NICE = -10
"""The engine process's niceness: it runs before the services beside it. Every token waits
for the engine's steps, while the services' work (publishing, reports, gRPC writes) is short
and can wait a moment; on a host where the engine shares its CPUs with them, a burst of their
work would otherwise slow the step under way. Below 0 needs root or CAP_SYS_NICE: without
them the engine keeps the worker's niceness."""

FEEDER_NICE = -5
"""The niceness of a worker whose engine runs in a process of its own: every step waits for
the worker to take the last step's outcome (the engine runs one step ahead, no more), so a
burst of the gateway's or the scheduler's work on a shared CPU would idle the engine. Between
the engine's and the other services' (0). On the 2-core CPU machine with the tiny model, 1,024
requests: 8,267 / 8,710 / 8,513 tokens/s against 6,307 / 8,340 / 7,690 at 0, interleaved."""


class EngineDiedError(RuntimeError):
    """The engine process is gone: the worker cannot go on (the scheduler moves its requests
    to other workers)."""


@dataclass(frozen=True)
class _Facts:
    """What the parent needs to know of the engine once."""

    backend: str
    model: str
    profile: LatencyProfile
    needs_payload: bool


_State = tuple[bool, int]
"""The engine's ``has_work()`` and ``kv_blocks_free``: plain values, as everything a step's
answer carries (see :func:`_answer`)."""


class EngineProcess:
    """An :class:`Engine` whose calls run in a child process (see the module docstring).

    ``build`` is called in the child: a module-level function (it is pickled by reference),
    with ``config`` as its only argument. ``nice``: the child's niceness (None: the
    worker's); ``cpus``: the CPUs the child runs on (empty: the worker's), see
    :func:`pin_to_cpus`."""

    blocking = True

    def __init__(self, build: Callable[[Any], Engine], config: Any, *,
                 nice: int | None = None, cpus: frozenset[int] = frozenset()) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(build, config, child_conn, nice, cpus), name="engine",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the engine did not start within {START_TIMEOUT_S:g} s")
        try:
            ok, value, state = self._conn.recv()
        except EOFError as err:
            self.close()
            raise RuntimeError(
                f"the engine process exited at start (exit code {self._process.exitcode})"
            ) from err
        if not ok:
            self.close()
            raise value
        facts: _Facts = value
        self.backend = facts.backend
        self.model = facts.model
        self.profile = facts.profile
        self.needs_payload = facts.needs_payload
        self._state: _State = state
        self._news_sent = False
        """Requests or a plan went out since the last answer: the engine may have work now
        (at the least, refusals to hand on)."""
        self._held: set[str] = set()
        """The requests the engine holds, followed from the calls' answers, so ``holds``
        (asked before every assignment) costs no round trip."""
        self._progress: dict[str, Progress] = {}
        """The held requests as of the last step's answer (or ``progress`` call)."""
        self._progress_current = False
        """Nothing was added, cancelled or planned since ``_progress`` was taken."""

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _exchange(self, message: tuple[Any, ...]) -> tuple[str, bool, Any]:
        self._send(message)
        try:
            kind, ok, value, state = self._conn.recv()
        except (EOFError, OSError) as err:
            raise self._died() from err
        self._state = state
        self._news_sent = False
        return kind, ok, value

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._conn.send(message)
        except OSError as err:
            raise self._died() from err

    def _died(self) -> EngineDiedError:
        return EngineDiedError(f"the engine process died (exit code {self._process.exitcode})")

    def _call(self, method: str, *args: Any) -> Any:
        self._progress_current = False
        _, ok, value = self._exchange(("call", method, args))
        if not ok:
            raise value
        return value

    # -- the engine interface ------------------------------------------------------------

    @property
    def kv_blocks_free(self) -> int:
        return self._state[1]

    def has_work(self) -> bool:
        return self._state[0] or self._news_sent

    def add(self, specs: Sequence[RequestSpec]) -> list[Finished]:
        """Refusals come with the next step's outcome, as finished (see the module
        docstring)."""
        self._send(("add", list(specs)))
        self._news_sent = True
        self._progress_current = False
        self._held.update(spec.request_id for spec in specs)
        return []

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def apply(self, plan: PlanSpec) -> None:
        self._send(("apply", plan))
        self._news_sent = True
        self._progress_current = False

    def step(self, now_s: float) -> StepOutcome:
        """The engine's next step: usually computed while the caller handled the last one."""
        kind, ok, value = self._exchange(("step",))
        if kind == "idle":
            refused: list[Finished] = value
            self._held.difference_update(done.request_id for done in refused)
            return StepOutcome(start_s=now_s, duration_s=0.0, idle=True, finished=refused)
        if not ok:
            raise value
        outcome, changed, removed = _from_answer(value)
        held = self._progress
        for request_id in removed:
            held.pop(request_id, None)
        for progress in changed:
            held[progress.request_id] = progress
        # The child sends a request's progress when its state or KV blocks change; its count
        # of tokens is where its tokens end.
        for run in outcome.tokens:
            if (known := held.get(run.request_id)) is not None:
                held[run.request_id] = Progress(run.request_id, run.index + len(run.token_ids),
                                                known.state, known.kv_blocks)
        for done in outcome.finished:
            held.pop(done.request_id, None)
        self._progress_current = True
        self._held.difference_update(done.request_id for done in outcome.finished)
        return outcome

    def cancel(self, request_ids: tuple[str, ...]) -> list[Finished]:
        result: list[Finished] = self._call("cancel", request_ids)
        self._held.difference_update(request_ids)
        for request_id in request_ids:
            self._progress.pop(request_id, None)
        return result

    def progress(self) -> list[Progress]:
        if not self._progress_current:
            held: list[Progress] = self._call("progress")
            self._progress = {p.request_id: p for p in held}
            self._progress_current = True
        return list(self._progress.values())

    def close(self) -> None:
        """Stop the child (it exits when its pipe closes; killed if it does not)."""
        self._conn.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


_CALLS = frozenset({"cancel", "progress"})


def _serve(build: Callable[[Any], Engine], config: Any, conn: Connection,
           nice: int | None, cpus: frozenset[int]) -> None:
    """The child: build the engine, then serve the parent until it goes away."""
    logging.basicConfig(
        level=os.environ.get("ANDES_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s",
    )
    if nice is not None:
        # A session (and scheduling group) of its own only where its niceness differs from
        # its worker's: at the same niceness it shares the worker's group, as before.
        set_nice(nice, "engine", own_session=nice != os.getpriority(os.PRIO_PROCESS, 0))
    try:
        if cpus:
            pin_to_cpus(cpus, "engine")
        engine = build(config)
    except BaseException as err:  # reported to the parent, which stops the worker
        conn.send((False, _picklable(err), None))
        return
    settle_heap()  # after the model and the profile run: their objects stay for good
    facts = _Facts(engine.backend, engine.model, engine.profile, engine.needs_payload)
    conn.send((True, facts, (engine.has_work(), engine.kv_blocks_free)))
    try:
        _EngineCore(engine, conn).run()
    except (EOFError, OSError):
        return  # the worker is gone


def pin_to_cpus(cpus: frozenset[int], who: str) -> None:
    """Run this process (the calling thread and the threads it starts afterwards: call it
    before starting any) on ``cpus`` only; the engine's compute threads default to one per
    CPU (``OMP_NUM_THREADS``, unless set). ValueError if none of them is available here.

    An engine that shares its cores loses time to every service the kernel runs there: with
    the tiny model on the 2-core machine its steps took 8-32% longer beside the services
    than alone, 5% once the engine had a core to itself (docs/results.md). Niceness alone
    does not prevent it: a service that wakes up still preempts the engine for a while."""
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as err:
        available = sorted(os.sched_getaffinity(0))
        raise ValueError(f"the {who} cannot run on CPUs {sorted(cpus)} (this process may use "
                         f"{available}): {err}") from err
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))
    log.info("%s process pinned to CPUs %s", who, format_cpus(cpus))


def avoid_cpus(cpus: frozenset[int], who: str) -> None:
    """Keep this process (the calling thread and the threads it starts afterwards) off
    ``cpus``, the engine's, where it may use others; a warning where it may not."""
    allowed = os.sched_getaffinity(0)
    rest = allowed - cpus
    if not rest:
        log.warning("the %s shares the engine's CPUs %s: it may use no others",
                    who, format_cpus(cpus))
        return
    os.sched_setaffinity(0, rest)
    log.info("%s process on CPUs %s (the engine's: %s)", who, format_cpus(frozenset(rest)),
             format_cpus(cpus))


def parse_cpus(text: str) -> frozenset[int]:
    """A Linux CPU list (``taskset -c`` syntax: ``3``, ``0,2``, ``4-7,12``); empty: none.
    ValueError naming the part that is not one."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 3 or 2-5)") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 3 or 2-5)")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def set_nice(nice: int, who: str, *, own_session: bool = False) -> None:
    """Set this process's niceness (on Linux, that of the calling thread and of the threads
    it starts afterwards: call it before starting any); a warning if it may not.

    Under autogroup scheduling (Linux with ``kernel.sched_autogroup_enabled``, the default of
    many distributions, for processes outside a CPU cgroup of their own) the CPU is shared
    equally between sessions first, and a niceness counts only against the processes of the
    same session: an engine at -10 got no more of a contended core than a gateway at 0 in a
    session of its own, as ``andes up`` starts every service. So a process that leads its
    session also sets its session's group's niceness. ``own_session`` first starts a session
    (the engine's process, a child of the worker): its group is then its own, and setting it
    touches no other process."""
    if own_session:
        os.setsid()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as err:  # PermissionError without CAP_SYS_NICE
        log.warning("the %s keeps niceness %d (could not set %d: %s)",
                    who, os.getpriority(os.PRIO_PROCESS, 0), nice, err)
    # The niceness it has, also where that is an inherited one: a new session's group
    # starts at 0, which would make a process started nicer less nice.
    have = os.getpriority(os.PRIO_PROCESS, 0)
    group = _set_group_nice(have) if os.getsid(0) == os.getpid() else None
    log.info("%s process niceness %d%s", who, have,
             "" if group is None else f", its session's scheduling group {group}")


def _set_group_nice(nice: int) -> int | None:
    """Set the niceness of this process's autogroup; the niceness it has (None: no
    autogroups here)."""
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(nice))
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("could not set the niceness of the session's scheduling group to %d: %s",
                    nice, err)
    return autogroup_nice("self")


def autogroup_nice(pid: int | str) -> int | None:
    """The niceness of a process's autogroup (``/proc/PID/autogroup`` reads
    ``/autogroup-85 nice 0``); None where the kernel has none."""
    try:
        with open(f"/proc/{pid}/autogroup") as group:
            return int(group.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Ahead:
    """A step computed before the worker asked for it."""

    outcome: StepOutcome | None
    error: BaseException | None = None


class _EngineCore:
    """The child's loop: take in every message that waits, then compute a step if the engine
    has work and none is waiting to be sent; block only when there is nothing to compute.

    A step asked for is answered as soon as it is taken in (the worker sends nothing else
    until it has the answer), and the pipe is looked at without reading only before a step
    is computed: in the engine's process, just after a step, each look cost 40 us and each
    read 55 us, where a step of the tiny model on the 2-core machine takes 8 ms."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine = engine
        self.conn = conn
        self.ahead: _Ahead | None = None
        self.step_wanted = False
        self.list_changes = (engine.progress_changes
                             if isinstance(engine, ReportsProgressChanges) else None)
        self.progress_sent: dict[str, Progress] = {}
        """The held requests as the worker knows them once it has read every answer sent
        (their counts of tokens aside: the worker counts those from the tokens)."""
        self.held_changed = False
        """Since ``progress_sent`` was taken, a message or a step may have changed a held
        request's state or KV blocks, or the set of held requests."""
        self.refused: list[Finished] = []
        """Requests added and refused since the last step's answer: it carries them."""

    def run(self) -> None:
        waiting = select.poll()
        waiting.register(self.conn.fileno(), select.POLLIN)
        while True:
            can_compute = self.ahead is None and self.engine.has_work()
            if self.step_wanted and not can_compute:
                self.answer_step()  # the step computed ahead, or idle
            elif not can_compute or waiting.poll(0):
                # Nothing to do but wait for a message; or messages first: they apply to
                # the step about to be computed.
                self.take(self.conn.recv())
            else:
                self.ahead = self.compute()

    def state(self) -> _State:
        return self.engine.has_work(), self.engine.kv_blocks_free

    def compute(self) -> _Ahead:
        try:
            outcome = self.engine.step(time.time())
        except Exception as err:
            return _Ahead(None, _picklable(err))
        self.held_changed |= outcome.held_changed
        return _Ahead(outcome)

    def answer_step(self) -> None:
        ahead, self.ahead, self.step_wanted = self.ahead, None, False
        refused, self.refused = self.refused, []
        if ahead is None:
            self.conn.send(("idle", True, refused, self.state()))
            return
        if ahead.outcome is None:
            self.conn.send(("step", False, ahead.error, self.state()))
            return
        outcome = ahead.outcome
        outcome.finished.extend(refused)
        for done in outcome.finished:  # the worker drops them from what it knows itself
            self.progress_sent.pop(done.request_id, None)
        changed: list[Progress] = []
        removed: list[str] = []
        # Listing every held request is skipped where none can have changed but for its
        # count of tokens: a step of a small model decoding its batch (a listing and its
        # comparison cost about 5% of such a step with 256 requests held).
        if self.held_changed:
            changed, removed = self.held_changes()
            self.held_changed = False
        self.conn.send(("step", True, _answer(outcome, changed, removed), self.state()))

    def held_changes(self) -> tuple[list[Progress], list[str]]:
        """The held requests whose state or KV blocks changed since the worker last heard of
        them, and those gone without finishing; as they are now (a plan taken in after the
        step shows). From the engine's changes where it reports them and they account for
        every request held, else from a listing of them all."""
        sent = self.progress_sent
        if self.list_changes is not None:
            with_kv, without_kv, without_kv_count = self.list_changes()
            changed = _changed(sent, [*with_kv, *without_kv])
            joined = sum(p[0] not in sent for p in changed)
            if len(sent) + joined - len(with_kv) == without_kv_count:
                sent.update((p[0], p) for p in changed)
                return changed, []
            log.debug("the engine's changes miss some of its held requests: listing them all")
        listed = self.engine.progress()
        changed = _changed(sent, listed)
        now = {p.request_id: p for p in listed}
        removed = list(sent.keys() - now.keys())
        self.progress_sent = now
        return changed, removed

    def take(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "step":
            self.step_wanted = True
            return
        self.held_changed = True
        if kind == "add":
            self.add(message[1])
        elif kind == "apply":
            try:
                self.engine.apply(message[1])
            except Exception:
                log.exception("the engine could not apply plan %s", message[1])
        elif kind == "call":
            self.answer_call(message[1], message[2])
        else:
            log.error("unknown message %r", kind)

    def add(self, specs: list[RequestSpec]) -> None:
        try:
            self.refused.extend(self.engine.add(specs))
        except Exception:  # a backend refuses what it cannot take: this is a bug
            log.exception("the engine failed to add %d requests", len(specs))
            self.refused.extend(
                Finished(s.request_id, generation_pb2.FINISH_REASON_ERROR, s.resume_from_tokens)
                for s in specs)

    def answer_call(self, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in _CALLS:
                raise ValueError(f"not an engine call: {method!r}")
            value = getattr(self.engine, method)(*args)
            if method == "cancel":
                value = self.cancelled(tuple(args[0]), value)
            elif method == "progress":
                self.progress_sent = {p.request_id: p for p in value}
                self.held_changed = False
            reply = ("reply", True, value, self.state())
        except Exception as err:
            reply = ("reply", False, _picklable(err), self.state())
        self.conn.send(reply)

    def cancelled(self, request_ids: tuple[str, ...], result: list[Finished]
                  ) -> list[Finished]:
        """The cancel's answer, with the cancelled requests taken out of the step computed
        ahead: the worker ends their streams now and must not get tokens after that."""
        gone = set(request_ids)
        for request_id in gone:
            self.progress_sent.pop(request_id, None)
        # Refused, which the worker has not heard yet: cancelled for it.
        result = result + [replace(done, reason=generation_pb2.FINISH_REASON_CANCELLED)
                           for done in self.refused if done.request_id in gone]
        self.refused = [done for done in self.refused if done.request_id not in gone]
        ahead = self.ahead
        if ahead is None or ahead.outcome is None:
            return result
        outcome = ahead.outcome
        unsent: Counter[str] = Counter()
        for run in outcome.tokens:
            if run.request_id in gone:
                unsent[run.request_id] += len(run.token_ids)
        outcome.tokens = [run for run in outcome.tokens if run.request_id not in gone]
        # Finished in the step ahead, which the worker has not seen: cancelled for it.
        result = result + [
            Finished(done.request_id, generation_pb2.FINISH_REASON_CANCELLED,
                     done.generated_tokens)
            for done in outcome.finished if done.request_id in gone
        ]
        outcome.finished = [f for f in outcome.finished if f.request_id not in gone]
        outcome.forced_preemptions = [r for r in outcome.forced_preemptions if r not in gone]
        return [replace(done, generated_tokens=done.generated_tokens - unsent[done.request_id])
                for done in result]


def _changed(sent: dict[str, Progress], listed: list[Progress]) -> list[Progress]:
    """The entries of ``listed`` whose state or KV blocks differ from ``sent``'s. A backend
    hands out the same entry again for a request it has not touched (every queued one):
    most are skipped by identity, without comparing fields."""
    return [p for p in listed if (known := sent.get(p[0])) is not p
            and (known is None or known[2] != p[2] or known[3] != p[3])]


_TokenColumns = tuple[tuple[str, ...], tuple[int, ...], tuple[tuple[int, ...], ...],
                      tuple[str, ...]]


def _columns(runs: list[TokenRun]) -> _TokenColumns | tuple[()]:
    """A step's token runs as four columns for the pipe: a named tuple pickles through a
    Python-level method of its class, so a full batch's runs took 50 us to pickle in the
    engine's process as named tuples and 4 us as columns of plain values (timeit, 64 runs;
    several times both in a running engine's process, whose caches its step has just
    flushed)."""
    return tuple(zip(*runs, strict=True))  # type: ignore[return-value]


def _runs(columns: _TokenColumns | tuple[()]) -> list[TokenRun]:
    return list(map(TokenRun, *columns)) if columns else []


_Answer = tuple[
    tuple[float, float, list[tuple[str, int, int]], list[str], int],
    tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]] | tuple[()],
    list[str],
    _TokenColumns | tuple[()],
]


def _answer(outcome: StepOutcome, changed: list[Progress], removed: list[str]) -> _Answer:
    """A step's answer as plain values for the pipe: the outcome's fields, the changed
    requests as columns (states as ints), the requests gone, the token runs as columns.
    Dataclasses and enums pickle through Python-level code, and just after a step whatever
    the engine's process does costs several times what it costs warm (pickling the outcome
    as a dataclass took 44 us there, where the whole answer pickles in 16 us warm)."""
    finished = [(done.request_id, done.reason, done.generated_tokens) for done in outcome.finished]
    changed_columns: Any = ()
    if changed:
        request_ids, tokens, states, kv_blocks = zip(*changed, strict=True)
        changed_columns = (request_ids, tokens, tuple(map(int, states)), kv_blocks)
    return ((outcome.start_s, outcome.duration_s, finished, outcome.forced_preemptions,
             outcome.scheduled_tokens), changed_columns, removed, _columns(outcome.tokens))


def _from_answer(answer: _Answer) -> tuple[StepOutcome, list[Progress], list[str]]:
    """The outcome, the changed requests and the requests gone, from :func:`_answer`."""
    values, changed_columns, removed, runs = answer
    start_s, duration_s, finished, forced_preemptions, scheduled_tokens = values
    outcome = StepOutcome(start_s, duration_s, tokens=_runs(runs),
                          finished=[Finished(*done) for done in finished],
                          forced_preemptions=forced_preemptions,
                          scheduled_tokens=scheduled_tokens)
    changed: list[Progress] = []
    if changed_columns:
        request_ids, tokens, states, kv_blocks = changed_columns
        changed = list(map(Progress, request_ids, tokens, map(State, states), kv_blocks))
    return outcome, changed, removed


def _picklable(err: BaseException) -> BaseException:
    """``err``, or a RuntimeError with its text if it does not pickle (it has to cross the
    pipe)."""
    try:
        pickle.dumps(err)
    except (pickle.PicklingError, TypeError, AttributeError):
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err
