"""Generation state: stop strings never leak, EOS and length end a sequence, and the eager generate loop with
the KV cache produces the same tokens as recomputing the whole sequence every step."""

import numpy as np
import pytest
import torch

from gptserve.model.config import preset
from gptserve.model.eager import EagerStep
from gptserve.model.generation import FinishReason, Sequence, StoppingParams, StopStringFilter, generate
from gptserve.model.gpt import GPT
from gptserve.model.greedy import greedy_tokens
from gptserve.model.sampling import SamplingParams
from gptserve.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    return Tokenizer.from_gguf(default_gguf)


def feed_all(stops, pieces):
    stop_filter = StopStringFilter(tuple(stops))
    released = []
    for piece in pieces:
        text, stopped = stop_filter.feed(piece)
        released.append(text)
        if stopped:
            return "".join(released), True
    return "".join(released) + stop_filter.flush(), False


def test_stop_string_across_pieces_never_released():
    assert feed_all(["</end>"], ["Hello </", "en", "d> more"]) == ("Hello ", True)


def test_possible_stop_start_is_held_then_released():
    stop_filter = StopStringFilter(("STOP",))
    assert stop_filter.feed("abc ST") == ("abc ", False)
    assert stop_filter.feed("ART") == ("START", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["world", "lo"], ["hello world"]) == ("hel", True)


def test_no_stops_releases_everything():
    assert feed_all([], ["a", "b"]) == ("ab", False)


def scripted_logits(vocab_size, tokens):
    """Logits that make greedy choose `tokens` one after another."""
    for token in tokens:
        logits = np.zeros(vocab_size, dtype=np.float32)
        logits[token] = 1.0
        yield logits


def run_scripted(tokenizer, text, **stopping):
    tokens = tokenizer.encode(text, add_special_tokens=False)
    sequence = Sequence(tokenizer, [1], SamplingParams(), StoppingParams(**stopping))
    events = []
    for logits in scripted_logits(tokenizer.vocab_size, tokens):
        events.append(sequence.step(logits))
        if sequence.finished:
            break
    return sequence, events


def test_sequence_stops_on_a_stop_string_spanning_tokens(tokenizer):
    sequence, events = run_scripted(tokenizer, "The answer is 42. END OF TEXT and more", stop=("END OF",))
    assert sequence.finish_reason is FinishReason.STOP
    assert sequence.text == "The answer is 42. "
    assert "".join(event.text for event in events) == sequence.text


def test_sequence_ends_on_eos_unless_ignored(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    text_ids = tokenizer.encode("Hi there", add_special_tokens=False)
    for ignore_eos, reason in ((False, FinishReason.EOS), (True, FinishReason.LENGTH)):
        stopping = StoppingParams(max_new_tokens=len(text_ids) + 2, ignore_eos=ignore_eos)
        sequence = Sequence(tokenizer, [1], stopping=stopping)
        for logits in scripted_logits(tokenizer.vocab_size, text_ids + [eos, eos]):
            if not sequence.finished:
                sequence.step(logits)
        assert sequence.finish_reason is reason
        assert sequence.text.startswith("Hi there")


def test_length_limit_and_utf8_safe_deltas(tokenizer):
    sequence, events = run_scripted(tokenizer, "日本語のテキスト 🙂 done", max_new_tokens=1000)
    assert all("\ufffd" not in event.text for event in events)
    assert sequence.text == tokenizer.decode(sequence.token_ids)
    limited, _ = run_scripted(tokenizer, "one two three four five", max_new_tokens=3)
    assert limited.finish_reason is FinishReason.LENGTH and len(limited.token_ids) == 3


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_cached_generation_equals_full_recompute(name, tokenizer):
    torch.manual_seed(0)
    config = preset(name).replace(vocab_size=tokenizer.vocab_size)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    prompt = tokenizer.encode("Once upon a time")
    stopping = StoppingParams(max_new_tokens=16, ignore_eos=True)
    cached = generate(EagerStep(model), Sequence(tokenizer, prompt, stopping=stopping))

    def recompute(input_ids, attention_mask, past):
        """No cache: run the whole sequence so far every step."""
        history = input_ids if past is None else np.concatenate([past, input_ids], axis=1)
        with torch.no_grad():
            logits, _ = model(torch.from_numpy(history), torch.ones_like(torch.from_numpy(history)))
        return logits[:, -1].numpy(), history

    full = generate(recompute, Sequence(tokenizer, prompt, stopping=stopping))
    assert cached.token_ids == full.token_ids
    assert len(set(cached.token_ids)) > 1, "weights too tame: greedy tokens do not vary"


def test_greedy_tokens_is_the_generate_loop_at_temperature_zero(tokenizer):
    """The one greedy loop (certification canary, engine start-up, benchmarks) picks what generate() picks."""
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama").replace(vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    prompt = tokenizer.encode("Once upon a time")
    expected = generate(EagerStep(model), Sequence(tokenizer, prompt, stopping=StoppingParams(12, ignore_eos=True)))
    tokens = greedy_tokens(EagerStep(model), [prompt, prompt], 12)  # (B, T): two equal rows
    assert tokens.shape == (2, 12) and tokens[0].tolist() == tokens[1].tolist() == expected.token_ids
    suppressed = greedy_tokens(EagerStep(model), prompt, 12, suppress=[expected.token_ids[0]])
    assert suppressed[0, 0] != expected.token_ids[0]
