"""The shared Redis layout: key names and token-stream entries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from andes.tokenstream import TokenChunk, decode_chunk, encode_chunk, payload_key, stream_key

chunks = st.builds(
    TokenChunk,
    index=st.integers(0, 10**9),
    token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=64).map(tuple),
    text=st.text(max_size=200),
    finish_reason=st.integers(0, 4),
)


@given(chunks)
def test_round_trip(chunk: TokenChunk) -> None:
    assert decode_chunk(encode_chunk(chunk)) == chunk


def test_multibyte_text_survives() -> None:
    chunk = TokenChunk(3, (1, 2), "héllo wörld 你好 🙂", 0)
    assert decode_chunk(encode_chunk(chunk)).text == chunk.text


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {b"i": b"0"},
        {b"i": b"x", b"t": b""},
        {b"i": b"0", b"t": b"\x00\x01\x02"},
        {b"i": b"0", b"t": b"", b"x": b"\xff\xfe"},
        {b"i": b"0", b"t": b"", b"f": b"stop"},
    ],
)
def test_malformed_entries_raise_value_error(fields: dict[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="malformed token stream entry"):
        decode_chunk(fields)


def test_resume_slices_a_straddling_chunk() -> None:
    chunk = TokenChunk(10, (5, 6, 7, 8), "a b c d", 0)
    assert chunk.after(0) is chunk
    assert chunk.after(10) is chunk
    rest = chunk.after(12)
    assert rest is not None and rest.index == 12 and rest.token_ids == (7, 8)
    assert chunk.after(14) is None


def test_resume_past_the_end_still_sees_the_finish() -> None:
    last = TokenChunk(10, (5, 6), "a b", finish_reason=2)
    rest = last.after(12)
    assert rest is not None and rest.token_ids == () and rest.finish_reason == 2


def test_keys_share_a_hash_tag() -> None:
    assert payload_key("r1") == "andes:{r1}:payload"
    assert stream_key("r1", prefix="p") == "p:{r1}:tokens"
    tag = payload_key("abc").split("{")[1].split("}")[0]
    assert tag == stream_key("abc").split("{")[1].split("}")[0]
