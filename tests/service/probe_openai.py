import json, time
import httpx2
from openai import OpenAI
from gptserve.service.bench import free_port
from tests.service.support import running_server

def test_probe(default_engine):
    t = time.perf_counter()
    with running_server(default_engine, http_port=free_port(), max_batch_size=8) as (server, client):
        print("start", time.perf_counter() - t, "ctx", default_engine.context_length, "vocab", default_engine.vocab_size)
        api = OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0)
        t = time.perf_counter()
        r = api.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        temperature=0, max_tokens=12, logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
        print("chat", time.perf_counter() - t, r.model_dump_json())
        r = api.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", temperature=0, max_tokens=12, logprobs=2,
                                   extra_body={"return_token_ids": True})
        print("cmpl", r.model_dump_json())
        r = api.completions.create(model="smollm2-135m-instruct", prompt="Once upon a time", temperature=1, seed=7, n=2, max_tokens=12)
        print("n2", r.model_dump_json())
        for body in [{"temperature": "hot"}, {"max_tokens": "ten"}, {"messages": []}, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                     {"logit_bias": {"abc": 1}}, {"stop": 5}, {"n": 0}, {"messages": [{"role": "wizard", "content": "hi"}]}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
                     {"stream_options": {"include_usage": "yes"}}, {"seed": 2**70}, {"messages": "hi"}, {"logprobs": True, "top_logprobs": 21}]:
            rr = httpx2.post(f"http://127.0.0.1:{server.http_port}/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
            print(body, rr.status_code, rr.text)
        for body in [{"prompt": [[1, 2], [999999]]}, {"prompt": []}, {"prompt": [[]]}, {"prompt": ["a", ""]}, {"echo": True, "logprobs": 1}, {"logprobs": 21}]:
            rr = httpx2.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 2, **body})
            print(body, rr.status_code, rr.text)
        with httpx2.stream("POST", f"http://127.0.0.1:{server.http_port}/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as s:
            print(s.status_code, s.headers)
            print(repr(s.read()))
