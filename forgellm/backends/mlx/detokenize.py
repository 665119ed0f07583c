"""A sequence's text from its tokens, as they are generated: whole characters, and exactly the tokens' bytes."""

from __future__ import annotations

import codecs
from typing import Any

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from forgellm.backends.mlx.decoding import Decoding


class _ByteDetokenizer:
    """A byte-level BPE sequence's text, its tokens' exact bytes decoded as they complete characters.

    mlx-lm's BPE detokenizer drops the space a text starts with; a continuation needs it (" Paris" after "The
    capital is"), and a text must be the join of its tokens as logprobs report them."""

    def __init__(self, decoding: Decoding) -> None:
        self._decoding = decoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def add_token(self, token: int) -> None:
        self._pending += self._decoder.decode(self._decoding.token_text(token)[1])

    def finalize(self) -> None:
        self._pending += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """The text since the last call (as mlx-lm's detokenizers give it)."""
        segment, self._pending = self._pending, ""
        return segment


class Detokenizers:
    """One streaming detokenizer per sequence, so multi-byte characters are emitted whole."""

    def __init__(self, tokenizer: TokenizerWrapper, decoding: Decoding) -> None:
        self._tokenizer = tokenizer
        self._decoding = decoding
        self._byte_level = isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
        self._by_id: dict[int, Any] = {}

    def start(self, seq_id: int) -> None:
        # Other tokenizers (SentencePiece's) through mlx-lm's streaming detokenizers.
        self._by_id[seq_id] = _ByteDetokenizer(self._decoding) if self._byte_level else self._tokenizer.detokenizer

    def text(self, seq_id: int, token: int, finish_reason: str | None) -> str:
        detokenizer = self._by_id[seq_id]
        if finish_reason != "stop":  # an end-of-sequence token is not part of the text
            detokenizer.add_token(token)
        if finish_reason is not None:
            detokenizer.finalize()
            del self._by_id[seq_id]
        return detokenizer.last_segment

    def drop(self, seq_id: int) -> None:
        self._by_id.pop(seq_id, None)
