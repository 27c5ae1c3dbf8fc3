"""The OpenAI-compatible HTTP API (service/http_api.py) on a real server on 127.0.0.1, through the official `openai`
client (and httpx2, the client it is built on, where the raw bytes matter): greedy results identical to the gRPC
path and to the engine's solo run, stream shapes, n with a seed, logprobs, every bad field a 400 naming it, 401,
404, 429, 503 while loading, disconnects that free their slots, and HTTP and gRPC streams batched together."""

from __future__ import annotations

import functools
import json
import math
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from gptserve.service.bench import free_port
from gptserve.service.server import BackgroundServer, ServerConfig
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server, solo_greedy, wait_for

MODEL = "smollm2-135m-instruct"
MAX_BATCH = 8
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
TOKEN = "sesame"
IDS = {"return_token_ids": True}  # vLLM's: token_ids and prompt_token_ids in each choice
# HTTP returns the engine's float64 logprobs, gRPC rounds them to float32 (1e-7 at these magnitudes). Two runs of
# one greedy request normally give bit-identical logprobs, but full-module runs right after a fresh export have
# shown the first token's logprob 1.6e-6 apart between the HTTP and the gRPC run (about one float32 step of a
# logit): engine numerics, not the API's mapping. Hence 1e-5, not 1e-6.
LOGPROB_TOLERANCE = 1e-5
GRPC_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop"}


@pytest.fixture(scope="module")
def served(default_engine):
    """The module's server: HTTP beside gRPC, answering to an alias too."""
    with running_server(default_engine, http_port=free_port(), max_batch_size=MAX_BATCH, max_queue=16,
                        served_model_names=("alias",)) as (server, client):
        yield server, client


@pytest.fixture(scope="module")
def base_url(served):
    return f"http://127.0.0.1:{served[0].http_port}"


@pytest.fixture(scope="module")
def api(base_url):
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def guarded(default_engine):
    """A server with a bearer token and room for one sequence, none waiting."""
    with running_server(default_engine, client_token=TOKEN, http_port=free_port(), auth_token=TOKEN,
                        max_batch_size=1, max_queue=0) as (server, client):
        yield server, client


# Helpers --------------------------------------------------------------------------------------------------------

def grpc_request(*, prompt: str | None = None, messages: list[dict] | None = None, ids: list[int] | None = None,
                 max_new_tokens: int, **fields) -> pb.GenerateRequest:
    """A GenerateRequest with the new core fields (n, top_logprobs, ...) that client.build_request lacks."""
    sampling = fields.pop("sampling", {})
    stopping = fields.pop("stopping", {})
    request = pb.GenerateRequest(sampling=pb.SamplingParameters(**sampling),
                                 stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping), **fields)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.messages.extend(pb.ChatMessage(**message) for message in messages)
    else:
        request.prompt_token_ids.ids.extend(ids or [])
    return request


def grpc_generate(client, **options) -> pb.GenerateResponse:
    return client.stub.Generate(grpc_request(**options), timeout=120, metadata=client.metadata)


@functools.cache
def _solo(engine, prompt_ids: tuple[int, ...], max_new_tokens: int):
    return solo_greedy(engine, prompt_ids, max_new_tokens)


def engine_run(engine, prompt_ids, max_new_tokens: int):
    """support.solo_greedy, each prompt run once per module."""
    return _solo(engine, tuple(prompt_ids), max_new_tokens)


def chat_ids(engine, messages) -> list[int]:
    tokenizer = engine.tokenizer
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def extra(model, name: str):
    """A field OpenAI's types do not declare (vLLM's token_ids, stop_reason), as the client kept it."""
    return (model.model_extra or {}).get(name)


