"""`gptserve client` and `gptserve chat` against a real server, beside `gptserve generate` on the same artifact:
one JSON shape, replies that end their line, --system, --logprobs, and a conversation that keeps its history."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.service.support import running_server

GREEDY = ["--max-new-tokens", "6", "--ignore-eos"]


def gptserve(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GPTSERVE_")}
    return subprocess.run([sys.executable, "-m", "gptserve", *arguments], input=stdin, capture_output=True,
                          text=True, timeout=120, env=environment)


@pytest.fixture(scope="module")
def served(tiny_engine):
    with running_server(tiny_engine) as (server, client):
        yield f"127.0.0.1:{server.port}", client


def test_client_and_generate_print_the_same_json(served, tiny_artifact):
    target, _ = served
    remote = gptserve("client", "--target", target, "--json", "--logprobs", *GREEDY, "Once upon a time")
    local = gptserve("generate", "--artifacts", str(tiny_artifact), "--json", "--logprobs", *GREEDY,
                     "Once upon a time")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    remote_reply, local_reply = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_reply.keys() == local_reply.keys() >= {"text", "token_ids", "finish_reason", "prompt_tokens",
                                                        "completion_tokens", "logprobs", "time_to_first_token_s"}
    for field in ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert remote_reply[field] == local_reply[field], field  # greedy: the same tokens either way
    assert remote_reply["logprobs"] == pytest.approx(local_reply["logprobs"], abs=1e-3)
    assert len(remote_reply["logprobs"]) == 6 and all(value <= 0 for value in remote_reply["logprobs"])
    assert remote_reply["request_id"] and local_reply["request_id"] is None
    without = json.loads(gptserve("client", "--target", target, "--json", *GREEDY, "Hi").stdout)
    assert "logprobs" not in without and without.keys() == remote_reply.keys() - {"logprobs"}


def test_a_streamed_reply_ends_its_line(served):
    target, client = served
    done = gptserve("client", "--target", target, *GREEDY, "Once upon a time")
    expected = client.generate("Once upon a time", max_new_tokens=6, ignore_eos=True).text
    assert done.returncode == 0 and done.stdout == expected + "\n"
    assert "[length: 6 tokens" in done.stderr


def test_system_and_logprobs(served):
    target, client = served
    done = gptserve("client", "--target", target, "--system", "You answer in French.", "--logprobs", *GREEDY, "Hi")
    messages = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hi"}]
    expected = client.generate(messages=messages, max_new_tokens=6, ignore_eos=True, return_logprobs=True)
    assert done.returncode == 0 and done.stdout == expected.text + "\n"
    rows = [line.split() for line in done.stderr.splitlines() if line.startswith("  ")]
    assert [int(row[0]) for row in rows] == list(expected.token_ids)
    assert [float(row[1]) for row in rows] == pytest.approx(list(expected.logprobs), abs=1e-4)


def test_chat_keeps_the_conversation(served):
    target, client = served
    done = gptserve("chat", "--target", target, "--system", "Be brief.", *GREEDY, stdin="Hello\n\nAnd then?\n")
    assert done.returncode == 0, done.stderr
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = client.generate(messages=history, max_new_tokens=6, ignore_eos=True).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = client.generate(messages=history, max_new_tokens=6, ignore_eos=True).text
    assert done.stdout == f"{first}\n{second}\n"
    assert done.stderr.count("[length: 6 tokens") == 2  # the blank line was no turn


def test_a_server_that_is_not_there_is_one_line():
    done = gptserve("client", "--target", "127.0.0.1:1", "--timeout", "5", "Hi")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: UNAVAILABLE"), done.stderr
