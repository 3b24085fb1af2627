"""Incremental text of a response for a byte-level BPE tokenizer, from a table of bytes.

A byte-level BPE vocabulary (GPT-2's scheme, used by Llama 3 and Qwen among others, and by the
tiny model this project builds) maps every token to a fixed byte string; the text of a response
is the UTF-8 decoding of its tokens' bytes, one after the other. So a response's text can be
built incrementally with a table lookup per token and Python's incremental UTF-8 decoder,
which holds back an incomplete multi-byte character until the next token completes it (or
the response ends: then it is U+FFFD, as in the tokenizer's own decoding).

Why not vLLM's detokenizer: it steps a ``tokenizers`` ``DecodeStream`` per token (decoding a
window of tokens each time) behind a Python layer for stop strings, and it runs in the engine's
process, between steps: with the tiny model on the CPU, 6-11% of the engine's time. This costs
a table lookup and one C call per token. Responses with stop strings keep vLLM's detokenizer,
which matches them.

:func:`byte_table` builds the table from the tokenizer and checks it against the tokenizer's
own decoding of every token; a tokenizer with another decoder (SentencePiece's ``Metaspace``,
WordPiece) or one whose check fails gets None, and its responses are decoded by vLLM.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: the printable character that stands for
    each byte in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


BYTE_OF_CHAR = _byte_of_char()


def token_bytes(token: str) -> bytes:
    """A vocabulary entry's bytes, as the ``tokenizers`` ByteLevel decoder reads it: each
    character stands for a byte, unless one of them stands for none (an added token's text
    such as ``<|eot|>`` is all printable ASCII, which stands for itself); then the entry's
    own UTF-8."""
    try:
        return bytes(BYTE_OF_CHAR[char] for char in token)
    except KeyError:
        return token.encode()


def byte_table(tokenizer: Any, vocab_size: int = 0) -> tuple[bytes, ...] | None:
    """Each token id's bytes in the text of a response (special tokens: none, as vLLM's
    default ``skip_special_tokens``), indexed by id up to ``vocab_size`` (a model's vocabulary
    may be padded beyond its tokenizer's: those ids decode to nothing, as in vLLM); None
    unless ``tokenizer`` (a ``tokenizers.Tokenizer``) decodes byte-level and the table decodes
    every token as it does."""
    import tokenizers

    if not isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel):
        return None
    count = tokenizer.get_vocab_size(with_added_tokens=True)
    table = [b""] * max(count, vocab_size)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        table[token_id] = token_bytes(token)
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        table[token_id] = b"" if added.special else token_bytes(added.content)
    expected = tokenizer.decode_batch([[i] for i in range(count)], skip_special_tokens=True)
    wrong = [i for i in range(count) if table[i].decode("utf-8", "replace") != expected[i]]
    if wrong:
        log.warning("the tokenizer's byte-level table decodes %d tokens unlike the tokenizer "
                    "(the first: %d): responses are decoded by vLLM", len(wrong), wrong[0])
        return None
    return tuple(table)


class ResponseText:
    """The text of one response, as its tokens come: the tokenizer's decoding of all of them,
    cut into the pieces each step adds (never inside a character)."""

    __slots__ = ("_table", "_utf8")

    def __init__(self, table: Sequence[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def extend(self, token_ids: Iterable[int], *, final: bool) -> str:
        """The text the tokens add; ``final``: the response ends with them (an incomplete
        character left over becomes U+FFFD)."""
        table = self._table
        return self._utf8.decode(b"".join([table[t] for t in token_ids]), final)
