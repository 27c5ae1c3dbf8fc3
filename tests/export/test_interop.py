"""onnxruntime-genai loads an exported folder unmodified, and its greedy tokens equal ours."""

import numpy as np
import pytest

from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.service.engine import Engine

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
NEW_TOKENS = 20


def genai_greedy(model, prompt_ids):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + NEW_TOKENS,
                              min_length=len(prompt_ids) + NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(token) for token in generator.get_sequence(0)[len(prompt_ids):]]


@pytest.mark.parametrize("artifact_name", ["tiny_artifact", "default_artifact"])
def test_genai_greedy_equals_ours(artifact_name, request):
    artifact = request.getfixturevalue(artifact_name)
    engine = Engine.load(artifact)
    model = og.Model(str(artifact))
    tokenizer = og.Tokenizer(model)
    for prompt in PROMPTS:
        prompt_ids = engine.tokenizer.encode(prompt)
        assert list(tokenizer.encode(prompt)) == prompt_ids
        ours = generate(engine.step, Sequence(engine.tokenizer, prompt_ids,
                                              stopping=StoppingParams(NEW_TOKENS, ignore_eos=True))).token_ids
        assert genai_greedy(model, prompt_ids) == ours
