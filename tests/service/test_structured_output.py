"""Structured output (model/guidance.py) on a real server with the default model: JSON schemas through the `openai`
client and gRPC, greedy and sampled, every output parsed and validated with jsonschema; regex and choice
constraints; refusals naming the field with the library's reason; constrained rows batched beside unconstrained
ones, which stay exactly their solo runs."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from openai import OpenAI

from gptserve.model.guidance import MAX_CONSTRAINT_BYTES
from gptserve.service.bench import free_port
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import running_server, solo_greedy

MAX_TOKENS = 96  # every schema below completes well within it (strings and arrays are bounded)


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


POINT = _object({"x": {"type": "integer", "minimum": -10, "maximum": 10},
                 "y": {"type": "integer", "minimum": -10, "maximum": 10}})
# Ten shapes: (what to ask for, the schema).
SCHEMAS = {
    "nested": ("a person and their address", _object({
        "name": {"type": "string", "maxLength": 16},
        "address": _object({"city": {"type": "string", "maxLength": 16},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    "bounded_array": ("a few small numbers", {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}, "minItems": 2, "maxItems": 4}),
    "enums": ("a T-shirt", _object({"color": {"enum": ["red", "green", "blue"]},
                                    "size": {"type": "string", "enum": ["S", "M", "L"]}})),
    "ranges": ("the weather", _object({"celsius": {"type": "integer", "minimum": -40, "maximum": 50},
                                       "humidity": {"type": "number", "minimum": 0, "maximum": 1}})),
    "optional": ("a book", _object({"title": {"type": "string", "maxLength": 24},
                                    "subtitle": {"type": "string", "maxLength": 24},
                                    "pages": {"type": "integer", "minimum": 1, "maximum": 999}}, required=["title"])),
    "patterns": ("a flight", _object({"date": {"type": "string", "pattern": "^2[0-9]{3}-[01][0-9]-[0-3][0-9]$"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}})),
    "nullable": ("a task", _object({"done": {"type": "boolean"},
                                    "note": {"type": ["string", "null"], "maxLength": 20}})),
    "array_of_objects": ("some tagged items", {"type": "array", "minItems": 1, "maxItems": 3, "items": _object({
        "id": {"type": "integer", "minimum": 1, "maximum": 99}, "tag": {"enum": ["a", "b"]}})}),
    "any_of": ("an answer", {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                                       {"type": "string", "maxLength": 10}]}),
    "refs": ("a line segment", {"$defs": {"point": POINT}, **_object({
        "kind": {"const": "segment"}, "start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})}),
}


@pytest.fixture(scope="module")
def served(default_engine):
    with running_server(default_engine, http_port=free_port(), max_batch_size=8, max_queue=32) as (server, client):
        yield server, client


@pytest.fixture(scope="module")
def api(served):
    with OpenAI(base_url=f"http://127.0.0.1:{served[0].http_port}/v1", api_key="unused", max_retries=0,
                timeout=120) as client:
        yield client


def _ask(what: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON describing {what}."}]


def _in_parallel(function, items) -> list:
    """All at once, so the server batches them."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_json_schemas_over_http(api, temperature):
    def run(name: str):
        what, schema = SCHEMAS[name]
        return api.chat.completions.create(
            model="smollm2-135m-instruct", messages=_ask(what), max_tokens=MAX_TOKENS, temperature=temperature,
            seed=7, response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                             "strict": True}})
    for name, reply in zip(SCHEMAS, _in_parallel(run, list(SCHEMAS))):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name][1])


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_json_schemas_over_grpc(served, default_engine, temperature):
    client = served[1]

    def run(name: str) -> pb.GenerateResponse:
        what, schema = SCHEMAS[name]
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(**turn) for turn in _ask(what)]),
                                     stopping=pb.StoppingCriteria(max_new_tokens=MAX_TOKENS),
                                     sampling=pb.SamplingParameters(temperature=temperature, seed=11),
                                     json_schema=json.dumps(schema))
        return client.stub.Generate(request, timeout=120)
    for name, reply in zip(SCHEMAS, _in_parallel(run, list(SCHEMAS))):
        assert reply.finish_reason == pb.FINISH_REASON_STOP and not reply.choices[0].WhichOneof("matched_stop")
        jsonschema.validate(json.loads(reply.text), SCHEMAS[name][1])
        assert default_engine.tokenizer.decode(list(reply.token_ids)) == reply.text


