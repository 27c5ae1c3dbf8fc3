"""The engine's CPU steps: a prefill returns each row's last token's logits, and decode steps append to KV
buffers in place (no copy of the cache per step), with the same numbers as the graph run plainly."""

import numpy as np

from gptserve.export.contract import empty_past, feed, ragged_mask
from gptserve.service.engine import with_room


def test_decode_steps_append_in_place_and_equal_a_plain_run(tiny_engine):
    engine, graph = tiny_engine, tiny_engine.graph
    prompt = engine.tokenizer.encode("The quick brown fox jumps over")
    lengths = np.array([len(prompt), len(prompt) - 3])  # ragged rows: row 1 is 3 tokens shorter
    attention_mask = ragged_mask(lengths)
    input_ids = np.array([prompt, prompt[:-3] + [0, 0, 0]], dtype=np.int64)
    plain_logits, *plain_past = engine.session.run(None, feed(graph, input_ids, attention_mask, empty_past(graph, 2)))
    logits, past = engine.step(input_ids, attention_mask, None)
    assert logits.shape == (2, graph.vocab_size)  # (B, V): each row's last token
    np.testing.assert_allclose(logits, plain_logits[[0, 1], lengths - 1], atol=1e-6)

    buffers = None
    for _ in range(4):
        tokens = logits.argmax(-1)[:, None]  # (B, 1)
        lengths += 1
        attention_mask = ragged_mask(lengths)
        logits, past = engine.step(tokens, attention_mask, past)
        plain_logits, *plain_past = engine.session.run(None, feed(graph, tokens, attention_mask, plain_past))
        np.testing.assert_allclose(logits, plain_logits[:, -1], atol=1e-6)
        if buffers is not None:  # the first step grew the prefill's exact-size cache; later ones write into it
            assert all(tensor is buffer for tensor, buffer in zip(past, buffers))
        buffers = past
    assert past[0].shape[2] > lengths.max()  # room for the next steps
    for tensor, plain in zip(past, plain_past):
        for row, length in enumerate(lengths):  # each row's own positions
            np.testing.assert_allclose(tensor[row, :, :length], plain[row, :, :length], atol=1e-6)


def test_kv_buffers_grow_geometrically_up_to_the_context():
    cache = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    assert with_room(cache, 5, 100) is cache
    grown = with_room(cache, 6, 100)
    assert grown.shape == (2, 3, 6 + 64, 4) and grown.flags.c_contiguous  # room for 64 more steps
    np.testing.assert_array_equal(grown[:, :, :5], cache)
    assert with_room(grown, 71, 1000).shape[2] == 2 * 70  # then it doubles
    assert with_room(grown, 71, 80).shape[2] == 80  # never beyond the context length
    assert with_room(cache[:, :, ::2], 3, 100).flags.c_contiguous  # a strided view is copied, not written through
