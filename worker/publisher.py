"""Publishing tokens to the requests' Redis streams: one pipelined round trip per iteration.

Tokens wait here between the iteration that made them and the flush that follows it. All of a
request's waiting tokens go out as one stream entry (``andes.tokenstream`` format), so when
Redis was unreachable for a while the tokens that piled up leave together, in order, once it
is back; nothing is dropped. The entry that ends a response carries its finish reason and the
stream key gets an expiry. The publisher also knows, per request, how many tokens are safely
in Redis: that is what the worker reports as generated, so a request moved to another worker
resumes exactly where its stream ends.

Appends are conditional (a server-side script): an entry goes in only where the stream ends
(or into a stream that does not exist, e.g. after Redis lost its data). A stream therefore
never holds two entries that overlap, whoever writes: the part of a failed pipeline that did
land (a paused Redis runs what waits in its socket when it wakes, after the client gave up),
or a worker that was frozen, declared dead and woke up after its requests moved on. When an
append finds the stream ending elsewhere, the publisher drops the tokens the stream already
holds and appends the rest at its end, token by token (each run keeps its own text, so the
text stays whole); a stream that ends before what this worker published is not this
worker's any more, and the publisher stops writing to it.

Publish interval: a running request makes a token every iteration (milliseconds on a small
model), far faster than anyone reads. With ``interval_s`` > 0 a request's tokens wait until
the oldest of them is that old, so each stream entry carries several tokens and the whole
delivery path (Redis, the gateway's reads, gRPC messages, the client) handles a fraction of
the entries. A response's first tokens (time to first token) and its final entry never wait,
and a flush with ``force`` (the engine went idle) writes everything.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from andes.tokenstream import FINISHED_TTL_S, STREAM_MAXLEN, TokenChunk, encode_chunk
from worker.engine import TokenRun

log = logging.getLogger(__name__)


APPEND_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  local index, count = 0, 0
  for k = 1, #fields, 2 do
    if fields[k] == 'i' then index = tonumber(fields[k + 1])
    elseif fields[k] == 't' then count = string.len(fields[k + 1]) / 4 end
  end
  if index + count ~= tonumber(ARGV[1]) then return index + count end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return -1
"""
"""Append the entry (fields from ARGV[4]) if the stream ends at ARGV[1] or does not exist;
else return where it ends. ARGV[2]: approximate max length; ARGV[3]: expiry (0: none)."""
APPEND_SHA = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest()


@dataclass
class _Stream:
    key: str
    published: int
    """Index where the stream ends, as far as this worker knows: its next append goes there."""
    generated: int
    """Index just past the last token the engine made for this request."""
    runs: list[TokenRun] = field(default_factory=list)
    """Tokens made but not in the stream yet, in order, starting at ``published``."""
    finish_reason: int = 0
    first_entry: bool = True
    """Nothing published by this worker yet: the next tokens are the client's first (or
    first since a move), which go out at once."""
    waiting_since: float = 0.0
    """When the oldest waiting token arrived."""

    @property
    def pending(self) -> int:
        """Tokens waiting (``runs`` span ``published``..``generated`` when that is not empty)."""
        return max(self.generated - self.published, 0)

    @property
    def dirty(self) -> bool:
        return bool(self.runs) or bool(self.finish_reason)

    def due(self, now: float, interval_s: float) -> bool:
        if self.finish_reason or (self.runs and self.first_entry):
            return True
        return bool(self.runs) and now - self.waiting_since >= interval_s

    def keep_from(self, index: int) -> None:
        """Drop waiting tokens before ``index`` (the stream holds them already)."""
        self.runs = [_from(run, index) for run in self.runs
                     if run.index + len(run.token_ids) > index]

    def chunk(self) -> TokenChunk:
        return TokenChunk(
            self.published,
            tuple(t for run in self.runs for t in run.token_ids),
            "".join(run.text for run in self.runs),
            self.finish_reason,
        )