def test_json_object_n_and_logprobs(api):
    """`json_object` gives any object; each of n sampled sequences keeps its own matcher; logprobs are of the
    constrained distribution, so every alternative listed is a token the grammar allowed (none at -inf)."""
    reply = api.chat.completions.create(
        model="smollm2-135m-instruct", messages=_ask("a cat"), max_tokens=MAX_TOKENS, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_object"}, logprobs=True, top_logprobs=5)
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # an unbounded object may run out of tokens; what there is starts one
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
        first = choice.logprobs.content[0]  # '{', '{"' and '{}' are all the grammar allows
        assert 1 <= len(first.top_logprobs) < 5 and all(item.token.startswith("{") for item in first.top_logprobs)
        assert all(-1e9 < alternative.logprob <= 0 for entry in choice.logprobs.content
                   for alternative in entry.top_logprobs)
    assert len({choice.message.content for choice in reply.choices}) > 1


def test_regex_and_choice(api, served):
    reply = api.completions.create(model="smollm2-135m-instruct", prompt="Call me at", max_tokens=16, temperature=1.0,
                                   seed=1, n=2, extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    for choice in reply.choices:
        assert re.fullmatch("[0-9]{3}-[0-9]{4}", choice.text) and choice.finish_reason == "stop"
    colors = ["blue", "green", "light red"]
    reply = api.chat.completions.create(model="smollm2-135m-instruct", messages=[
        {"role": "user", "content": "What color is the sky?"}], max_tokens=8, extra_body={"guided_choice": colors})
    assert reply.choices[0].message.content in colors and reply.choices[0].finish_reason == "stop"
    request = pb.GenerateRequest(prompt="The grass is", stopping=pb.StoppingCriteria(max_new_tokens=8),
                                 choice=pb.Choices(choices=colors), sampling=pb.SamplingParameters(temperature=2.0))
    assert served[1].stub.Generate(request, timeout=60).text in colors


def test_grammar_and_stop_string(api):
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    reply = api.completions.create(model="smollm2-135m-instruct", prompt="Q: 6 times 7?", max_tokens=16,
                                   temperature=0, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", reply.choices[0].text)
    # A stop string still ends the text, cutting the constrained output short.
    reply = api.completions.create(model="smollm2-135m-instruct", prompt="Q: 6 times 7?", max_tokens=16,
                                   temperature=0, stop=["is"], extra_body={"guided_grammar": grammar})
    assert reply.choices[0].text == "The answer " and extra_or_none(reply.choices[0], "stop_reason") == "is"


def extra_or_none(model, name: str):
    return (model.model_extra or {}).get(name)


@pytest.mark.parametrize(("body", "param", "reason"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "Invalid type: strin"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}},
     "guided_json", "unclosed character class"),
    ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "start: missing"}, "guided_grammar", 'unknown name: "missing"'),
    ({"guided_choice": []}, "guided_choice", "at least one choice"),
    ({"guided_json": {"type": "string", "enum": ["x" * MAX_CONSTRAINT_BYTES]}}, "guided_json", "bytes; at most"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one constraint per request"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "allowed text, json_object, json_schema"),
])
def test_bad_constraints_refused(api, body, param, reason):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="smollm2-135m-instruct", messages=_ask("x"), max_tokens=8, extra_body=body)
    error = caught.value.body
    assert error["param"] == param and reason in error["message"], error


def test_bad_grammar_refused_over_grpc(served):
    request = pb.GenerateRequest(prompt="x", regex="[0-9")
    with pytest.raises(grpc.RpcError) as caught:
        served[1].stub.Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("regex: cannot be compiled:")
    assert "unclosed character class" in caught.value.details()


def test_constrained_and_free_rows_batched(served, default_engine):
    """Free rows beside constrained ones give exactly their solo runs; the constrained ones still validate."""
    client, tokenizer = served[1], default_engine.tokenizer
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    what, schema = SCHEMAS["nested"]

    def run(index: int) -> pb.GenerateResponse:
        if index % 2:
            return client.stub.Generate(pb.GenerateRequest(
                messages=pb.ChatMessages(messages=[pb.ChatMessage(**turn) for turn in _ask(what)]),
                stopping=pb.StoppingCriteria(max_new_tokens=MAX_TOKENS), json_schema=json.dumps(schema)), timeout=120)
        return client.stub.Generate(pb.GenerateRequest(
            prompt=prompts[index // 2], stopping=pb.StoppingCriteria(max_new_tokens=24, ignore_eos=True)), timeout=120)
    replies = _in_parallel(run, list(range(6)))
    for index, reply in enumerate(replies):
        if index % 2:
            jsonschema.validate(json.loads(reply.text), schema)
        else:
            solo = solo_greedy(default_engine, tokenizer.encode(prompts[index // 2]), 24, ignore_eos=True)
            assert list(reply.token_ids) == solo.token_ids
