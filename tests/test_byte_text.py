"""A response's text from its tokens' bytes (``worker.byte_text``), against the tokenizer's own
decoding: the tiny model's byte-level BPE tokenizer, real tokenizers from the ``tokenizers``
package."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.byte_text import ResponseText, byte_table, token_bytes


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str) -> object:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(tiny_model, "tokenizer.json")))


@pytest.fixture(scope="module")
def table(tokenizer: object) -> tuple[bytes, ...]:
    built = byte_table(tokenizer)
    assert built is not None, "the tiny model's tokenizer is byte-level"
    return built


def _single_byte_tokens(table: tuple[bytes, ...]) -> list[int]:
    return [i for i, data in enumerate(table) if len(data) == 1]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pieces_add_up_to_the_tokenizers_decoding(
    tokenizer: object, table: tuple[bytes, ...], data: st.DataObject
) -> None:
    """Any tokens (many of them single bytes, so that characters are split, broken and left
    incomplete at the end), cut into steps anyhow: the pieces add up to the tokenizer's
    decoding of them all, specials skipped."""
    single = _single_byte_tokens(table)
    token = st.one_of(st.sampled_from(single), st.integers(0, len(table) - 1))
    token_ids = data.draw(st.lists(token, min_size=1, max_size=80))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(token_ids) - 1), max_size=10))
                  if len(token_ids) > 1 else set())
    bounds = [0, *cuts, len(token_ids)]
    text = ResponseText(table)
    pieces = [text.extend(token_ids[start:end], final=end == len(token_ids))
              for start, end in itertools.pairwise(bounds)]
    whole = tokenizer.decode(token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert "".join(pieces) == whole


def test_a_character_split_over_tokens_waits_to_be_whole(table: tuple[bytes, ...]) -> None:
    by_byte = {table[i][0]: i for i in _single_byte_tokens(table)}
    words = "naïve café → 東京 🙂"
    text = ResponseText(table)
    pieces = [text.extend([by_byte[byte]], final=False) for byte in words.encode()]
    assert "".join(pieces) == words
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") == len(words.encode()) - len(words)  # each waited for its last byte


def test_an_incomplete_character_at_the_end_is_a_replacement(table: tuple[bytes, ...]) -> None:
    by_byte = {table[i][0]: i for i in _single_byte_tokens(table)}
    text = ResponseText(table)
    assert text.extend([by_byte[b] for b in b"ok "], final=False) == "ok "
    assert text.extend([by_byte["東".encode()[0]]], final=False) == ""
    assert text.extend([by_byte["東".encode()[1]]], final=True) == "\ufffd"


def test_special_tokens_add_no_text(tokenizer: object, table: tuple[bytes, ...]) -> None:
    added = tokenizer.get_added_tokens_decoder()  # type: ignore[attr-defined]
    specials = [i for i, token in added.items() if token.special]
    assert specials and all(table[i] == b"" for i in specials)


def test_a_padded_model_vocabulary_decodes_its_extra_ids_to_nothing(tokenizer: object) -> None:
    count = tokenizer.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
    padded = byte_table(tokenizer, count + 64)
    assert padded is not None and len(padded) == count + 64
    assert ResponseText(padded).extend([count, count + 63], final=True) == ""


def test_entries_that_are_not_byte_characters_are_their_own_text() -> None:
    assert token_bytes("Ġhello") == b" hello"
    assert token_bytes("Ã©") == "é".encode()
    assert token_bytes("<|tool ☂|>") == "<|tool ☂|>".encode()


def test_other_decoders_are_left_to_vllm() -> None:
    """A WordPiece or SentencePiece-style tokenizer has no byte table: vLLM decodes it."""
    from tokenizers import Tokenizer, decoders, models

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece.decoder = decoders.WordPiece()
    assert byte_table(wordpiece) is None
    metaspace = Tokenizer(models.BPE({"▁a": 0, "b": 1}, []))
    metaspace.decoder = decoders.Metaspace()
    assert byte_table(metaspace) is None
