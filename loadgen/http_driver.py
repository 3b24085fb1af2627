"""Open-loop traffic against an OpenAI-compatible HTTP API (our gateway or stock vLLM).

Each request is ``POST {base}/completions`` with ``stream: true``, ``max_tokens``,
``ignore_eos: true`` (a vLLM extension the gateway also accepts: the workload fixes output
lengths), ``stream_options: {"include_usage": true, "continuous_usage_stats": true}`` and the
QoE as the body field ``"qoe": {"ttft_s", "tds"}``. The answer is server-sent events, one or
more tokens per chunk; every chunk's tokens get the chunk's receipt time.

How many tokens a chunk carries:

1. ``usage``: vLLM with ``continuous_usage_stats`` puts the cumulative ``completion_tokens``
   in every chunk; the difference to the previous chunk is exact.
2. ``chunk``: otherwise a chunk with text counts as one token (a chunk without text as none).
3. ``text``: if the final usage chunk then reports more tokens than were counted (a server
   that sends several tokens per chunk but no per-chunk counts, as our gateway does under
   load), the reported total is spread over the text chunks in proportion to their text
   length, at least one token each. Totals are then exact; per-token times are an estimate.

A record's ``counted_by`` says which rule applied, and ``usage_tokens`` what the server
reported (None: no final usage, so the count is unverified). aiohttp serves thousands of
concurrent streams from one process (one connection each, no pool limit).
"""

from __future__ import annotations

import json
import resource
from array import array
from typing import Any

import aiohttp

from andes.v1 import generation_pb2
from andes.workload import Workload
from loadgen.openloop import (
    CLOCK,
    DriveResult,
    LiveCounts,
    Stop,
    StreamRecord,
    prompt_text,
    run_open_loop,
)

FINISH_REASONS = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}

STATUS_KINDS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""HTTP statuses as the gRPC status names the gRPC driver reports: one error vocabulary."""

EVENT_ERROR_KINDS = {
    "cancelled": "CANCELLED",
    "server_error": "INTERNAL",
    "rate_limit_error": "RESOURCE_EXHAUSTED",
    "invalid_request_error": "INVALID_ARGUMENT",
}
"""OpenAI error types of an error event inside a stream that had already begun."""

CONNECTION_ERROR = "CONNECTION_ERROR"
INCOMPLETE = "INCOMPLETE"
"""The stream ended without ``data: [DONE]``."""
BAD_EVENT = "BAD_EVENT"
"""An event that is not JSON or lacks the fields of a completion chunk."""


def raise_open_file_limit() -> None:
    """One connection per stream: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id of ``GET {base}/models``: what to put in ``model``."""
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{base_url}/models", headers=_headers(api_key)) as response,
        ):
            response.raise_for_status()
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError) as err:
        raise ValueError(f"cannot list the models at {base_url}/models: {err}") from err
    models = body.get("data") if isinstance(body, dict) else None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"{base_url}/models lists no model: {body!r}")
    return str(models[0]["id"])


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` tokens over chunks in proportion to ``weights`` (text lengths), at
    least one each, by largest remainders. Needs ``total >= len(weights)``."""
    count = len(weights)
    if count == 0 or total < count:
        raise ValueError(f"cannot spread {total} tokens over {count} chunks, one at least each")
    whole = sum(weights)
    exact = [total * w / whole if whole > 0 else total / count for w in weights]
    shares = [max(1, int(x)) for x in exact]
    # The floors lose less than one token per chunk; the minimum of one may add some.
    while (excess := sum(shares) - total) != 0:
        if excess < 0:
            order = sorted(range(count), key=lambda i: shares[i] - exact[i])
            for i in order[:-excess]:
                shares[i] += 1
        else:
            order = sorted((i for i in range(count) if shares[i] > 1),
                           key=lambda i: shares[i] - exact[i], reverse=True)
            for i in order[:excess]:
                shares[i] -= 1
    return shares


