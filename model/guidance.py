"""Constrained decoding: a JSON schema, regular expression, list of choices or Lark grammar, compiled by llguidance
into a matcher that says, before each token, which tokens may come next.

No torch: masks are numpy booleans over the vocabulary. A compiled grammar is shared (cached by its text); each
sequence steps a copy of its matcher.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import numpy as np

from gptserve.model.tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "choice", "grammar")
MAX_CONSTRAINT_BYTES = 65536  # of a schema, regex, grammar or choice list as sent (UTF-8)
CACHED_GRAMMARS = 256  # compiled grammars kept, least recently used first out
MAX_REASON_CHARACTERS = 300  # of the library's complaint quoted back (a status message holds 512)
# JSON is written with one space after ':' and ',' and no other whitespace: a small model given free whitespace
# can spend its whole budget on newlines. A schema's own "x-guidance" settings override these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint the library cannot compile, or one past a limit; the message is the reason."""


@dataclass(frozen=True)
class Constraint:
    """What the output must match, as the client sent it. `text` is the schema (JSON), the regex, the grammar
    (Lark, or GBNF, which llguidance translates), or for `choice` a JSON list of the allowed strings."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind  # the edge maps its fields onto these
        size = len(self.text.encode())
        if size > MAX_CONSTRAINT_BYTES:
            raise ConstraintError(f"{size} bytes; at most {MAX_CONSTRAINT_BYTES}")

    def grammar(self) -> str:
        """llguidance's grammar text for this constraint (not yet checked)."""
        try:
            if self.kind == "json_schema":
                schema = json.loads(self.text)
                if not isinstance(schema, dict):
                    raise ConstraintError("a JSON schema is a JSON object")
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
            if self.kind == "choice":
                choices = json.loads(self.text)
                if not choices or not all(isinstance(choice, str) and choice for choice in choices):
                    raise ConstraintError("at least one choice, each a non-empty string")
            return llguidance.grammar_from(self.kind, self.text)  # type: ignore[arg-type]
        except json.JSONDecodeError as error:
            raise ConstraintError(f"not valid JSON: {error}") from None
        except ConstraintError:
            raise
        except ValueError as error:  # the library's own complaint (a GBNF grammar it cannot translate, ...)
            raise ConstraintError(_reason(str(error))) from None


class Grammar:
    """A compiled constraint, shared by every sequence that uses it: a matcher in its start state to copy."""

    def __init__(self, constraint: Constraint, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.constraint, self._start, self.vocab_size = constraint, matcher, vocab_size

    def guide(self) -> Guide:
        return Guide(self._start.deep_copy(), self.vocab_size)


class Guide:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self, width: int) -> np.ndarray:
        """Which of `width` token ids (the logits' length) may come next: [width] bool. Ids past the tokenizer's
        vocabulary (padding rows of an embedding) never may."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:width].view(np.bool_)
        return allowed if len(allowed) == width else np.pad(allowed, (0, width - len(allowed)))

    def advance(self, token: int) -> None:
        # A masked choice is never refused; what fails here is the library giving up on a grammar it compiled
        # (a lexer past its limits, e.g. a{1000000}): the request's constraint, not a bug.
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"the constraint could not be followed: {_reason(self.matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles constraints for one tokenizer, keeping the most recently used grammars by their text. Safe to call
    from several threads (the edge checks requests off the event loop)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = CACHED_GRAMMARS) -> None:
        self.tokenizer, self.vocab_size, self.cache_size = tokenizer, vocab_size, cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, Grammar] = OrderedDict()
        self._library_tokenizer: llguidance.LLTokenizer | None = None

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (0.15 s for the default model's 49,152 tokens), not at start: most servers never need it.
        if self._library_tokenizer is None:
            self._library_tokenizer = llguidance.LLTokenizer(
                self.tokenizer.backend_json(), n_vocab=self.vocab_size, eos_token=self.tokenizer.eos_token_ids)
        return self._library_tokenizer

    def compile(self, constraint: Constraint) -> Grammar:
        with self._lock:
            if (grammar := self._cache.get(constraint)) is not None:
                self._cache.move_to_end(constraint)
                return grammar
            tokenizer = self._tokenizer()
        text = constraint.grammar()
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)  # drops the GIL while it builds
        if matcher.is_error():
            raise ConstraintError(_reason(matcher.get_error()))
        grammar = Grammar(constraint, matcher, self.vocab_size)
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar


def _reason(message: str) -> str:
    """The library's message on one line, clipped: it can quote the grammar back at length."""
    line = " ".join(message.split())
    return line if len(line) <= MAX_REASON_CHARACTERS else line[:MAX_REASON_CHARACTERS] + "..."