def gather(chunks, chat: bool) -> tuple[dict[int, dict], list]:
    """A stream's choices put back together: per index its text, token ids, finish and stop reasons."""
    chunks = list(chunks)
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            entry = choices.setdefault(choice.index, {"text": "", "token_ids": [], "finish_reason": None,
                                                      "stop_reason": None, "prompt_token_ids": None})
            assert entry["finish_reason"] is None, "a chunk after the choice's finish_reason"
            entry["text"] += (choice.delta.content or "") if chat else choice.text
            entry["token_ids"] += extra(choice, "token_ids") or []
            entry["prompt_token_ids"] = extra(choice, "prompt_token_ids") or entry["prompt_token_ids"]
            entry["finish_reason"] = choice.finish_reason
            entry["stop_reason"] = extra(choice, "stop_reason")
    return choices, chunks


def metric(server, name: str, labels: dict[str, str] | None = None) -> float:
    return server.metrics.value(name, labels)


def decode_batches(server) -> tuple[float, float]:
    """(decode steps so far, of which with more than one sequence)."""
    count = metric(server, "gptserve_batch_size_count")
    return count, count - metric(server, "gptserve_batch_size_bucket", {"le": "1.0"})


def active(server) -> int:
    return server.server.backend.scheduler.active_count


# Greedy results: identical to the gRPC path and to the engine ---------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_greedy_equals_grpc_and_engine(served, api, default_engine, stream):
    server, client = served
    prompt_ids = chat_ids(default_engine, QUESTION)
    solo = engine_run(default_engine, prompt_ids, 12)
    reference = grpc_generate(client, messages=QUESTION, max_new_tokens=12)
    assert list(reference.token_ids) == solo.token_ids and reference.text == solo.text

    options = dict(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, user="someone", extra_body=IDS)
    if stream:
        choices, chunks = gather(api.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **options), chat=True)
        [choice] = choices.values()
        text, token_ids, finish = choice["text"], choice["token_ids"], choice["finish_reason"]
        prompt_token_ids, usage = choice["prompt_token_ids"], chunks[-1].usage
        assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    else:
        response = api.chat.completions.create(**options)
        assert response.object == "chat.completion" and response.model == MODEL
        [choice] = response.choices
        assert choice.index == 0 and choice.message.role == "assistant"
        text, token_ids, finish = choice.message.content, extra(choice, "token_ids"), choice.finish_reason
        prompt_token_ids, usage = extra(choice, "prompt_token_ids"), response.usage

    assert text == reference.text == solo.text and "Paris" in text
    assert token_ids == list(reference.token_ids) == solo.token_ids
    assert prompt_token_ids == prompt_ids
    assert finish == ("length" if len(token_ids) == 12 else "stop")
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(token_ids))
    assert usage.total_tokens == len(prompt_ids) + len(token_ids)
    assert (usage.prompt_tokens, usage.completion_tokens) == (reference.usage.prompt_tokens,
                                                              reference.usage.completion_tokens)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_greedy_equals_grpc_and_engine(served, api, default_engine, stream):
    server, client = served
    prompt_ids = default_engine.tokenizer.encode(PROMPT)
    solo = engine_run(default_engine, prompt_ids, 12)
    reference = grpc_generate(client, prompt=PROMPT, max_new_tokens=12)
    assert list(reference.token_ids) == solo.token_ids

    options = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12, extra_body=IDS)
    if stream:
        choices, chunks = gather(api.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **options), chat=False)
        [choice] = choices.values()
        text, token_ids, finish = choice["text"], choice["token_ids"], choice["finish_reason"]
        prompt_token_ids, usage = choice["prompt_token_ids"], chunks[-1].usage
        assert all(chunk.object == "text_completion" for chunk in chunks)
    else:
        response = api.completions.create(**options)
        assert response.object == "text_completion" and response.model == MODEL
        [choice] = response.choices
        text, token_ids, finish = choice.text, extra(choice, "token_ids"), choice.finish_reason
        prompt_token_ids, usage = extra(choice, "prompt_token_ids"), response.usage

    assert text == reference.text == solo.text
    assert token_ids == list(reference.token_ids) == solo.token_ids
    assert prompt_token_ids == prompt_ids
    assert finish == ("length" if len(token_ids) == 12 else "stop")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(prompt_ids), len(token_ids), len(prompt_ids) + len(token_ids))


