"""The request payload hash in Redis: what the worker needs that the scheduler does not.

The scheduler only sees metadata (``SubmitRequest``); the prompt itself travels through Redis,
in the hash at ``andes.tokenstream.payload_key(request_id, prefix)``. Fields (all strings):

* ``prompt`` - the prompt text (empty when token ids were given);
* ``prompt_token_ids`` - JSON list of ints (only when the client sent token ids);
* ``prompt_tokens`` - the gateway's prompt token count (``gateway.tokens``);
* ``max_tokens`` - output bound after the gateway's default was applied;
* ``sampling`` - JSON object: temperature, top_p (float or null = model default), top_k,
  seed (int or null), stop (list of strings), ignore_eos;
* ``qoe`` - JSON object: ``{"ttft_s": float, "tds": float}`` after defaults;
* ``arrival_unix_s`` - arrival at the gateway (``repr`` of a float, Unix seconds);
* ``gateway_id`` - the gateway that accepted the request.

Writes go through a :class:`~gateway.redis_batch.CommandBatch`: a burst's payloads and
expiries travel in a few pipelines. Creation is atomic and exclusive (a Lua script): it fails
if the request's payload or token stream already exists, which is how the gateway keeps live
request ids unique across gateways (and why an id can be reused only once its finished keys
expired). The hash expires after ``PAYLOAD_TTL_S`` in any case, so a crashed gateway leaks
nothing; once the response finished it expires together with the token stream
(``andes.tokenstream.FINISHED_TTL_S``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from andes.tokenstream import FINISHED_TTL_S, payload_key, stream_key
from gateway.redis_batch import CommandBatch
from gateway.validation import ValidRequest

PAYLOAD_TTL_S = 3600
"""Upper bound on a request's life: 4096 tokens at a few tokens/s plus queueing fits."""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class StoredRequest:
    """What a resuming stream needs to know about a request another stream started."""

    prompt_tokens: int
    max_tokens: int
    ttft_s: float
    tds: float
    arrival_unix_s: float


class PayloadStore:
    """Writes and expires payload hashes under ``prefix``."""

    def __init__(self, redis: aioredis.Redis, prefix: str, gateway_id: str) -> None:
        self._redis = redis
        self.prefix = prefix
        self.gateway_id = gateway_id
        self._create = redis.register_script(_CREATE)
        self._batch = CommandBatch(redis)

    def payload_key(self, request_id: str) -> str:
        return payload_key(request_id, self.prefix)

    def stream_key(self, request_id: str) -> str:
        return stream_key(request_id, self.prefix)

    async def create(
        self, request: ValidRequest, prompt_tokens: int, arrival_unix_s: float
    ) -> bool:
        """Store the payload; False if the id is taken (live, or finished but not expired)."""
        fields: dict[str, str] = {
            "prompt": request.prompt,
            "prompt_tokens": str(prompt_tokens),
            "max_tokens": str(request.max_tokens),
            "sampling": json.dumps(request.sampling.to_json_dict()),
            "qoe": json.dumps({"ttft_s": request.ttft_s, "tds": request.tds}),
            "arrival_unix_s": repr(arrival_unix_s),
            "gateway_id": self.gateway_id,
        }
        if request.prompt_token_ids:
            fields["prompt_token_ids"] = json.dumps(list(request.prompt_token_ids))
        args: list[str | int] = [PAYLOAD_TTL_S]
        for name, value in fields.items():
            args += [name, value]
        keys = [self.payload_key(request.request_id), self.stream_key(request.request_id)]
        sha = self._create.sha
        try:
            created = await self._batch.run(lambda pipe: pipe.evalsha(sha, 2, *keys, *args))
        except NoScriptError:  # Redis restarted (or flushed its scripts) since the last load
            created = await self._create(keys=keys, args=args)
        return bool(created)

    async def finished(self, request_id: str) -> None:
        """The response ended: keep the payload as long as the token stream stays readable."""
        key = self.payload_key(request_id)
        await self._batch.run(lambda pipe: pipe.expire(key, FINISHED_TTL_S))

    async def delete(self, request_id: str) -> None:
        """Undo :meth:`create` (the scheduler refused the request), freeing the id."""
        await self._redis.delete(self.payload_key(request_id))

    async def lookup(self, request_id: str) -> StoredRequest | None:
        """The stored request, or None if its payload is gone (never existed, or expired)."""
        raw: dict[Any, Any] = await self._redis.hgetall(self.payload_key(request_id))
        if not raw:
            return None
        try:
            qoe: dict[str, Any] = json.loads(raw[b"qoe"])
            return StoredRequest(
                prompt_tokens=int(raw[b"prompt_tokens"]),
                max_tokens=int(raw[b"max_tokens"]),
                ttft_s=float(qoe["ttft_s"]),
                tds=float(qoe["tds"]),
                arrival_unix_s=float(raw[b"arrival_unix_s"]),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"malformed payload of request {request_id!r}: {err}") from err
