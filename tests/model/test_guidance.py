"""Constrained decoding without a model: random logits through Sequence and a compiled grammar with the default
model's real tokenizer. Whatever the logits, the output matches; the grammar's end ends the sequence; compiled
grammars are cached by their text; what the library refuses comes back with its reason."""

import json
import re

import jsonschema
import numpy as np
import pytest

from gptserve.model.generation import FinishReason, Sequence, StoppingParams
from gptserve.model.guidance import MAX_CONSTRAINT_BYTES, Constraint, ConstraintError, GrammarCompiler
from gptserve.model.sampling import SamplingParams
from gptserve.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, cache_size=2)


def run(tokenizer, grammars, constraint: Constraint, seed: int, max_new_tokens: int = 64, **sampling) -> Sequence:
    """A sequence stepped on random logits: only the mask keeps it in shape."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(grammar=grammars.compile(constraint), seed=seed, **sampling)
    sequence = Sequence(tokenizer, [1], params, StoppingParams(max_new_tokens))
    while not sequence.finished:
        sequence.step(rng.normal(0, 3, tokenizer.vocab_size).astype(np.float32))
    return sequence


def test_random_logits_still_match(tokenizer, grammars):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    for seed in range(3):
        sequence = run(tokenizer, grammars, Constraint("json_schema", json.dumps(schema)), seed, temperature=1.0)
        assert sequence.finish_reason is FinishReason.STOP and sequence.stop_reason is None
        jsonschema.validate(json.loads(sequence.text), schema)
        choice = run(tokenizer, grammars, Constraint("choice", json.dumps(["yes", "no", "maybe so"])), seed)
        assert choice.text in ("yes", "no", "maybe so")
        digits = run(tokenizer, grammars, Constraint("regex", "[0-9]{2,4}"), seed, temperature=1.0)
        assert re.fullmatch("[0-9]{2,4}", digits.text)


def test_length_cuts_a_constraint_short(tokenizer, grammars):
    sequence = run(tokenizer, grammars, Constraint("regex", "a{40}"), 0, max_new_tokens=3)
    assert sequence.finish_reason is FinishReason.LENGTH and "a" * 40 != sequence.text


def test_cache_keeps_the_recent(tokenizer, grammars):
    first, second, third = (Constraint("regex", text) for text in ("a", "b", "c"))
    compiled = grammars.compile(first)
    assert grammars.compile(first) is compiled
    grammars.compile(second)
    grammars.compile(third)  # the cache holds two: `first` was the least recently used
    assert grammars.compile(first) is not compiled


@pytest.mark.parametrize(("kind", "text", "reason"), [
    ("json_schema", '{"type": "strin"}', "Invalid type: strin"),
    ("json_schema", "[1]", "a JSON schema is a JSON object"),
    ("json_schema", "{", "not valid JSON"),
    ("regex", "(a", "unclosed group"),
    ("grammar", "start: nothing", 'unknown name: "nothing"'),
    ("choice", "[]", "at least one choice"),
])
def test_refusals_carry_the_reason(grammars, kind, text, reason):
    with pytest.raises(ConstraintError, match=re.escape(reason)):
        grammars.compile(Constraint(kind, text))


def test_size_limit():
    with pytest.raises(ConstraintError, match=f"at most {MAX_CONSTRAINT_BYTES}"):
        Constraint("regex", "a" * (MAX_CONSTRAINT_BYTES + 1))