@pytest.mark.parametrize("fields, grpc_fields, finish, stop_reason", [
    ({"stop": ["answer"]}, {"stopping": {"stop": ["answer"]}}, "stop", "answer"),
    ({"stop": "answer", "include_stop_str_in_output": True},
     {"stopping": {"stop": ["answer"], "include_stop_str_in_output": True}}, "stop", "answer"),
    ({"stop_token_ids": [30]}, {"stopping": {"stop_token_ids": [30]}}, "stop", 30),  # 30 is "."
    ({"logit_bias": {"7042": -100}}, {"sampling": {"logit_bias": {7042: -100}}}, "length", None),  # no " Paris"
    ({"presence_penalty": 1.5, "frequency_penalty": 0.5},
     {"sampling": {"presence_penalty": 1.5, "frequency_penalty": 0.5}}, "length", None),
    ({"temperature": 0.8, "seed": 11, "top_k": 20, "min_p": 0.05},
     {"sampling": {"temperature": 0.8, "seed": 11, "top_k": 20, "min_p": 0.05}}, None, None),
], ids=["stop", "include-stop", "stop-token", "logit-bias", "penalties", "min-p-sampling"])
def test_core_fields_mean_the_same_on_both_apis(served, api, fields, grpc_fields, finish, stop_reason):
    server, client = served
    body = {"temperature": 0, **fields}
    temperature = body.pop("temperature")
    seed = body.pop("seed", None)
    response = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=temperature,
                                      seed=seed, extra_body={**IDS, **body})
    reference = grpc_generate(client, prompt=PROMPT, max_new_tokens=12, **grpc_fields)
    [choice] = response.choices
    assert extra(choice, "token_ids") == list(reference.token_ids)
    assert choice.text == reference.text
    assert choice.finish_reason == GRPC_FINISH[reference.finish_reason] and extra(choice, "stop_reason") == stop_reason
    assert finish is None or choice.finish_reason == finish
    if isinstance(stop_reason, str):
        assert reference.choices[0].stop_string == stop_reason
        assert choice.text.endswith(stop_reason) == bool(fields.get("include_stop_str_in_output"))
        assert stop_reason in choice.text or not fields.get("include_stop_str_in_output")
    elif isinstance(stop_reason, int):
        assert reference.choices[0].stop_token_id == stop_reason
    if "logit_bias" in fields:
        assert 7042 not in extra(choice, "token_ids")


def test_min_tokens_holds_back_the_end(served, api, default_engine):
    """The greedy answer ends with EOS after 8 tokens; min_tokens 10 keeps it going, on both APIs alike."""
    server, client = served
    response = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12,
                                           extra_body={**IDS, "min_tokens": 10})
    reference = grpc_generate(client, messages=QUESTION, max_new_tokens=12, stopping={"min_tokens": 10})
    token_ids = extra(response.choices[0], "token_ids")
    assert token_ids == list(reference.token_ids) and len(token_ids) >= 10
    assert not set(default_engine.tokenizer.eos_token_ids) & set(token_ids[:10])


# Stream shapes ------------------------------------------------------------------------------------------------

def test_chat_stream_chunk_shapes(api):
    chunks = list(api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4,
                                              stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL for chunk in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.finish_reason is None
    assert all(choice.delta.role is None for chunk in chunks[1:] for choice in chunk.choices)
    *body, last_choice, usage = chunks
    assert all(chunk.choices[0].finish_reason is None for chunk in body)
    assert last_choice.choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 4
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + 4
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == "The capital of France"


def test_stream_without_include_usage_has_no_usage_chunk(api):
    chunks = list(api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4, stream=True))
    assert all(chunk.choices for chunk in chunks) and all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_a_stop_finish_reason(api):
    choices, chunks = gather(api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=12,
                                                    stream=True, stop=["answer"]), chat=False)
    [choice] = choices.values()
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "answer"
    assert choice["text"] == " Paris.\n\nThe "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_server_sent_events(base_url):
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx2.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [event for event in raw.split("\n\n") if event.strip()]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]" and raw.endswith("data: [DONE]\n\n")
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


