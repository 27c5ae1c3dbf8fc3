"""Tool calling on the chat API (service/tools.py): a tiny model whose template offers tools (tests/tiny_models.py
TOOL_TEMPLATE, the form Qwen2.5 and Hermes use) through the `openai` client. With `required` or a named function,
even a random model's calls parse and their arguments validate, whole and streamed; a template without tools is a
400; the parser keeps malformed calls as content."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI

from gptserve.export.exporter import export
from gptserve.service.bench import free_port
from gptserve.service.engine import Engine
from gptserve.service.tools import ToolCallStream, parse_tool_calls
from tests.service.support import running_server
from tests.tiny_models import save_tool_folder

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} somewhere", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_engine(tmp_path_factory, default_gguf) -> Engine:
    folder = tmp_path_factory.mktemp("tiny-tools")
    save_tool_folder(folder, default_gguf)
    artifact = tmp_path_factory.mktemp("artifacts") / "tiny-tools"
    export(str(folder), artifact, tolerance=1e-5)
    return Engine.load(artifact, provider="cpu")


@pytest.fixture(scope="module")
def api(tool_engine):
    with running_server(tool_engine, http_port=free_port(), served_model_names=("tiny-tools",)) as (server, _):
        with OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                    timeout=120) as client:
            yield client


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_forced_calls_validate(api, tool_engine, choice, temperature):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    reply = api.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                        parallel_tool_calls=False, temperature=temperature, seed=5, n=2,
                                        max_tokens=80, extra_body={"return_token_ids": True})
    for item in reply.choices:
        assert item.finish_reason == "tool_calls" and item.message.content is None
        _check_calls(item.message.tool_calls, set(SCHEMAS) if choice == "required" else {choice})
        assert len(item.message.tool_calls) == 1
    prompt = tool_engine.tokenizer.decode((reply.choices[0].model_extra or {})["prompt_token_ids"])
    assert "<tools>" in prompt and '"name": "get_time"' in prompt  # the template rendered the tools


def test_forced_calls_stream(api):
    chunks = list(api.chat.completions.create(model="tiny-tools", messages=ASK, tools=TOOLS, stream=True,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                              temperature=1.0, seed=2, max_tokens=80))
    calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert [call.index for call in calls] == [0]
    _check_calls(calls, {"get_weather"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices) == ""


def test_history_with_calls_and_auto(api):
    """A conversation that already called a tool renders (calls and the tool's answer); `auto` and `none` are
    free text, parsed for calls only under `auto`."""
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    for tool_choice in ("auto", "none"):
        reply = api.chat.completions.create(model="tiny-tools", messages=history, tools=TOOLS,
                                            tool_choice=tool_choice, max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_fields(api, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny-tools", messages=ASK, max_tokens=8, **fields)
    assert caught.value.body["param"] == param


def test_template_without_tools_refused(default_engine):
    """The default model's template (SmolLM2) renders no tools: refused, not silently dropped."""
    with running_server(default_engine, http_port=free_port()) as (server, _):
        with OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0) as client:
            for tool_choice in ("auto", "none"):
                with pytest.raises(openai.BadRequestError) as caught:
                    client.chat.completions.create(model="smollm2-135m-instruct", messages=ASK, tools=TOOLS,
                                                   tool_choice=tool_choice, max_tokens=4)
                assert caught.value.body["param"] == "tools" and "template" in caught.value.body["message"]


def test_parser():
    text = 'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"get_time"})
    assert content == "Let me check." and [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_time", {"zone": "UTC"})]
    assert parse_tool_calls(text, {"other"}) == (text, [])  # an unknown function: the text stays content
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken, {"get_time"}) == (broken, [])
    stream = ToolCallStream({"get_time"})
    pieces = ["Let me", " check.\n<tool", "_call>\n{\"name\": \"get_time\", ", "\"arguments\": {\"zone\": \"UTC\"}}\n",
              "</tool_call>"]
    assert "".join(stream.feed(piece) for piece in pieces) == "Let me check.\n"
    rest, calls = stream.finish()
    assert rest is None and calls[0].name == "get_time"
