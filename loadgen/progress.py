"""The progress display: one line updated in place on a terminal, periodic lines otherwise.

It runs on the driver's own event loop, so it must stay cheap: a terminal line is redrawn
4 times a second (with ``rich`` when it is installed, else a carriage return), a log line is
written every ``--progress-interval`` seconds. Both read :class:`~loadgen.openloop.LiveCounts`,
which the open loop keeps current.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, TextIO

from loadgen.openloop import CLOCK, LiveCounts

TERMINAL_REFRESH_S = 0.25


def render(label: str, counts: LiveCounts) -> str:
    elapsed = CLOCK() - counts.started_s
    line = (f"{label}: sent {counts.sent}/{counts.total}  finished {counts.finished}  "
            f"errors {counts.errors}  in flight {counts.in_flight}  elapsed {elapsed:.1f} s")
    return line + ("  (stopping: draining in-flight streams)" if counts.stopping else "")


class Progress:
    """``async with Progress(label, counts):`` around a run shows its counters."""

    def __init__(self, label: str, counts: LiveCounts, *, out: TextIO | None = None,
                 interval_s: float = 5.0, enabled: bool = True) -> None:
        self.label = label
        self.counts = counts
        self.out = out or sys.stdout
        self.enabled = enabled
        self.terminal = self.out.isatty()
        self.interval_s = TERMINAL_REFRESH_S if self.terminal else interval_s
        self._task: asyncio.Task[None] | None = None
        self._live: Any = None

    async def __aenter__(self) -> Progress:
        if self.enabled:
            if self.terminal:
                self._live = _rich_live(self.out)
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._show(final=True)
        if self._live is not None:
            self._live.stop()

    async def _loop(self) -> None:
        while True:
            self._show()
            await asyncio.sleep(self.interval_s)

    def _show(self, *, final: bool = False) -> None:
        line = render(self.label, self.counts)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text(line), refresh=True)
        elif self.terminal:
            self.out.write("\r" + line + ("\n" if final else ""))
            self.out.flush()
        else:
            print(line, file=self.out, flush=True)


def _rich_live(out: TextIO) -> Any:
    """A started ``rich`` Live display of one line, or None without ``rich``."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        return None
    # Redrawn by our own loop, not rich's refresh thread: no thread contends with sending.
    live = Live(console=Console(file=out), auto_refresh=False, transient=False)
    live.start()
    return live
