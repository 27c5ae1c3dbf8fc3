"""No request can crash the engine loop: when the engine raises, the requests in that step fail with INTERNAL
and the server goes on serving the next ones."""

from __future__ import annotations

import grpc
import pytest

from tests.service.support import running_server


class FaultyEngine:
    """The real engine, made to raise on demand (fault injection: what ONNX Runtime does on a real failure)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.fail_prefill = self.fail_decode = False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self, input_ids, attention_mask, past):
        if (self.fail_prefill and past is None) or (self.fail_decode and past is not None):
            raise RuntimeError("injected failure")
        return self.engine.step(input_ids, attention_mask, past)


@pytest.fixture(scope="module")
def served(tiny_engine):
    faulty = FaultyEngine(tiny_engine)
    with running_server(faulty) as (server, client):
        yield faulty, server, client


@pytest.mark.parametrize("where", ["fail_prefill", "fail_decode"])
def test_engine_failure_fails_only_that_step_and_serving_goes_on(served, where):
    faulty, server, client = served
    setattr(faulty, where, True)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(client.stream("Hello there", max_new_tokens=6, ignore_eos=True))
        assert caught.value.code() == grpc.StatusCode.INTERNAL and "injected failure" in caught.value.details()
    finally:
        setattr(faulty, where, False)
    assert client.model_info().active_sequences == 0
    response = client.generate("Hello there", max_new_tokens=6, ignore_eos=True)
    assert response.usage.completion_tokens == 6 and client.health() == "SERVING"
