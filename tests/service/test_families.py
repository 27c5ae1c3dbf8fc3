"""Served greedy tokens equal transformers' `generate` for the model families: a real server on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
import transformers

from gptserve.service.engine import Engine
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server
from tests.tiny_models import FAMILY_NEW_TOKENS, FAMILY_PROMPT


# Llama 3 stops on its second end-of-sequence id; Qwen3 runs to the limit through per-head norms and head_dim 32.
@pytest.mark.parametrize("kind, finish_reason", [("llama3", pb.FINISH_REASON_EOS), ("qwen3", pb.FINISH_REASON_LENGTH)])
def test_served_greedy_tokens_equal_transformers(kind, finish_reason, family_folders, family_artifacts):
    engine = Engine.load(family_artifacts[kind], provider="cpu")
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders[kind], dtype=torch.float32).eval()
    prompt = torch.tensor([engine.tokenizer.encode(FAMILY_PROMPT)])  # (1, T)
    with torch.no_grad():
        output = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=FAMILY_NEW_TOKENS)
    expected = output[0, prompt.shape[1]:].tolist()

    with running_server(engine) as (_, client):
        assert client.model_info().architecture == engine.manifest.model.config.architecture
        response = client.generate(FAMILY_PROMPT, max_new_tokens=FAMILY_NEW_TOKENS, temperature=0.0)
        streamed, _, last = collect(client.stream(FAMILY_PROMPT, max_new_tokens=FAMILY_NEW_TOKENS, temperature=0.0))
    assert list(response.token_ids) == streamed == expected
    assert response.finish_reason == last.finish_reason == finish_reason