# n sequences with a seed -----------------------------------------------------------------------------------------

def test_n_with_a_seed(served, api):
    server, client = served
    options = dict(model=MODEL, prompt="Once upon a time", temperature=1, seed=1234, max_tokens=12, extra_body=IDS)
    first = api.completions.create(n=2, **options)
    again = api.completions.create(n=2, **options)
    alone = api.completions.create(n=1, **options)
    assert sorted(choice.index for choice in first.choices) == [0, 1]
    ids = lambda response: {choice.index: (choice.text, extra(choice, "token_ids")) for choice in response.choices}
    assert ids(first) == ids(again)
    assert ids(first)[0] == ids(alone)[0]
    assert ids(first)[0] != ids(first)[1]  # each sequence draws a stream of its own
    assert first.usage.completion_tokens == sum(len(extra(choice, "token_ids")) for choice in first.choices)
    assert first.usage.prompt_tokens == len(extra(first.choices[0], "prompt_token_ids"))
    # The same request on gRPC gives the same choices.
    reference = grpc_generate(client, prompt="Once upon a time", max_new_tokens=12, n=2,
                              sampling={"temperature": 1.0, "seed": 1234})
    assert {choice.index: (choice.text, [token.id for token in choice.tokens]) for choice in reference.choices} \
        == ids(first)


def test_n_with_a_seed_streams_every_choice(api):
    options = dict(model=MODEL, messages=QUESTION, temperature=1, seed=99, max_tokens=10, n=2, extra_body=IDS)
    whole = api.chat.completions.create(**options)
    choices, chunks = gather(api.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                         **options), chat=True)
    assert sorted(choices) == [0, 1]
    roles = [chunk.choices[0].index for chunk in chunks[:2]]
    assert sorted(roles) == [0, 1] and all(chunk.choices[0].delta.role == "assistant" for chunk in chunks[:2])
    for choice in whole.choices:
        streamed = choices[choice.index]
        assert streamed["text"] == choice.message.content
        assert streamed["token_ids"] == extra(choice, "token_ids")
        assert streamed["finish_reason"] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# Logprobs -------------------------------------------------------------------------------------------------------

def test_chat_logprobs_equal_grpc(served, api):
    server, client = served
    response = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=3)
    reference = grpc_generate(client, messages=QUESTION, max_new_tokens=8, return_logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    tokens = reference.choices[0].tokens
    assert len(content) == len(tokens) == len(reference.token_ids) > 0
    for item, token in zip(content, tokens):
        assert math.isclose(item.logprob, token.logprob, abs_tol=LOGPROB_TOLERANCE)
        assert len(item.top_logprobs) == len(token.top_logprobs) == 3
        for top, expected in zip(item.top_logprobs, token.top_logprobs):
            assert top.token == expected.text and math.isclose(top.logprob, expected.logprob, abs_tol=LOGPROB_TOLERANCE)
            assert bytes(top.bytes) == top.token.encode()
        # Greedy: the chosen token is the most likely one.
        assert item.token == item.top_logprobs[0].token and item.logprob == item.top_logprobs[0].logprob
        assert item.logprob <= 0 and all(a.logprob >= b.logprob for a, b in zip(item.top_logprobs,
                                                                                   item.top_logprobs[1:]))
    # A stream carries the same numbers.
    chunks = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True,
                                         top_logprobs=3, stream=True)
    streamed = [item for chunk in chunks for choice in chunk.choices if choice.logprobs
                for item in choice.logprobs.content]
    assert [item.token for item in streamed] == [item.token for item in content]
    assert all(math.isclose(one.logprob, other.logprob, abs_tol=LOGPROB_TOLERANCE)
               for one, other in zip(streamed, content))


