"""Streaming end to end on the default model: greedy tokens equal the engine's and the eager model's; the
stream's pieces add up; stop strings never reach the client; health, reflection and model info work."""

from __future__ import annotations

import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.model.sampling import SamplingParams
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server, solo_greedy

MAX_NEW_TOKENS = 12
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(default_engine):
    with running_server(default_engine, max_batch_size=4) as (server, client):
        yield server, client


@pytest.fixture(scope="module")
def eager_step():
    from gptserve.model.eager import EagerStep
    from gptserve.model.spec import load_pretrained

    return EagerStep(load_pretrained("smollm2-135m-instruct").build())


def test_health_reflection_and_model_info(served, default_engine):
    server, client = served
    assert client.health() == "SERVING"
    assert client.health("gptserve.v1.TextGeneration") == "SERVING"
    services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"gptserve.v1.TextGeneration", "grpc.health.v1.Health"} <= services
    info = client.model_info()
    assert info.model_name == "smollm2-135m-instruct" and info.architecture == "llama"
    assert info.context_length == default_engine.context_length and info.vocab_size == default_engine.vocab_size
    assert info.precision == "fp32" and info.execution_provider == "CPUExecutionProvider"
    assert info.parity_passed and "PASSED" in info.parity_report
    assert info.max_batch_size == 4 and info.active_sequences == 0 and info.queued_requests == 0


def test_chat_stream_equals_the_engine_and_the_eager_model(served, default_engine, eager_step):
    server, client = served
    tokenizer = default_engine.tokenizer
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    messages = list(client.stream(messages=QUESTION, max_new_tokens=MAX_NEW_TOKENS, request_id="france"))
    ids, text, last = collect(messages)

    engine_result = solo_greedy(default_engine, prompt_ids, MAX_NEW_TOKENS)
    eager_result = generate(eager_step, Sequence(tokenizer, prompt_ids, SamplingParams(),
                                                 StoppingParams(MAX_NEW_TOKENS)))
    assert ids == engine_result.token_ids == eager_result.token_ids
    assert text == engine_result.text and "Paris" in text
    assert len(messages) > 1 and all(message.request_id == "france" for message in messages)
    assert all(message.finish_reason == pb.FINISH_REASON_UNSPECIFIED for message in messages[:-1])
    reasons = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS}
    expected_reason = reasons[engine_result.finish_reason.value]
    assert last.finish_reason == expected_reason
    assert last.usage.prompt_tokens == len(prompt_ids) and last.usage.completion_tokens == len(ids)
    timings = last.timings
    assert 0 < timings.queue_seconds <= timings.time_to_first_token_seconds <= timings.total_seconds


def test_prompt_stream_pieces_join_to_the_full_text(served, default_engine):
    server, client = served
    prompt = "Once upon a time, in a land far away, there was a dragon who"
    ids, text, last = collect(client.stream(prompt, max_new_tokens=24, ignore_eos=True))
    reference = solo_greedy(default_engine, default_engine.tokenizer.encode(prompt), 24, ignore_eos=True)
    assert ids == reference.token_ids and len(ids) == 24
    assert text == reference.text == default_engine.tokenizer.decode(ids)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH


def test_generate_returns_the_same_tokens_with_logprobs(served, default_engine):
    server, client = served
    prompt = "The three primary colours are"
    response = client.generate(prompt, max_new_tokens=MAX_NEW_TOKENS, return_logprobs=True)
    reference = solo_greedy(default_engine, default_engine.tokenizer.encode(prompt), MAX_NEW_TOKENS)
    assert list(response.token_ids) == reference.token_ids and response.text == reference.text
    np.testing.assert_allclose(response.logprobs, reference.logprobs, atol=1e-4)
    assert all(value <= 0 for value in response.logprobs)
    streamed = list(client.stream(prompt, max_new_tokens=MAX_NEW_TOKENS, return_logprobs=True))
    np.testing.assert_allclose([token.logprob for message in streamed for token in message.tokens],
                               reference.logprobs, atol=1e-4)
    without = list(client.stream(prompt, max_new_tokens=4))
    assert not any(token.HasField("logprob") for message in without for token in message.tokens)


def test_stop_string_across_tokens_never_reaches_the_client(served, default_engine):
    server, client = served
    prompt = "Count from one to twenty in words: one, two, three,"
    tokenizer = default_engine.tokenizer
    reference = solo_greedy(default_engine, tokenizer.encode(prompt), 24, ignore_eos=True)
    start, stop = straddling_stop(tokenizer, reference.token_ids, reference.text)
    ids, text, last = collect(client.stream(prompt, max_new_tokens=24, ignore_eos=True, stop=[stop]))
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert text == reference.text[:start] and stop not in text
    assert ids == reference.token_ids[: len(ids)]


def straddling_stop(tokenizer, ids: list[int], text: str) -> tuple[int, str]:
    """A stop string that starts inside one token and ends inside a later one, first found where it starts."""
    offsets = [len(tokenizer.decode(ids[:count])) for count in range(len(ids) + 1)]
    for token in range(2, len(ids) - 2):
        start, end = offsets[token] + 1, offsets[token + 2] + 1
        if offsets[token + 1] - offsets[token] >= 2 and offsets[token + 3] - offsets[token + 2] >= 2 \
                and text.find(text[start:end]) == start:
            return start, text[start:end]
    raise AssertionError(f"no stop string straddling tokens in {text!r}")


def test_token_ids_in_token_ids_out(served, default_engine):
    server, client = served
    prompt_ids = default_engine.tokenizer.encode("Water boils at")
    response = client.generate(prompt_token_ids=prompt_ids, max_new_tokens=8)
    assert list(response.token_ids) == solo_greedy(default_engine, prompt_ids, 8).token_ids
    rendered = client.tokenize(messages=QUESTION)
    assert "What is the capital of France?" in rendered.rendered_prompt
    assert list(rendered.token_ids) == default_engine.tokenizer.encode(rendered.rendered_prompt,
                                                                       add_special_tokens=False)
