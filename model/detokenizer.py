"""Streaming text from generated tokens: each new token gives the text it completes, never half a character.

A token can end in the middle of a UTF-8 character (byte-level vocabularies split emoji and CJK across tokens),
and some decoders change a token's text by what precedes it. `tokenizers`' DecodeStream handles both: it decodes
a short window of recent tokens and releases text only once it ends on a whole character.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

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
        self._backend = tokenizer._backend  # DecodeStream steps the `tokenizers` object itself
        self._skip_special_tokens = skip_special_tokens
        self._shown = list(prompt_ids[-_PROMPT_CONTEXT:])  # the last tokens whose text is out: context
        # DecodeStream counts context that ends inside a character as unreleased text and would emit it with the
        # first token; that partial character is the prompt's, so the context stops before it.
        while self._shown and self._decode(self._shown).endswith("\ufffd"):
            self._shown.pop()
        self._held: list[int] = []  # pushed, their text not released yet
        self._stream = DecodeStream(ids=self._shown, skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes; empty while it ends inside a character."""
        text = self._stream.step(self._backend, token_id)
        self._held.append(token_id)
        if text is None:
            return ""
        self._shown = (self._shown + self._held)[-_PROMPT_CONTEXT:]
        self._held = []
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as `decode` does)."""
        if not self._held:
            return ""
        text = self._decode(self._shown + self._held)[len(self._decode(self._shown)):]
        # The held tokens are spent (as U+FFFD where they ended inside a character): later pushes start afresh.
        self._held = []
        self._stream = DecodeStream(ids=self._shown, skip_special_tokens=self._skip_special_tokens)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
