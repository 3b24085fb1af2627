"""Publishing tokens to the requests' Redis streams: one pipelined round trip per iteration.

Tokens wait here between the iteration that made them and the flush that follows it. All of a
request's waiting tokens go out as one stream entry (``andes.tokenstream`` format), so when
Redis was unreachable for a while the tokens that piled up leave together, in order, once it
is back; nothing is dropped. The entry that ends a response carries its finish reason and the
stream key gets an expiry. The publisher also knows, per request, how many tokens are safely
in Redis: that is what the worker reports as generated, so a request moved to another worker
resumes exactly where its stream ends.

Publish interval: a running request makes a token every iteration (milliseconds on a small
model), far faster than anyone reads. With ``interval_s`` > 0 a request's tokens wait until
the oldest of them is that old, so each stream entry carries several tokens and the whole
delivery path (Redis, the gateway's reads, gRPC messages, the client) handles a fraction of
the entries. A response's first tokens (time to first token) and its final entry never wait,
and a flush with ``force`` (the engine went idle) writes everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from andes.tokenstream import FINISHED_TTL_S, STREAM_MAXLEN, TokenChunk, encode_chunk
from worker.engine import TokenRun

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    key: str
    published: int
    """Index just past the last token stored in Redis."""
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: int = 0
    first_entry: bool = True
    """Nothing published by this worker yet: the next tokens are the client's first (or
    first since a move), which go out at once."""
    waiting_since: float = 0.0
    """When the oldest waiting token arrived."""

    @property
    def dirty(self) -> bool:
        return bool(self.token_ids) or bool(self.finish_reason)

    def due(self, now: float, interval_s: float) -> bool:
        if self.finish_reason or (self.token_ids and self.first_entry):
            return True
        return bool(self.token_ids) and now - self.waiting_since >= interval_s


class TokenPublisher:
    """Buffers each iteration's tokens and writes them to Redis in one pipeline."""

    def __init__(self, redis: Redis, *, maxlen: int = STREAM_MAXLEN, interval_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"publish interval must be >= 0, got {interval_s}")
        self._redis = redis
        self._maxlen = maxlen
        self._interval_s = interval_s
        self._clock = clock
        self._streams: dict[str, _Stream] = {}
        self._healthy = True

    def open(self, request_id: str, key: str, start_index: int) -> None:
        """Start tracking a request whose next token has index ``start_index``."""
        self._streams.setdefault(request_id, _Stream(key, start_index))

    def add(self, run: TokenRun) -> None:
        stream = self._streams[run.request_id]
        expected = stream.published + len(stream.token_ids)
        if run.index != expected:
            raise ValueError(
                f"request {run.request_id}: token index {run.index}, expected {expected}"
            )
        if not stream.token_ids:
            stream.waiting_since = self._clock()
        stream.token_ids.extend(run.token_ids)
        stream.text.append(run.text)

    def finish(self, request_id: str, reason: int) -> None:
        """End the response: its last entry (with any waiting tokens) carries ``reason``."""
        self._streams[request_id].finish_reason = reason

    def forget(self, request_id: str) -> None:
        """Drop a request and its waiting tokens: its stream is no longer this worker's."""
        self._streams.pop(request_id, None)

    def published(self, request_id: str) -> int:
        stream = self._streams.get(request_id)
        return stream.published if stream else 0

    @property
    def pending_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self._streams.values())

    @property
    def has_pending(self) -> bool:
        return any(s.dirty for s in self._streams.values())

    async def flush(self, *, force: bool = False) -> list[str] | None:
        """Write what is due (everything waiting, with ``force`` or no publish interval); the
        requests whose final entry went out, or None on error.

        On a Redis error nothing is lost: the tokens stay here and the next flush retries.
        """
        if force or not self._interval_s:
            dirty = [(rid, s) for rid, s in self._streams.items() if s.dirty]
        else:
            now = self._clock()
            dirty = [(rid, s) for rid, s in self._streams.items()
                     if s.due(now, self._interval_s)]
        if not dirty:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for _, stream in dirty:
            chunk = TokenChunk(
                stream.published, tuple(stream.token_ids), "".join(stream.text),
                stream.finish_reason,
            )
            fields: dict[Any, Any] = encode_chunk(chunk)
            pipe.xadd(stream.key, fields, maxlen=self._maxlen, approximate=True)
            if stream.finish_reason:
                pipe.expire(stream.key, FINISHED_TTL_S)
        try:
            await pipe.execute()
        except (RedisError, OSError) as err:
            if self._healthy:
                log.warning("publishing tokens failed, will retry: %s", err)
            self._healthy = False
            return None
        if not self._healthy:
            log.info("publishing tokens works again")
        self._healthy = True
        done: list[str] = []
        for rid, stream in dirty:
            stream.first_entry = stream.first_entry and not stream.token_ids
            stream.published += len(stream.token_ids)
            stream.token_ids.clear()
            stream.text.clear()
            if stream.finish_reason:
                done.append(rid)
                del self._streams[rid]
        return done
