"""A client that survives the cluster's failures: it reattaches after a lost stream.

Production clients of a streaming service must expect a gateway to go away mid-response
(restart, deploy, crash) or Redis to be briefly unreachable. :func:`follow` streams one
request and, after a resumable failure (UNAVAILABLE), reattaches with the same
``request_id`` and ``resume_from_index`` = the tokens it holds, so the response continues
where it broke; a request the cluster never stored is sent anew. It records what a test or a
soak run needs to prove nothing was lost: every token, whether indices stayed contiguous, and
each interruption.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from andes.v1 import generation_pb2, generation_pb2_grpc

RESUMABLE = {grpc.StatusCode.UNAVAILABLE}
"""Codes after which a client reattaches (the gateway went away, or Redis is out)."""


@dataclass
class Received:
    """One response as its client saw it, across reattachments."""

    request_id: str
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    contiguous: bool = True
    """Every message started exactly where the previous one ended: nothing duplicated or
    missing."""
    finish_reason: int = 0
    attachments: int = 0
    """Generate calls made (1 + reattachments)."""
    interruptions: list[str] = field(default_factory=list)
    """The status of each call that ended early and was followed by a reattachment."""
    error: str = ""
    """The status it finally ended with, if not a finished response."""
    error_detail: str = ""

    @property
    def complete(self) -> bool:
        return (not self.error and self.contiguous and bool(self.finish_reason)
                and len(self.token_ids) == self.max_tokens)

    def describe(self) -> str:
        return (f"{self.request_id}: {len(self.token_ids)}/{self.max_tokens} tokens, "
                f"contiguous={self.contiguous}, finish={self.finish_reason}, "
                f"attachments={self.attachments}, interruptions={self.interruptions}, "
                f"error={self.error} {self.error_detail}")


async def follow(
    target: str,
    request: generation_pb2.GenerateRequest,
    *,
    reattach_for_s: float = 30.0,
    into: Received | None = None,
    channel: grpc.aio.Channel | None = None,
) -> Received:
    """Stream ``request`` to its end as a production client would: after a resumable
    failure, reattach (same ``request_id``, ``resume_from_index`` = tokens held), retrying
    with backoff for up to ``reattach_for_s``; a request the cluster never stored
    (NOT_FOUND on reattaching) is sent anew. ``into``: a record to fill as tokens arrive
    (to watch progress). ``channel``: a channel to ``target`` to share (one is opened
    otherwise)."""
    received = into or Received(request.request_id, request.max_tokens)
    retry_until: float | None = None
    backoff = 0.05
    reattaching = False
    if channel is None:
        async with grpc.aio.insecure_channel(target) as own:
            return await follow(target, request, reattach_for_s=reattach_for_s, into=received,
                                channel=own)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
    while True:
        call_request = request if not reattaching else generation_pb2.GenerateRequest(
            request_id=request.request_id, reattach=True,
            resume_from_index=len(received.token_ids),
        )
        received.attachments += 1
        try:
            async for message in stub.Generate(call_request):
                if message.index != len(received.token_ids):
                    received.contiguous = False
                received.token_ids.extend(message.token_ids)
                received.text.append(message.text)
                if message.finish_reason:
                    received.finish_reason = message.finish_reason
            return received
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if reattaching and code == grpc.StatusCode.NOT_FOUND and not received.token_ids:
                reattaching = False  # it was never stored: send it anew
                received.interruptions.append(code.name)
                continue
            now = time.monotonic()
            retry_until = retry_until or now + reattach_for_s
            if code not in RESUMABLE or now > retry_until:
                received.error, received.error_detail = code.name, err.details() or ""
                return received
            received.interruptions.append(code.name)
            reattaching = True
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
