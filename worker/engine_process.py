"""A blocking engine in a process of its own, behind the same :class:`~worker.engine.Engine`.

Why: Python runs one thread at a time per process (the GIL). A real engine's step is mostly
Python around short kernels that release the GIL, so an engine sharing its process with the
worker's asyncio thread (publishing to Redis, step reports, plans) waits for the GIL at every
kernel boundary: on the CPU build with a small model its steps ran about 1.5x slower, and the
worker's I/O slowed the engine exactly when it mattered. vLLM's own server splits the same way
(its engine core runs in a process of its own). Here the child owns the engine and the worker
keeps the I/O; they exchange one pickled message per engine call over a pipe.

Protocol: the parent sends ``(method, args)``; the child answers ``(ok, value, state)`` where
``state`` is the engine's ``has_work()``, ``kv_blocks_free`` and, after a ``step``, its
``progress()``: the loop reads them after every call, so the proxy answers those from the last
reply without another round trip. A child that fails to start sends the exception instead of
its facts. When the pipe breaks (the child died) every call raises :class:`EngineDiedError`; when
the parent dies the child's next read ends and it exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from andes.latency import LatencyProfile
from worker.engine import Engine, Finished, PlanSpec, Progress, RequestSpec, StepOutcome

log = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0
"""A real engine may measure its profile at start-up: minutes on a slow machine."""


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


@dataclass(frozen=True)
class _State:
    has_work: bool
    kv_blocks_free: int
    progress: list[Progress] | None
    """After a step: the held requests (None: ask)."""


class EngineProcess:
    """An :class:`Engine` whose calls run in a child process (see the module docstring).

    ``build`` is called in the child: a module-level function (it is pickled by reference),
    with ``config`` as its only argument."""

    blocking = True

    def __init__(self, build: Callable[[Any], Engine], config: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(build, config, child_conn), name="engine", daemon=True
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
        self._held: set[str] = set()
        """The requests the engine holds, followed from the calls' answers, so ``holds``
        (asked before every assignment) costs no round trip."""

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _request(self, method: str, *args: Any) -> Any:
        try:
            self._conn.send((method, args))
            ok, value, state = self._conn.recv()
        except (EOFError, OSError) as err:
            raise EngineDiedError(
                f"the engine process died (exit code {self._process.exitcode})"
            ) from err
        self._state = state
        if not ok:
            raise value
        return value

    # -- the engine interface ------------------------------------------------------------

    @property
    def kv_blocks_free(self) -> int:
        return self._state.kv_blocks_free

    def has_work(self) -> bool:
        return self._state.has_work

    def add(self, spec: RequestSpec) -> list[Finished]:
        result: list[Finished] = self._request("add", spec)
        if not any(done.request_id == spec.request_id for done in result):
            self._held.add(spec.request_id)
        return result

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def apply(self, plan: PlanSpec) -> None:
        self._request("apply", plan)

    def step(self, now_s: float) -> StepOutcome:
        outcome: StepOutcome = self._request("step", now_s)
        self._held.difference_update(done.request_id for done in outcome.finished)
        return outcome

    def cancel(self, request_ids: tuple[str, ...]) -> list[Finished]:
        result: list[Finished] = self._request("cancel", request_ids)
        self._held.difference_update(request_ids)
        return result

    def progress(self) -> list[Progress]:
        if self._state.progress is not None:  # as of the step just taken: nothing since
            return self._state.progress
        result: list[Progress] = self._request("progress")
        return result

    def close(self) -> None:
        """Stop the child (it exits when its pipe closes; killed if it does not)."""
        self._conn.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


_METHODS = frozenset({"add", "apply", "step", "cancel", "progress"})


def _serve(build: Callable[[Any], Engine], config: Any, conn: Connection) -> None:
    """The child: build the engine, then answer calls until the parent goes away."""
    logging.basicConfig(
        level=os.environ.get("ANDES_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s",
    )
    try:
        engine = build(config)
    except BaseException as err:  # reported to the parent, which stops the worker
        _send(conn, (False, err, None))
        return
    facts = _Facts(engine.backend, engine.model, engine.profile, engine.needs_payload)
    conn.send((True, facts, _State(engine.has_work(), engine.kv_blocks_free, None)))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        progress = None
        try:
            if method not in _METHODS:
                raise ValueError(f"not an engine method: {method!r}")
            value = getattr(engine, method)(*args)
            if method == "step":
                progress = engine.progress()
            reply = (True, value, _State(engine.has_work(), engine.kv_blocks_free, progress))
        except Exception as err:
            reply = (False, err, _State(engine.has_work(), engine.kv_blocks_free, None))
        try:
            _send(conn, reply)
        except (EOFError, OSError):
            return


def _send(conn: Connection, reply: tuple[bool, Any, _State | None]) -> None:
    """Send a reply; an exception that does not pickle goes as a RuntimeError with its text."""
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError):
        ok, value, state = reply
        if ok:
            raise
        conn.send((False, RuntimeError(f"{type(value).__name__}: {value}"), state))
