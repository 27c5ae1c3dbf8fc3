"""The numpy sampler: each knob does what it says, a seed reproduces a sequence, every value in range samples
and every value out of range is refused."""

import numpy as np
import pytest

from gptserve.model.generation import StoppingParams
from gptserve.model.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    ParameterError,
    Sampler,
    SamplingParams,
)

LOGITS = np.log(np.array([0.05, 0.1, 0.5, 0.3, 0.05], dtype=np.float32))
NOTHING_SEEN = np.array([], dtype=np.int64)


def draws(params: SamplingParams, count: int = 2000) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler(LOGITS, NOTHING_SEEN)[0] for _ in range(count)])


def test_greedy_takes_the_argmax_with_its_logprob():
    token, logprob, _ = Sampler(SamplingParams())(LOGITS, NOTHING_SEEN)
    assert token == 2
    assert logprob == pytest.approx(np.log(0.5), abs=1e-6)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
                                    SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=3)])
def test_without_logprobs_the_same_tokens_are_drawn_and_none_is_computed(params):
    """What the server does for a request that returns no logprobs: the same draws from the same random stream."""
    scored, bare = Sampler(params), Sampler(params)
    seen = np.array([1, 3])
    for _ in range(50):
        token, logprob, alternatives = scored(LOGITS, seen, top=2)
        assert bare(LOGITS, seen, top=2, with_logprobs=False) == (token, pytest.approx(np.nan, nan_ok=True), ())
        assert np.isfinite(logprob) and len(alternatives) == 2


def test_top_k_keeps_only_the_k_most_likely():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=0))) == {2, 3}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0))) == {2}


def test_temperature_sharpens_and_flattens():
    cold = np.mean(draws(SamplingParams(temperature=0.2, seed=1)) == 2)
    hot = np.mean(draws(SamplingParams(temperature=3.0, seed=1)) == 2)
    assert cold > 0.9 > 0.5 > hot


def test_sampling_follows_the_distribution():
    frequencies = np.bincount(draws(SamplingParams(temperature=1.0, seed=2), 20000), minlength=5) / 20000
    np.testing.assert_allclose(frequencies, np.exp(LOGITS), atol=0.02)


def test_seed_reproduces_and_differs():
    params = SamplingParams(temperature=1.0, seed=7)
    assert (draws(params, 50) == draws(params, 50)).all()
    assert not (draws(params, 50) == draws(SamplingParams(temperature=1.0, seed=8), 50)).all()


def test_repetition_penalty_discourages_seen_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=10.0))
    assert sampler(LOGITS, np.array([2]))[0] == 3
    adjusted = sampler.adjust(np.array([2.0, -2.0, 1.0]), np.array([0, 1]))
    np.testing.assert_allclose(adjusted, [0.2, -20.0, 1.0])


# Every accepted value samples; every other one is refused with its value as received ----------------------------

TINY = float(np.float32(1e-45))  # the smallest float32, as a request's float field arrives
WIDE_LOGITS = np.array([30.0, -30.0, 12.5, 30.0, -1e4, 0.0], dtype=np.float32)


@pytest.mark.parametrize("temperature", [1e-38, TINY, 1e-30, 100.0])
@pytest.mark.parametrize("cut", [{}, {"top_k": 3}, {"top_p": 0.5}])
def test_extreme_temperatures_sample(temperature, cut):
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0, **cut))
    for _ in range(20):
        token, logprob, _ = sampler(WIDE_LOGITS, np.array([0, 2]))
        assert 0 <= token < len(WIDE_LOGITS) and np.isfinite(logprob)
        if temperature < 1e-20:
            assert token in (0, 3)  # as good as greedy: one of the two largest logits


@pytest.mark.parametrize("temperature", [0.0, 1.0, TINY])
def test_a_tiny_repetition_penalty_keeps_logprobs_finite(temperature):
    sampler = Sampler(SamplingParams(temperature=temperature, repetition_penalty=TINY, seed=0))
    for _ in range(20):
        token, logprob, _ = sampler(WIDE_LOGITS, np.array([1, 2, 5]))
        assert 0 <= token < len(WIDE_LOGITS) and np.isfinite(logprob)
    assert np.isfinite(sampler.adjust(WIDE_LOGITS, np.array([0, 1, 2]))).all()


@pytest.mark.parametrize("fields, words", [
    ({"temperature": -5.0}, ["temperature: -5.0", "allowed 0 (greedy) to 100"]),
    ({"temperature": float(np.float32(100.0001))}, ["temperature: 100.0001;"]),
    ({"temperature": float("nan")}, ["temperature: nan"]),
    ({"temperature": float("inf")}, ["temperature: inf"]),
    ({"top_k": -1}, ["top_k: -1", "0 (no cut) or more"]),
    ({"top_p": 0.0}, ["top_p: 0.0", "(0, 1]"]),
    ({"top_p": float(np.float32(1.1))}, ["top_p: 1.1;"]),
    ({"repetition_penalty": 0.0}, ["repetition_penalty: 0.0", "(0, 10]"]),
    ({"repetition_penalty": -float("inf")}, ["repetition_penalty: -inf"]),
    ({"seed": -1}, ["seed: -1"]),
])
def test_sampling_params_refuse_what_is_out_of_range(fields, words):
    with pytest.raises(ParameterError) as caught:
        SamplingParams(**fields)
    assert isinstance(caught.value, ValueError)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_the_limits_themselves_are_allowed():
    SamplingParams(temperature=MAX_TEMPERATURE, top_k=0, top_p=1.0, repetition_penalty=MAX_REPETITION_PENALTY,
                   seed=2**64 - 1)
    SamplingParams(temperature=TINY, top_p=TINY, repetition_penalty=TINY, seed=0)


@pytest.mark.parametrize("fields, words", [
    ({"max_new_tokens": 0}, ["max_new_tokens: 0", "allowed 1 or more"]),
    ({"stop": ("ok", "")}, ["stop[1]: 0 characters", "allowed 1 to 256"]),
    ({"stop": ("x" * 300,)}, ["stop[0]: 300 characters"]),
])
def test_stopping_params_refuse_what_is_out_of_range(fields, words):
    with pytest.raises(ParameterError) as caught:
        StoppingParams(**fields)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
