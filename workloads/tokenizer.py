"""A byte-level tokenizer: a token id is one byte of the text's UTF-8 encoding (ids 0..255).

Byte ids make prompt lengths exact (the load generator sends random ids and knows every count) and match the
built-in `tiny` model's 256-entry vocabulary. Decoding is incremental for streaming: a multi-byte character
split across tokens comes out whole with the token that completes it, never as halves.

Ids outside 0..255 (a real model's vocabulary is larger: Qwen2.5 has 152064) have no bytes here: each decodes
to one U+FFFD, so every generated token stays visible in the text instead of vanishing. Bytes that are not
UTF-8 decode to U+FFFD too (errors="replace"), and a character cut short by such an id is one U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

VOCAB_SIZE = 256
REPLACEMENT = "\ufffd"


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    decoder = StreamDecoder()
    return "".join(decoder.push(token) for token in ids) + decoder.flush()


class StreamDecoder:
    """Text for one token at a time; `flush()` once at the end returns a character left incomplete (as U+FFFD)."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if 0 <= token < VOCAB_SIZE:
            return self._utf8.decode(bytes((token,)))
        return self.flush() + REPLACEMENT

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