def test_completion_logprobs_equal_grpc(served, api):
    server, client = served
    response = api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=3)
    reference = grpc_generate(client, prompt=PROMPT, max_new_tokens=8, return_logprobs=True, top_logprobs=3)
    logprobs = response.choices[0].logprobs
    tokens = reference.choices[0].tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(tokens) == 8
    offset = 0
    for position, token in enumerate(tokens):
        assert math.isclose(logprobs.token_logprobs[position], token.logprob, abs_tol=LOGPROB_TOLERANCE)
        top = logprobs.top_logprobs[position]
        expected = {item.text: item.logprob for item in token.top_logprobs}
        assert top.keys() == expected.keys() and len(top) == 3
        assert all(math.isclose(top[text], expected[text], abs_tol=LOGPROB_TOLERANCE) for text in top)
        best_text, best = next(iter(top.items()))  # most likely first
        assert best_text == logprobs.tokens[position] and best == logprobs.token_logprobs[position]
        assert logprobs.text_offset[position] == offset
        offset += len(token.text)


# Prompts: lists, token ids, echo ---------------------------------------------------------------------------------

def test_completion_with_two_prompts(api, default_engine):
    prompts = [PROMPT, "def fibonacci(n):"]
    response = api.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=8, extra_body=IDS)
    assert [choice.index for choice in response.choices] == [0, 1]
    prompt_ids = [default_engine.tokenizer.encode(prompt) for prompt in prompts]
    for choice, ids in zip(response.choices, prompt_ids):
        solo = engine_run(default_engine, ids, 8)
        assert choice.text == solo.text and extra(choice, "token_ids") == solo.token_ids
        assert extra(choice, "prompt_token_ids") == ids
    assert response.usage.prompt_tokens == sum(map(len, prompt_ids))
    assert response.usage.completion_tokens == sum(len(extra(choice, "token_ids")) for choice in response.choices)


def test_completion_with_token_id_prompts(api, default_engine):
    ids = default_engine.tokenizer.encode(PROMPT)
    other = default_engine.tokenizer.encode("def fibonacci(n):")
    by_text = api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8)
    by_ids = api.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == by_text.choices[0].text == engine_run(default_engine, ids, 8).text
    assert by_ids.usage.prompt_tokens == len(ids)
    both = api.completions.create(model=MODEL, prompt=[ids, other], temperature=0, max_tokens=8)
    assert [choice.text for choice in both.choices] == [engine_run(default_engine, prompt, 8).text
                                                       for prompt in (ids, other)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_echo_prepends_the_prompt(api, default_engine, stream):
    expected = PROMPT + engine_run(default_engine, default_engine.tokenizer.encode(PROMPT), 8).text
    options = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, echo=True)
    if stream:
        choices, chunks = gather(api.completions.create(stream=True, **options), chat=False)
        assert chunks[0].choices[0].text == PROMPT
        assert choices[0]["text"] == expected
    else:
        assert api.completions.create(**options).choices[0].text == expected
    by_ids = api.completions.create(model=MODEL, prompt=default_engine.tokenizer.encode(PROMPT), temperature=0,
                                    max_tokens=8, echo=True)
    assert by_ids.choices[0].text == expected


# Errors ---------------------------------------------------------------------------------------------------------

