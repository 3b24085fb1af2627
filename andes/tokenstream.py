"""The Redis layout every service agrees on: key names and token-stream entries.

One request owns two keys, both carrying the request id as a Redis Cluster hash tag so they
live on one shard:

* ``{prefix}:{<request_id>}:payload`` - a hash with the prompt and sampling parameters the
  gateway stored and the worker reads;
* ``{prefix}:{<request_id>}:tokens`` - a stream the worker appends to and the gateway reads.

A stream entry carries ``i`` (index of its first token in the response), ``t`` (token ids as
little-endian uint32), ``x`` (their text) and, on the last entry only, ``f`` (the finish
reason, an ``andes.v1.FinishReason`` value). Indices make entries self-describing: a reader
resuming from token index k skips entries below it and slices the one that straddles it.
Pure functions only: the services do the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DEFAULT_PREFIX = "andes"
STREAM_MAXLEN = 10_000
"""Approximate cap (``MAXLEN ~``) on one request's token stream."""
FINISHED_TTL_S = 600
"""How long a finished request's keys stay readable (a client may reconnect and resume)."""


def payload_key(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:{{{request_id}}}:payload"


def stream_key(request_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:{{{request_id}}}:tokens"


@dataclass(frozen=True)
class TokenChunk:
    """Consecutive tokens of one response, as one stream entry holds them."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: int = 0
    """0 while the response goes on; an ``andes.v1.FinishReason`` value on the last chunk."""

    @property
    def end(self) -> int:
        """Index just past this chunk's last token."""
        return self.index + len(self.token_ids)

    def after(self, index: int) -> TokenChunk | None:
        """The part of this chunk from token ``index`` on (None if nothing is left).

        Text cannot be split per token without a tokenizer, so a partial chunk keeps its text
        only when it starts at its own first token; readers resume at chunk boundaries.
        """
        if index <= self.index:
            return self
        if index >= self.end and not self.finish_reason:
            return None
        skip = min(index - self.index, len(self.token_ids))
        return TokenChunk(self.index + skip, self.token_ids[skip:], "", self.finish_reason)


def encode_chunk(chunk: TokenChunk) -> dict[bytes, bytes]:
    """Fields of the stream entry for ``chunk``."""
    fields = {
        b"i": str(chunk.index).encode(),
        b"t": struct.pack(f"<{len(chunk.token_ids)}I", *chunk.token_ids),
        b"x": chunk.text.encode(),
    }
    if chunk.finish_reason:
        fields[b"f"] = str(chunk.finish_reason).encode()
    return fields


def decode_chunk(fields: dict[bytes, bytes]) -> TokenChunk:
    """Inverse of :func:`encode_chunk`; raises ValueError on a malformed entry."""
    try:
        raw = fields[b"t"]
        if len(raw) % 4:
            raise ValueError("token field is not a whole number of uint32")
        tokens = struct.unpack(f"<{len(raw) // 4}I", raw)
        return TokenChunk(
            index=int(fields[b"i"]),
            token_ids=tuple(tokens),
            text=fields.get(b"x", b"").decode(),
            finish_reason=int(fields.get(b"f", b"0")),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed token stream entry {fields!r}: {err}") from err
