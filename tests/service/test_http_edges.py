"""The HTTP API's own edges, below the request fields: bodies too large (declared or not), bodies that are not
JSON, mistyped routes. Each is an OpenAI-shaped error, and the server goes on serving."""

from __future__ import annotations

import httpx
import pytest

from gptserve.service.bench import free_port
from tests.service.support import running_server

LIMIT = 4096


@pytest.fixture(scope="module")
def base_url(tiny_engine):
    with running_server(tiny_engine, http_port=free_port(), max_message_bytes=LIMIT) as (server, _client):
        yield f"http://127.0.0.1:{server.http_port}"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_body_past_the_limit_is_413_declared_or_not(base_url):
    declared = httpx.post(f"{base_url}/v1/completions", json={"prompt": "a" * (2 * LIMIT)})
    assert error_of(declared, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * (LIMIT // 4)

    undeclared = httpx.post(f"{base_url}/v1/completions", content=chunks())
    assert "--max-message-bytes" in error_of(undeclared, 413)["message"]


@pytest.mark.parametrize("body", [b'{"model": 1', b"\xff\xfe", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_400(base_url, body):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"})
    assert error_of(response, 400)["type"] == "invalid_request_error"


def test_a_mistyped_route_is_404_naming_the_routes(base_url):
    error = error_of(httpx.post(f"{base_url}/v1/chat/completion", json={}), 404)
    assert "/v1/chat/completions" in error["message"]
    assert error_of(httpx.get(f"{base_url}/v1/completions"), 405)["message"].startswith("GET /v1/completions")


def test_still_serving_after_all_that(base_url):
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    response = httpx.post(f"{base_url}/v1/completions", json={"model": model, "prompt": "Still here", "max_tokens": 3,
                                                              "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def post(base_url: str, path: str, body: str) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", content=body.encode(), headers={"Content-Type": "application/json"},
                      timeout=60)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stop": "\\ud800"}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": [1000000000000], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": [[1], [1180591620717411303424]], "max_tokens": 2}', "prompt[1]"),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"--1": 1}}', None),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"\\u00b2": 1}}', None),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"\\u0663": 100}}', None),  # an Arabic-Indic digit 3
    ("/v1/completions", '{"prompt": "hi",}', None),
])
def test_values_no_protobuf_field_can_hold_are_400_not_500(base_url, path, body, param):
    """A lone surrogate, an id past int32, a key that only looks like a number, JSON that does not parse."""
    error = error_of(post(base_url, path, body), 400)
    if param is not None:
        assert error["param"] == param, error
    else:
        assert error["message"].startswith(("logit_bias", "request body: not valid JSON")), error


def test_a_constraint_the_library_gives_up_on_is_400(base_url):
    """It compiles, then llguidance's lexer gives out at the first token: the request's error, not a bug."""
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    response = post(base_url, "/v1/completions", f'{{"model": "{model}", "prompt": "hi", "max_tokens": 10, '
                                                 '"guided_regex": "a{1000000}"}')
    assert response.status_code == 400, response.text
