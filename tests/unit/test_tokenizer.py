"""The byte-level tokenizer: round trips, and streaming that never splits a character."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workloads.tokenizer import REPLACEMENT, StreamDecoder, decode, encode


@given(st.text())
def test_text_round_trips(text):
    ids = encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text


@given(st.text(min_size=1))
def test_streaming_emits_whole_characters_in_order(text):
    decoder = StreamDecoder()
    pieces = [decoder.push(token) for token in encode(text)]
    assert decoder.flush() == ""
    # Equal text means no piece held half a character (it would have come out as U+FFFD).
    assert "".join(pieces) == text


def test_split_multibyte_character_comes_out_with_its_last_byte():
    decoder = StreamDecoder()
    assert [decoder.push(b) for b in "€".encode()] == ["", "", "€"]
    assert [decoder.push(b) for b in "😀a".encode()] == ["", "", "", "😀", "a"]


@given(st.lists(st.integers(0, 255)))
def test_any_bytes_decode_as_utf8_with_replacement(ids):
    decoder = StreamDecoder()
    streamed = "".join(decoder.push(token) for token in ids) + decoder.flush()
    assert streamed == bytes(ids).decode("utf-8", errors="replace")


def test_ids_outside_the_byte_range_decode_to_one_replacement_each():
    assert decode([104, 300, 105, 152063]) == f"h{REPLACEMENT}i{REPLACEMENT}"
    # A character cut short by such an id is replaced as a whole, then the id's own replacement follows.
    assert decode([0xE2, 0x82, 1000, 97]) == f"{REPLACEMENT}{REPLACEMENT}a"
