"""Reading thousands of Redis token streams with a handful of connections.

A gateway streams every live request's tokens from its own Redis stream. One blocking
``XREAD`` per request would hold one Redis connection (and one server-side blocked client) per
stream; instead a :class:`StreamHub` runs *readers*, each one task with one ``XREAD BLOCK`` over
up to ``keys_per_reader`` stream keys at once. A reader remembers the last entry id it consumed
per stream and fans decoded :class:`~andes.tokenstream.TokenChunk` s out to per-request queues.
Readers are added as the number of live streams grows, so connections scale with
``streams / keys_per_reader``, not with streams.

Waiting and started streams: a request's stream stays empty while the request waits for the
engine, and under a burst most do. Every XREAD names all its keys (with their last ids), so a
reader whose keys are mostly empty streams would send and Redis would check hundreds of idle
keys on every engine step, for the few that moved. A new subscription therefore joins a
*waiting* reader, which returns only when one of its streams gets its first entry (or a
subscription joins); the reader then moves that stream to a *started* reader, which reads the
streams that are producing tokens. The XREADs issued once per engine step name only those.

Joining a blocked ``XREAD``: a new subscription must not wait for the current block to time
out, so every reader also reads its own small *wake stream*; :meth:`StreamHub.subscribe` appends
to it, which ends the block at once. The reader tracks the wake stream's last id (never ``$``),
so a wake-up sent between building the key list and Redis running the command is not lost.

Backpressure: a queue is bounded. When a request's consumer falls ``queue_size`` chunks
behind, its reader stops reading that key (entries stay in Redis, nothing is dropped) until the
consumer has taken half of them, so one slow client never stalls the other streams, and a
client that never reads holds at most ``queue_size`` chunks here however long its response
(besides a chunk, a queue only ever gets one end-of-stream item: an interruption or an error).
:attr:`StreamHub.peak_queued` and :meth:`StreamHub.backlog` make the bound observable.

Resume: a subscription starts at the stream's first entry and skips entries before its
``from_index`` using the index every entry carries (``TokenChunk.after``).

Failure: while Redis is unreachable readers retry with backoff; after ``outage_s`` of failures
every subscription gets a :class:`StreamError`, so requests end with an error rather than hang.
Not Redis Cluster aware: a multi-key XREAD needs its keys on one node (shard readers by node to
support it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from andes.tokenstream import TokenChunk, decode_chunk
from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)

WAKE_TTL_MS = 3_600_000
"""Wake streams outlive a crashed gateway by at most an hour."""

Item: TypeAlias = "TokenChunk | BaseException"


class StreamError(Exception):
    """The token stream cannot be read (Redis unreachable, malformed entry)."""


class StreamInterrupted(Exception):  # noqa: N818 (a control signal, not an error)
    """The subscription was ended on purpose (for example a Cancel RPC); ``finish_reason`` is
    the ``andes.v1.FinishReason`` the response should end with."""

    def __init__(self, finish_reason: int) -> None:
        super().__init__(f"stream interrupted (finish reason {finish_reason})")
        self.finish_reason = finish_reason


@dataclass(eq=False)
class _Feed:
    """One subscription's state inside its reader."""

    key: str
    from_index: int
    limit: int
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    last_id: bytes = b"0-0"
    paused: bool = False
    """Queue full: the reader skips this key until the consumer drains it."""
    closed: bool = False
    reader: _Reader | None = None


class Subscription:
    """A request's view of its token stream: chunks in stream order, from ``from_index``."""

    def __init__(self, feed: _Feed, hub: StreamHub) -> None:
        self._feed = feed
        self._hub = hub

    @property
    def key(self) -> str:
        return self._feed.key

    async def get(self) -> TokenChunk:
        """The next chunk; raises :class:`StreamError` or :class:`StreamInterrupted`."""
        item = await self._feed.queue.get()
        return self._took(item)

    def get_nowait(self) -> TokenChunk | None:
        """The next chunk if one is already here (None otherwise); raises like :meth:`get`."""
        try:
            item = self._feed.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return self._took(item)

    def interrupt(self, finish_reason: int) -> None:
        """End the subscription: the consumer's next read raises StreamInterrupted."""
        self._feed.queue.put_nowait(StreamInterrupted(finish_reason))
        self._hub.release(self._feed)

    def close(self) -> None:
        """Stop reading this stream (idempotent)."""
        self._hub.release(self._feed)

    def _took(self, item: Item) -> TokenChunk:
        feed = self._feed
        if feed.paused and feed.queue.qsize() <= feed.limit // 2:
            feed.paused = False
            if feed.reader is not None:
                feed.reader.wake()
        if isinstance(item, BaseException):
            raise item
        return item