def _from(run: TokenRun, index: int) -> TokenRun:
    """The part of ``run`` from token ``index`` on. Text cannot be split per token, so a run
    cut in two leaves its text out."""
    if run.index >= index:
        return run
    return TokenRun(run.request_id, index, run.token_ids[index - run.index:], "")


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
        self._dirty: dict[str, _Stream] = {}
        """The streams with something to write (tokens or an ending): each flush and each
        question about what waits looks at these only, not at every request held (a
        thousand queued requests would cost a millisecond per iteration)."""
        self._pending_tokens = 0
        """Tokens waiting in ``_dirty``'s streams, kept as they change."""
        self._published_moved: set[str] = set()
        """Requests whose ``published`` changed since :meth:`take_published_moved`."""
        self._healthy = True

    def open(self, request_id: str, key: str, start_index: int) -> None:
        """Start tracking a request whose next token has index ``start_index``."""
        self._streams.setdefault(request_id, _Stream(key, start_index, start_index))

    def add(self, run: TokenRun) -> None:
        stream = self._streams.get(run.request_id)
        if stream is None:
            return  # no longer this worker's to write (see ``forget``)
        if run.index != stream.generated:
            raise ValueError(
                f"request {run.request_id}: token index {run.index}, expected {stream.generated}"
            )
        before = stream.pending
        stream.generated += len(run.token_ids)
        if stream.generated <= stream.published:
            return  # another writer put these in the stream already
        if not stream.runs:
            stream.waiting_since = self._clock()
        stream.runs.append(_from(run, stream.published))
        self._pending_tokens += stream.pending - before
        self._dirty[run.request_id] = stream

    def finish(self, request_id: str, reason: int) -> None:
        """End the response: its last entry (with any waiting tokens) carries ``reason``."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finish_reason = reason
            self._dirty[request_id] = stream

    def forget(self, request_id: str) -> None:
        """Drop a request and its waiting tokens: its stream is no longer this worker's."""
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and self._dirty.pop(request_id, None) is not None:
            self._pending_tokens -= stream.pending
        self._published_moved.add(request_id)

    def published(self, request_id: str) -> int:
        stream = self._streams.get(request_id)
        return stream.published if stream else 0

    def take_published_moved(self) -> set[str]:
        """The requests whose :meth:`published` changed since the last call (the step
        report then says so), and forgets them."""
        moved, self._published_moved = self._published_moved, set()
        return moved

    @property
    def pending_tokens(self) -> int:
        return self._pending_tokens

    @property
    def has_pending(self) -> bool:
        return bool(self._dirty)

    async def flush(self, *, force: bool = False) -> list[str] | None:
        """Write what is due (everything waiting, with ``force`` or no publish interval); the
        requests whose final entry went out or that are no longer this worker's to write
        (their stream ends before what it published), or None on error.

        On a Redis error nothing is lost: the tokens stay here and the next flush retries.
        """
        if force or not self._interval_s:
            dirty = list(self._dirty.items())
        else:
            now = self._clock()
            dirty = [(rid, s) for rid, s in self._dirty.items() if s.due(now, self._interval_s)]
        if not dirty:
            return []
        chunks = [stream.chunk() for _, stream in dirty]
        try:
            results = await self._append([stream.key for _, stream in dirty], chunks)
        except (RedisError, OSError) as err:
            if self._healthy:
                log.warning("publishing tokens failed, will retry: %s", err)
            self._healthy = False
            return None
        if not self._healthy:
            log.info("publishing tokens works again")
        self._healthy = True
        done: list[str] = []
        for (rid, stream), chunk, stream_end in zip(dirty, chunks, results, strict=True):
            if stream_end >= 0 and stream_end < stream.published:
                log.warning("request %s: its stream ends at token %d, before the %d this "
                            "worker published: not this worker's any more", rid, stream_end,
                            stream.published)
                done.append(rid)
                self._drop(rid)
                continue
            self._pending_tokens -= stream.pending
            self._published_moved.add(rid)
            if stream_end < 0:  # appended
                stream.first_entry = stream.first_entry and not chunk.token_ids
                stream.published = chunk.end
                stream.runs.clear()
                if chunk.finish_reason:
                    done.append(rid)
                    self._drop(rid)
                    continue
            else:
                # Someone else appended: what the stream holds is not written again.
                stream.published = stream_end
                stream.keep_from(stream_end)
            self._pending_tokens += stream.pending
            if not stream.dirty:
                del self._dirty[rid]
        return done

    async def _append(self, keys: list[str], chunks: list[TokenChunk]) -> list[int]:
        """Conditional appends in one pipeline: -1 for each appended entry, else the index
        where that stream ends. Loads the script where Redis does not have it (a restart)."""
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for key, chunk in zip(keys, chunks, strict=True):
                fields = [x for pair in encode_chunk(chunk).items() for x in pair]
                ttl = FINISHED_TTL_S if chunk.finish_reason else 0
                pipe.execute_command("EVALSHA", APPEND_SHA, 1, key, chunk.index, self._maxlen,
                                     ttl, *fields)
            replies = await pipe.execute(raise_on_error=False)
            missing = any(isinstance(r, NoScriptError) for r in replies)
            if missing and attempt == 0:
                await self._redis.script_load(APPEND_SCRIPT)
                continue  # a NOSCRIPT reply ran nothing: the whole pipeline goes again
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return [int(r) for r in replies]
        raise NoScriptError("the append script cannot be loaded")