CHAT, COMPLETIONS = "chat", "completions"
IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
BAD_FIELDS = [
    (CHAT, {"temperature": -1}, "temperature"),
    (CHAT, {"temperature": 1e9}, "temperature"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"top_p": 2}, "top_p"),
    (CHAT, {"top_k": -1}, "top_k"),
    (CHAT, {"min_p": 2}, "min_p"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"presence_penalty": 3}, "presence_penalty"),
    (CHAT, {"frequency_penalty": -3}, "frequency_penalty"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": -1}, "n"),
    (CHAT, {"n": MAX_BATCH + 1}, "n"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": 8192}, "max_tokens"),  # the prompt leaves less than the context length
    (CHAT, {"max_tokens": "ten"}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"stop": [f"stop{index}" for index in range(17)]}, "stop"),
    (CHAT, {"stop": 5}, "stop"),
    (CHAT, {"logit_bias": {"1": "much"}}, "logit_bias[1]"),
    (CHAT, {"logit_bias": {"abc": 1}}, "logit_bias"),
    (CHAT, {"logit_bias": {"49152": 1}}, "logit_bias[49152]"),
    (CHAT, {"logit_bias": {"5": 1000}}, "logit_bias[5]"),
    (CHAT, {"seed": -1}, "seed"),
    (CHAT, {"seed": 2**70}, "seed"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    (CHAT, {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    (CHAT, {"stop_token_ids": [49152]}, "stop_token_ids[0]"),
    (CHAT, {"stream": "yes"}, "stream"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hello"}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": IMAGE}]},
     "messages[1].content[0]"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    (CHAT, {"response_format": {"type": "yaml"}}, "response_format.type"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [49152]}, "prompt[0]"),
    (COMPLETIONS, {"prompt": [[1, 2], [3, 49152]]}, "prompt[1][1]"),  # the second prompt's second id
    (COMPLETIONS, {"prompt": ["fine", ""]}, "prompt[1]"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"echo": True, "logprobs": 1}, "echo"),
    (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"suffix": "!"}, "suffix"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
]


@pytest.mark.parametrize("endpoint, fields, param", BAD_FIELDS,
                         ids=[f"{endpoint}-{'+'.join(fields)}-{index}" for index, (endpoint, fields, _)
                              in enumerate(BAD_FIELDS)])
def test_every_bad_field_is_a_400_naming_it(api, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == CHAT:
            api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body=fields)
        else:
            api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=fields)
    error = caught.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param == param or (param == "logit_bias" and error.param.startswith("logit_bias["))
    assert error.body["message"].startswith(f"{error.param}: ")


def test_bad_requests_are_counted_under_their_method(served, api):
    """A bad value and a bad type are both an INVALID_ARGUMENT of ChatCompletions in the request metrics."""
    server, _ = served
    label = {"method": "ChatCompletions", "code": "INVALID_ARGUMENT"}
    for fields in ({"temperature": -1}, {"temperature": "hot"}):
        before = metric(server, "gptserve_requests_total", label)
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body=fields)
        wait_for(lambda before=before: metric(server, "gptserve_requests_total", label) == before + 1, timeout=2)