class StreamHub:
    """Owns the readers; hands out :class:`Subscription` s.

    ``redis`` is a client (``decode_responses`` off) whose pool may open one connection per
    reader plus a few for wake-ups; ``block_ms`` must stay below its ``socket_timeout``
    (redis-py's default is 5 s), or idle blocks end in timeouts and reconnects.
    ``wake_prefix`` names this gateway's wake streams (unique per gateway process).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        wake_prefix: str,
        *,
        keys_per_reader: int = 512,
        block_ms: int = 1000,
        count: int = 256,
        queue_size: int = 64,
        outage_s: float = 10.0,
    ) -> None:
        if keys_per_reader < 1 or queue_size < 1 or count < 1 or block_ms < 1:
            raise ValueError("keys_per_reader, queue_size, count and block_ms must be >= 1")
        self._redis = redis
        # XREAD replies stay raw (entry fields as a flat list): redis-py's own reply callback
        # builds a dict per entry (and converts RESP3 to RESP2's shape), over a third of the
        # cost of reading a token stream. Same connection pool; other commands are unchanged.
        self._xread = aioredis.Redis(connection_pool=redis.connection_pool)
        self._xread.set_response_callback("XREAD", _raw_reply)
        self._wake_prefix = wake_prefix
        self.keys_per_reader = keys_per_reader
        self.block_ms = block_ms
        self.count = count
        self.queue_size = queue_size
        self.outage_s = outage_s
        self._readers: list[_Reader] = []
        self._closed = False
        self.peak_queued = 0
        """The most chunks any one subscription's queue has held (at most ``queue_size``)."""

    @property
    def readers(self) -> int:
        return len(self._readers)

    @property
    def subscriptions(self) -> int:
        return sum(len(reader.feeds) for reader in self._readers)

    @property
    def started(self) -> int:
        """Subscriptions whose stream has begun (read by the started readers)."""
        return sum(len(reader.feeds) for reader in self._readers if reader.started)

    @property
    def paused(self) -> int:
        """Subscriptions whose key is not being read because their consumer is behind."""
        return sum(feed.paused for reader in self._readers for feed in reader.feeds)

    def backlog(self, key: str) -> int:
        """Chunks read from stream ``key`` that its subscriptions' consumers have not taken."""
        return sum(feed.queue.qsize() for reader in self._readers for feed in reader.feeds
                   if feed.key == key)

    async def subscribe(self, key: str, from_index: int = 0) -> Subscription:
        """Start reading ``key`` from token ``from_index``; the reader joins it at once."""
        if self._closed:
            raise StreamError("the stream hub is closed")
        feed = _Feed(key=key, from_index=from_index, limit=self.queue_size)
        self._reader_for(key, started=False).add(feed)
        return Subscription(feed, self)

    def start(self, feed: _Feed) -> None:
        """Move ``feed``, whose stream got its first entry, from its waiting reader to a
        started one (which is woken to take it up from the feed's last id)."""
        if self._closed:
            return  # closing fails every feed where it is; a new reader would outlive it
        if feed.reader is not None:
            feed.reader.remove(feed)
        self._reader_for(feed.key, started=True).add(feed)

    def release(self, feed: _Feed) -> None:
        feed.closed = True
        if feed.reader is not None:
            feed.reader.remove(feed)

    async def close(self) -> None:
        """Stop every reader, fail open subscriptions, delete the wake streams."""
        self._closed = True
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.fail_all(StreamError("the gateway is shutting down"))
            await reader.stop()
        if readers:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(*(reader.wake_key for reader in readers))

    def _reader_for(self, key: str, *, started: bool) -> _Reader:
        # A reader holds each key once (XREAD takes one id per key): a second subscription to
        # the same stream (a resumed client while the first is still attached) goes elsewhere.
        for reader in self._readers:
            if (reader.started == started and len(reader.feeds) < self.keys_per_reader
                    and key not in reader.by_key):
                return reader
        reader = _Reader(self, f"{self._wake_prefix}:{len(self._readers)}", started=started)
        self._readers.append(reader)
        reader.start()
        return reader


