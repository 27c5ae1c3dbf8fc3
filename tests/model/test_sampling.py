"""The numpy sampler: each knob does what it says, and a seed reproduces a sequence."""

import numpy as np
import pytest

from gptserve.model.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.1, 0.5, 0.3, 0.05], dtype=np.float32))
NOTHING_SEEN = np.array([], dtype=np.int64)


def draws(params: SamplingParams, count: int = 2000) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler(LOGITS, NOTHING_SEEN)[0] for _ in range(count)])


def test_greedy_takes_the_argmax_with_its_logprob():
    token, logprob = Sampler(SamplingParams())(LOGITS, NOTHING_SEEN)
    assert token == 2
    assert logprob == pytest.approx(np.log(0.5), abs=1e-6)


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
