"""Streaming text from generated tokens: each new token gives the text it completes, never half a character.

A token can end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK across tokens),
and some decoders change a token's text by what precedes it. So each step decodes a short window twice --
the tokens already shown (from `prefix_offset`) and the same plus the new ones -- and emits the difference.
"""

from __future__ import annotations

from typing import Sequence

from gptserve.model.tokenizer import Tokenizer

# Prompt tokens kept as context for the first generated ones; a few cover any decoder's look-back.
_PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    """Joined, the deltas of `push` and `flush` equal `tokenizer.decode(generated_ids)`.

    (With `prompt_ids`, the first token is decoded after the prompt's last tokens. Byte-level decoders give the
    same text either way; decoders that drop a leading space, like SentencePiece's, keep it, as the model meant.)
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only the window since `prefix_offset` is kept: ids[prefix_offset:read_offset] were shown already
        # (as context), ids[read_offset:] are waiting to complete a character.
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; empty while it ends inside a character."""
        self._ids.append(token_id)
        shown = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        # U+FFFD at the end is an incomplete byte sequence that the next token may complete.
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""
        del self._ids[: self._read_offset]  # keeps each step's work independent of the text's length
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as `decode` does)."""
        shown = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return text[len(shown) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
