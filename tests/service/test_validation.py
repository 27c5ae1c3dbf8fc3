"""Every bad input gets INVALID_ARGUMENT naming the field and its allowed range, and the server goes on serving."""

from __future__ import annotations

import math

import grpc
import pytest

from gptserve.service.client import build_request
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server, wait_for

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def served(tiny_engine):
    with running_server(tiny_engine, max_message_bytes=64 * 1024, max_stop_strings=4) as (server, client):
        yield server, client


def request_with(**fields) -> pb.GenerateRequest:
    """A good request with some fields replaced (via protobuf paths like sampling__top_p)."""
    request = build_request("Hello there", max_new_tokens=MAX_NEW_TOKENS)
    for path, value in fields.items():
        *parents, name = path.split("__")
        message = request
        for parent in parents:
            message = getattr(message, parent)
        if isinstance(value, list):
            getattr(message, name).extend(value)
        elif value is None:
            message.ClearField(name)
        else:
            setattr(message, name, value)
    return request


def bad_requests(context_length: int, vocab_size: int) -> dict[str, tuple[pb.GenerateRequest, list[str]]]:
    """name: (request, words its error message must contain)."""
    chat = lambda *roles: build_request(messages=[{"role": role, "content": "hi"} for role in roles],
                                        max_new_tokens=MAX_NEW_TOKENS)
    ids = lambda values: build_request(prompt_token_ids=values, max_new_tokens=MAX_NEW_TOKENS)
    return {
        "no input": (pb.GenerateRequest(), ["input", "prompt", "messages", "prompt_token_ids"]),
        "empty prompt": (request_with(prompt=""), ["prompt", "empty"]),
        "empty chat": (build_request(messages=[], max_new_tokens=MAX_NEW_TOKENS), ["messages", "empty"]),
        "unknown role": (chat("user", "wizard"), ["messages.messages[1].role", "wizard", "system, user"]),
        "empty token ids": (ids([]), ["prompt_token_ids", "empty"]),
        "token id past vocabulary": (ids([1, vocab_size]), ["prompt_token_ids.ids[1]", str(vocab_size),
                                                           f"0 to {vocab_size - 1}"]),
        "negative token id": (ids([-3, 5]), ["prompt_token_ids.ids[0]", "-3", f"0 to {vocab_size - 1}"]),
        "negative temperature": (request_with(sampling__temperature=-0.5), ["sampling.temperature", "-0.5", "0"]),
        # float32 fields: the value is printed as the client wrote it, not rounded to the bound it passed.
        "temperature just past the maximum": (request_with(sampling__temperature=100.0001),
                                              ["sampling.temperature: 100.0001;", "to 100"]),
        "top_p just past one": (request_with(sampling__top_p=1.0000001), ["sampling.top_p: 1.0000001;", "(0, 1]"]),
        "infinite temperature": (request_with(sampling__temperature=float("inf")), ["sampling.temperature"]),
        "NaN temperature": (request_with(sampling__temperature=float("nan")), ["sampling.temperature"]),
        "top_p zero": (request_with(sampling__top_p=0.0), ["sampling.top_p", "(0, 1]"]),
        "top_p above one": (request_with(sampling__top_p=1.5), ["sampling.top_p", "1.5", "(0, 1]"]),
        "negative top_k": (request_with(sampling__top_k=-1), ["sampling.top_k", "-1"]),
        "zero repetition penalty": (request_with(sampling__repetition_penalty=0.0), ["sampling.repetition_penalty"]),
        "max_new_tokens zero": (request_with(stopping__max_new_tokens=0),
                                ["stopping.max_new_tokens", "0", "allowed 1 to"]),
        "max_new_tokens negative": (request_with(stopping__max_new_tokens=-4), ["stopping.max_new_tokens", "-4"]),
        "max_new_tokens past the context": (request_with(stopping__max_new_tokens=context_length),
                                            ["stopping.max_new_tokens", str(context_length), "context length"]),
        "prompt fills the context": (ids([5] * context_length), ["input", str(context_length), "context length"]),
        "too many stop strings": (request_with(stopping__stop=["a", "b", "c", "d", "e"]),
                                  ["stopping.stop", "5", "at most 4"]),
        "empty stop string": (request_with(stopping__stop=["ok", ""]), ["stopping.stop[1]", "1 to"]),
        "request id too long": (request_with(request_id="x" * 129), ["request_id", "129", "128"]),
    }


CASES = list(bad_requests(256, 49152))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_input_is_invalid_argument_then_serving_goes_on(served, tiny_engine, case, method):
    server, client = served
    request, words = bad_requests(tiny_engine.context_length, tiny_engine.vocab_size)[case]
    with pytest.raises(grpc.RpcError) as caught:
        if method == "Generate":
            client.stub.Generate(request, timeout=30)
        else:
            list(client.stub.GenerateStream(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for word in words:
        assert word in caught.value.details(), (word, caught.value.details())
    ids, _, last = collect(client.stream("Hello there", max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert len(ids) == MAX_NEW_TOKENS and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_invalid_requests_are_counted(served):
    server, client = served
    before = server.metrics.value("gptserve_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"})
    with pytest.raises(grpc.RpcError):
        client.generate("Hello", temperature=-1.0)
    # Counted as the call ends on the server, just after the client has its answer.
    wait_for(lambda: server.metrics.value(
        "gptserve_requests_total", {"method": "Generate", "code": "INVALID_ARGUMENT"}) == before + 1)


def test_tokenize_checks_its_input_too(served, tiny_engine):
    server, client = served
    with pytest.raises(grpc.RpcError) as caught:
        client.tokenize(messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "robot" in caught.value.details()
    assert list(client.tokenize("Hello there").token_ids) == tiny_engine.tokenizer.encode("Hello there")


def test_message_larger_than_allowed_is_refused(served):
    server, client = served
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("word " * 20_000, max_new_tokens=1)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate("Hello there", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_unset_max_new_tokens_takes_the_default_capped_to_the_context(served, tiny_engine):
    server, client = served
    prompt_ids = [7] * (tiny_engine.context_length - 3)
    response = client.generate(prompt_token_ids=prompt_ids, ignore_eos=True)
    assert response.usage.completion_tokens == 3 and response.finish_reason == pb.FINISH_REASON_LENGTH


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(served):
    server, client = served
    options = dict(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    first = client.generate("Hello there", temperature=1.0, seed=1234, **options)
    again = client.generate("Hello there", temperature=1.0, seed=1234, **options)
    assert list(first.token_ids) == list(again.token_ids)
    greedy = client.generate("Hello there", **options)
    assert list(client.generate("Hello there", temperature=0.7, top_k=1, **options).token_ids) == list(greedy.token_ids)


@pytest.mark.parametrize("sampling", [{"temperature": 1e-38}, {"temperature": 1e-45},
                                      {"temperature": 1.0, "repetition_penalty": 1e-45},
                                      {"repetition_penalty": 1e-45}])
def test_every_accepted_value_generates_with_finite_logprobs(served, sampling):
    server, client = served
    response = client.generate("Hello there Hello there", max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                               return_logprobs=True, seed=3, **sampling)
    assert len(response.token_ids) == MAX_NEW_TOKENS
    assert all(math.isfinite(logprob) for logprob in response.logprobs), list(response.logprobs)
