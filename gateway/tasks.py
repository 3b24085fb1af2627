"""Stopping a background task for certain.

``task.cancel()`` can be lost on Python 3.11: ``asyncio.wait_for`` (which redis-py uses around
every socket write) returns normally when its inner future completes in the same loop turn as
the cancellation, so the task carries on (fixed in 3.12). A gateway that stops must not hang on
such a task, so cancellation is repeated until the task is really done.
"""

from __future__ import annotations

import asyncio
from typing import Any

RETRY_S = 0.1


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` (again and again if a cancellation gets lost) and wait for it to end.

    Its CancelledError is absorbed; the caller's own cancellation is not.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RETRY_S)
    if not task.cancelled():
        task.exception()  # retrieved: a failure on its own was the owner's to log