def test_unauthenticated_requests_are_401_and_health_stays_open(guarded, default_engine):
    server, grpc_client = guarded
    url = f"http://127.0.0.1:{server.http_port}"
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx2.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
        # An unauthenticated caller learns nothing about its request, not even that a field is bad.
        bad = httpx2.post(f"{url}/v1/chat/completions", json={**body, "temperature": -1}, headers=headers)
        assert bad.status_code == 401
        assert httpx2.get(f"{url}/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        with OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as wrong:
            wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert httpx2.get(f"{url}/health").status_code == 200
    with OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as right:
        response = right.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
        assert response.choices[0].message.content == "The capital of France"
        assert [model.id for model in right.models.list()] == [MODEL]
    assert grpc_client.health() == "SERVING"


def test_another_model_is_404_and_an_alias_is_served(api, base_url):
    for create in (lambda model: api.chat.completions.create(model=model, messages=QUESTION, max_tokens=2),
                   lambda model: api.completions.create(model=model, prompt=PROMPT, max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as caught:
            create("gpt-4o")
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
        assert "gpt-4o" in caught.value.body["message"]
    response = api.chat.completions.create(model="alias", messages=QUESTION, temperature=0, max_tokens=4)
    assert response.model == "alias" and response.choices[0].message.content == "The capital of France"
    models = api.models.list()
    assert [model.id for model in models] == [MODEL, "alias"]
    assert all(model.object == "model" and model.owned_by for model in models)


def test_a_full_server_is_429(guarded):
    server, _ = guarded
    url = f"http://127.0.0.1:{server.http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as api:
        with httpx2.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it holds the only slot
            assert active(server) == 1
            with pytest.raises(openai.RateLimitError) as caught:
                api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
            assert caught.value.status_code == 429 and caught.value.type == "rate_limit_error"
        wait_for(lambda: active(server) == 0, timeout=3)
        # The slot is free again.
        assert api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=2).choices[0].text


def test_health_503_while_loading_then_200(default_engine):
    loaded = threading.Event()

    def load():
        loaded.wait(60)
        return default_engine

    server = BackgroundServer(ServerConfig(host="127.0.0.1", port=0, http_port=free_port()), load)
    server.start(wait_ready=False)
    url = f"http://127.0.0.1:{server.http_port}"
    try:
        health = httpx2.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "NOT_SERVING"
        with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as api:
            with pytest.raises(openai.APIStatusError) as caught:
                api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
            assert caught.value.status_code == 503 and caught.value.type == "service_unavailable_error"
            assert httpx2.get(f"{url}/v1/models").status_code == 503
            loaded.set()
            server.wait_ready(60)
            assert httpx2.get(f"{url}/health").status_code == 200
            assert api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                               max_tokens=4).choices[0].message.content == "The capital of France"
    finally:
        loaded.set()
        server.stop()


def test_max_completion_tokens(api):
    response = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3
    assert response.choices[0].message.content == "The capital of"


def test_tls_as_on_grpc(default_engine, tls_files):
    """The HTTP API takes the gRPC server's certificate: clients that trust it are served, plain HTTP is not."""
    cert, key = tls_files
    with running_server(default_engine, http_port=free_port(), tls_cert_file=cert, tls_key_file=key) as (server, _):
        trusted = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{server.http_port}"
        assert httpx2.get(f"{url}/health", verify=trusted).status_code == 200
        with httpx2.Client(verify=trusted) as http, \
                OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=http) as api:
            response = api.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
            assert response.choices[0].message.content == "The capital of France"
        with pytest.raises(httpx2.ConnectError):  # a certificate nobody vouched for
            httpx2.get(f"{url}/health")
        with pytest.raises(httpx2.TransportError):  # no TLS at all
            httpx2.get(f"http://127.0.0.1:{server.http_port}/health")


