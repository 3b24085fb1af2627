"""Let grpc.aio hand its completion events to the event loop as fast as the loop takes them.

grpc.aio runs one thread that takes gRPC core's completion events (a new call, a message
written or read, a call ended), queues them, and wakes the event loop by writing one byte per
event to a socket pair; the loop's reader callback reads *one* byte and then handles every
queued event. The thread's write blocks once the socket buffer is full, which on Linux is
about 280 one-byte writes (a 208 KiB buffer charges each write's whole socket buffer, some
768 bytes). From then on the thread queues one event per loop iteration: a gateway whose
iterations are long (thousands of streams, a shared CPU) gets one gRPC completion per
iteration for every stream together, accepts new calls at that rate too, and calls it does
not accept within 30 s are dropped by grpc-core as a bare CANCELLED.

Measured with a plain grpc.aio server under uvloop whose loop is kept busy 5 ms per iteration,
2,000 streams of 30 messages each from another process: 188-196 of 2,000 completed as grpc
ships it (the rest were never accepted, so grpc-core dropped them after 30 s), 1,357-1,386
with the drain below (what still fails is grpc.aio accepting calls one at a time).

:func:`drain_grpc_notifications` adds a second reader on the same socket (through a
duplicate of its file descriptor; grpc's own reader stays as it is) that reads every
notification byte but one: grpc's reader, called in the same or the next loop iteration, reads
the last byte and handles every queued event, so the thread never waits more than one loop
iteration however many events it has. (Replacing grpc's reader instead does not work under
uvloop: removing a reader closes its poll handle at the end of the iteration, which unregisters
the descriptor again after it was added back, and the loop never hears from grpc again.) It
finds grpc's private objects through the garbage collector and changes nothing unless they
are exactly as expected.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket

log = logging.getLogger(__name__)

POLLER_TYPE = "PollerCompletionQueue"
"""grpc.aio's completion queue class (``grpc._cython.cygrpc``) for loops that can watch a file
descriptor (asyncio's and uvloop's)."""


class NotificationDrain:
    """The extra reader of one loop; :meth:`close` removes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: socket.socket) -> None:
        self._loop = loop
        self._socket = socket.socket(fileno=os.dup(reader.fileno()))
        self._socket.setblocking(False)
        self.closed = False
        loop.add_reader(self._socket.fileno(), self._drain)

    def _drain(self) -> None:
        """Read the notification bytes but one (grpc's reader reads exactly one byte per
        call and must find it)."""
        try:
            waiting = len(self._socket.recv(1 << 16, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            waiting = 0
        if waiting == 0:  # end of file: grpc shut its completion queue down
            self.close()
        elif waiting > 1:
            self._socket.recv(waiting - 1)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()


def drain_grpc_notifications(
    loop: asyncio.AbstractEventLoop | None = None,
) -> NotificationDrain | None:
    """Add the draining reader to ``loop`` (the running one by default) for grpc.aio's
    completion queue; call it once a grpc.aio channel or server exists on that loop, and
    :meth:`NotificationDrain.close` the result when done with grpc on it. None (and a log
    line) if grpc's internals are not as expected: then nothing is changed."""
    loop = loop or asyncio.get_running_loop()
    queues = [o for o in gc.get_objects() if type(o).__name__ == POLLER_TYPE]
    if len(queues) != 1:
        log.info("grpc.aio completion queue not found (%d): notifications left as they are",
                 len(queues))
        return None
    sockets = [r for r in gc.get_referents(queues[0]) if isinstance(r, socket.socket)]
    readers = [s for s in sockets if not s.getblocking()]
    if len(sockets) != 2 or len(readers) != 1:
        log.info("grpc.aio completion queue unlike the expected one: notifications left as "
                 "they are")
        return None
    return NotificationDrain(loop, readers[0])