class _Chunks:
    """Token accounting of one SSE stream (see the module docstring for the rules)."""

    def __init__(self, record: StreamRecord) -> None:
        self.record = record
        self.chunk_s = array("d")
        """Receipt time of every chunk with text (arrays: see ``StreamRecord``)."""
        self.chunk_chars = array("q")
        """Text length of every chunk with text."""
        self.done = False

    def event(self, data: dict[str, Any], now_s: float) -> None:
        record = self.record
        if "error" in data:
            error = data["error"] if isinstance(data["error"], dict) else {}
            record.error = EVENT_ERROR_KINDS.get(str(error.get("type")), "STREAM_ERROR")
            record.error_detail = str(error.get("message", data["error"]))
            return
        choices = data.get("choices")
        usage = data.get("usage")
        if not choices:
            if isinstance(usage, dict) and "completion_tokens" in usage:
                record.usage_tokens = int(usage["completion_tokens"])
            return
        choice = choices[0]
        text = choice.get("text")
        if text is None:  # a chat chunk
            text = (choice.get("delta") or {}).get("content")
        text = text or ""
        if isinstance(usage, dict) and "completion_tokens" in usage:
            record.counted_by = "usage"
            count = int(usage["completion_tokens"]) - len(record.token_times)
        else:
            record.counted_by = "chunk" if record.counted_by != "usage" else "usage"
            count = 1 if text else 0
        if count > 0:
            record.add_chunk(len(record.token_times), count, now_s)
        if text:
            self.chunk_s.append(now_s)
            self.chunk_chars.append(len(text))
        if finish := choice.get("finish_reason"):
            record.finish_reason = FINISH_REASONS.get(finish, generation_pb2.FINISH_REASON_ERROR)

    def close(self) -> None:
        """After ``[DONE]``: check the count against the final usage, respread if needed."""
        record = self.record
        reported = record.usage_tokens
        counted = len(record.token_times)
        if reported is None or reported == counted:
            return
        if record.counted_by == "chunk" and reported >= len(self.chunk_s) > 0:
            shares = apportion(reported, list(self.chunk_chars))
            record.clear_tokens()
            for now_s, share in zip(self.chunk_s, shares, strict=True):
                record.add_chunk(len(record.token_times), share, now_s)
            record.counted_by = "text"
            return
        record.indices_ok = False


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: StreamRecord,
    clock: float,
) -> None:
    chunks = _Chunks(record)
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                record.error = STATUS_KINDS.get(response.status, f"HTTP_{response.status}")
                record.error_detail = (await response.text())[:500]
                return
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": comments"
                now_s = CLOCK() - clock
                data = line[5:].strip()
                if data == b"[DONE]":
                    chunks.done = True
                    break
                chunks.event(json.loads(data), now_s)
                if record.error:
                    return
    except aiohttp.ClientError as err:
        record.error = CONNECTION_ERROR
        record.error_detail = repr(err)
        return
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        record.error = BAD_EVENT
        record.error_detail = repr(err)
        return
    if not chunks.done:
        record.error = INCOMPLETE
        record.error_detail = "the event stream ended without data: [DONE]"
        return
    chunks.close()


async def drive_http(
    base_url: str,
    workload: Workload,
    *,
    model: str,
    run_id: str = "run",
    api_key: str | None = None,
    stop: Stop | None = None,
    counts: LiveCounts | None = None,
) -> DriveResult:
    """Send ``workload`` to the HTTP API at ``base_url`` (``http://host:port/v1``) and wait
    for every stream to end, or for the drain after ``stop``."""
    raise_open_file_limit()
    url = f"{base_url}/completions"
    # No pool limit and no read timeout: a stream may legitimately wait long for tokens.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def stream(record: StreamRecord, clock: float) -> None:
            body = {
                "model": model,
                "prompt": prompt_text(workload, record.index),
                "max_tokens": record.max_tokens,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "qoe": {"ttft_s": record.ttft_s, "tds": record.tds},
            }
            headers = {**_headers(api_key), "x-request-id": record.request_id}
            await _stream(session, url, body, headers, record, clock)

        return await run_open_loop(workload, stream, run_id=run_id, stop=stop, counts=counts)