def test_health_models_metrics_tokenize(served, base_url, default_engine):
    server, _ = served
    health = httpx2.get(f"{base_url}/health")
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}
    exposition = httpx2.get(f"{base_url}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    assert {"gptserve_requests", "gptserve_batch_size", "gptserve_generated_tokens"} <= families.keys()
    ids = default_engine.tokenizer.encode(PROMPT)
    tokenized = httpx2.post(f"{base_url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
    chat = httpx2.post(f"{base_url}/tokenize", json={"messages": QUESTION}).json()
    assert chat["tokens"] == chat_ids(default_engine, QUESTION)
    assert httpx2.post(f"{base_url}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    bad = httpx2.post(f"{base_url}/detokenize", json={"tokens": [49152]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"


# Disconnects ---------------------------------------------------------------------------------------------------

LONG = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def test_a_client_that_leaves_mid_stream_frees_its_slot(served, base_url, api):
    server, _ = served
    cancelled = {"method": "Completions", "code": "CANCELLED"}
    before, generated = metric(server, "gptserve_requests_total", cancelled), \
        metric(server, "gptserve_generated_tokens_total")
    ended = metric(server, "gptserve_request_finished_total", {"finish_reason": "cancelled"})
    with httpx2.stream("POST", f"{base_url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)
        assert active(server) == 1
    wait_for(lambda: active(server) == 0, timeout=2)
    wait_for(lambda: metric(server, "gptserve_requests_total", cancelled) == before + 1, timeout=2)
    assert metric(server, "gptserve_request_finished_total", {"finish_reason": "cancelled"}) == ended + 1
    assert metric(server, "gptserve_generated_tokens_total") - generated < 400
    assert api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4).choices[0].text \
        == " Paris.\n\n"


def test_a_client_that_leaves_a_whole_request_frees_its_slot(served, base_url, api):
    server, _ = served
    cancelled = {"method": "Completions", "code": "CANCELLED"}
    before, generated = metric(server, "gptserve_requests_total", cancelled), \
        metric(server, "gptserve_generated_tokens_total")
    ended = metric(server, "gptserve_request_finished_total", {"finish_reason": "cancelled"})
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{base_url}/v1/completions", json=LONG, timeout=httpx2.Timeout(60, read=1.0))
    wait_for(lambda: active(server) == 0, timeout=2)
    wait_for(lambda: metric(server, "gptserve_requests_total", cancelled) == before + 1, timeout=2)
    assert metric(server, "gptserve_request_finished_total", {"finish_reason": "cancelled"}) == ended + 1
    assert 0 < metric(server, "gptserve_generated_tokens_total") - generated < 400
    assert api.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4).choices[0].text \
        == " Paris.\n\n"


# HTTP and gRPC together -----------------------------------------------------------------------------------------

MIXED = [
    ("http-chat", "Write a haiku about autumn leaves."),
    ("http-completion", "Once upon a time, in a small village at the edge of a great forest, there lived"),
    ("http-chat", "Why is the sky blue?"),
    ("grpc-chat", "List three prime numbers."),
    ("grpc-completion", "def fibonacci(n):"),
    ("grpc-completion", "The three laws of thermodynamics are"),
]


def test_http_and_grpc_streams_batch_together(served, api, default_engine):
    server, client = served
    steps, shared = decode_batches(server)
    start = threading.Barrier(len(MIXED))
    max_tokens = 16

    def run(kind: str, text: str) -> tuple[list[int], str]:
        messages = [{"role": "user", "content": text}]
        start.wait(30)
        if kind == "http-chat":
            choices, _ = gather(api.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                            max_tokens=max_tokens, stream=True, extra_body=IDS),
                                chat=True)
            return choices[0]["token_ids"], choices[0]["text"]
        if kind == "http-completion":
            choices, _ = gather(api.completions.create(model=MODEL, prompt=text, temperature=0,
                                                       max_tokens=max_tokens, stream=True, extra_body=IDS),
                                chat=False)
            return choices[0]["token_ids"], choices[0]["text"]
        request = grpc_request(messages=messages, max_new_tokens=max_tokens) if kind == "grpc-chat" else \
            grpc_request(prompt=text, max_new_tokens=max_tokens)
        ids, streamed, _ = collect(client.stub.GenerateStream(request, timeout=120, metadata=client.metadata))
        return ids, streamed

    with ThreadPoolExecutor(len(MIXED)) as pool:
        results = list(pool.map(lambda item: run(*item), MIXED))

    for (kind, text), (ids, streamed) in zip(MIXED, results):
        prompt_ids = chat_ids(default_engine, [{"role": "user", "content": text}]) if kind.endswith("chat") \
            else default_engine.tokenizer.encode(text)
        solo = engine_run(default_engine, prompt_ids, max_tokens)
        assert ids == solo.token_ids, f"{kind} {text!r} differs from its solo run"
        assert streamed == solo.text
    after_steps, after_shared = decode_batches(server)
    assert after_shared - shared > 0, "no decode step ran more than one sequence"
    assert after_steps > steps
    wait_for(lambda: active(server) == 0)


def test_grpc_errors_still_name_the_core_fields(served):
    """The new core fields, refused on gRPC as on HTTP (one set of rules)."""
    _, client = served
    with pytest.raises(grpc.RpcError) as caught:
        grpc_generate(client, prompt=PROMPT, max_new_tokens=2, n=MAX_BATCH + 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details().startswith("n:")