class _Reader:
    """One task, one blocking XREAD over its feeds' keys plus its wake stream; a waiting
    reader (``started`` false) hands each feed whose stream begins to a started one."""

    def __init__(self, hub: StreamHub, wake_key: str, *, started: bool) -> None:
        self.hub = hub
        self.wake_key = wake_key
        self.started = started
        self.feeds: set[_Feed] = set()
        self.by_key: dict[str, _Feed] = {}
        self._wake_id: bytes | None = None
        self._wake_pending = False
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wakes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"stream-reader {self.wake_key}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait(self._task)

    def add(self, feed: _Feed) -> None:
        feed.reader = self
        self.feeds.add(feed)
        self.by_key[feed.key] = feed
        self.wake()

    def remove(self, feed: _Feed) -> None:
        # No wake-up: the key simply drops out of the next XREAD.
        self.feeds.discard(feed)
        if self.by_key.get(feed.key) is feed:
            del self.by_key[feed.key]
        feed.reader = None

    def fail_all(self, error: BaseException) -> None:
        for feed in list(self.feeds):
            feed.queue.put_nowait(error)
            self.remove(feed)

    def wake(self) -> None:
        """Make the blocked XREAD return so it picks up a changed key set."""
        self._woken.set()
        if self._wake_pending or self._wake_id is None:
            return  # one wake-up in flight covers every change made before the next XREAD
        self._wake_pending = True
        task = asyncio.create_task(self._send_wake())
        self._wakes.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._wake_sent)

    def _wake_sent(self, task: asyncio.Task[None]) -> None:
        self._wakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("stream reader wake-up failed: %s", task.exception())

    async def _send_wake(self) -> None:
        async with self.hub._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {b"w": b"1"}, maxlen=16, approximate=True)
            pipe.pexpire(self.wake_key, WAKE_TTL_MS)
            await pipe.execute()

    async def _run(self) -> None:
        backoff = 0.05
        failing_since: float | None = None
        while not self._stopping:
            try:
                if self._wake_id is None:
                    self._wake_id = await self._first_wake_id()
                if not self._streams_to_read():
                    # Nothing to read: wait for a subscription instead of polling Redis.
                    self._woken.clear()
                    await self._woken.wait()
                    continue
                await self._read_once()
                backoff, failing_since = 0.05, None
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as err:
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning("reading token streams failed (%s); retrying in %.2f s", err, backoff)
                if now - failing_since >= self.hub.outage_s:
                    self.fail_all(StreamError(f"Redis unavailable: {err}"))
                    failing_since = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _first_wake_id(self) -> bytes:
        # Our own entry's id is a safe starting point on Redis's clock (not ours).
        async with self.hub._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {b"w": b"0"}, maxlen=16, approximate=True)
            pipe.pexpire(self.wake_key, WAKE_TTL_MS)
            entry_id, _ = await pipe.execute()
        return _as_bytes(entry_id)

    def _streams_to_read(self) -> dict[str, bytes]:
        return {f.key: f.last_id for f in self.feeds if not f.paused}

    async def _read_once(self) -> None:
        assert self._wake_id is not None
        self._wake_pending = False
        self._woken.clear()
        # The feeds this XREAD reads for: entries go to exactly these feed objects, never to a
        # feed that replaced one of them meanwhile (its position in the stream differs).
        reading = {f.key: f for f in self.feeds if not f.paused}
        streams: dict[Any, Any] = {self.wake_key: self._wake_id}
        streams.update({key: feed.last_id for key, feed in reading.items()})
        reply = await self.hub._xread.xread(
            streams, count=self.hub.count, block=self.hub.block_ms
        )
        for raw_key, entries in _stream_replies(reply):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            if key == self.wake_key:
                if entries:
                    self._wake_id = _as_bytes(entries[-1][0])
                continue
            feed = reading.get(key)
            if feed is not None and self.by_key.get(key) is feed:
                self._deliver(feed, entries)

    def _deliver(self, feed: _Feed, entries: Sequence[tuple[Any, Sequence[bytes] | None]]) -> None:
        for entry_id, fields in entries:
            if feed.queue.qsize() >= feed.limit:
                feed.paused = True  # re-read from last_id once the consumer catches up
                break
            feed.last_id = _as_bytes(entry_id)
            try:
                chunk = decode_chunk(_field_dict(fields))
            except ValueError as err:
                feed.queue.put_nowait(StreamError(str(err)))
                self.remove(feed)
                return
            part = chunk.after(feed.from_index)
            if part is None:
                continue
            feed.queue.put_nowait(part)
            self.hub.peak_queued = max(self.hub.peak_queued, feed.queue.qsize())
            if part.finish_reason:
                self.remove(feed)  # the final entry: nothing more to read
                return
        if not self.started:
            self.hub.start(feed)


def _raw_reply(response: Any, **options: Any) -> Any:
    """A redis-py response callback that keeps the reply as the parser gave it."""
    return response


def _field_dict(fields: Sequence[bytes] | None) -> dict[bytes, bytes]:
    """A raw entry's flat ``[field, value, ...]`` list as a dict (None: a deleted entry)."""
    if not fields:
        return {}
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _stream_replies(reply: Any) -> Iterable[tuple[Any, Sequence[Any]]]:
    """(key, entries) pairs from an XREAD reply in either RESP2 (list) or RESP3 (dict) form."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(item[0], item[1]) for item in reply]
