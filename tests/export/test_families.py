"""Each family's tiny model exported, certified and run: the engine's greedy tokens are transformers' `generate`
(Mistral's across its sliding window, batched), genai_config.json names the family as onnxruntime-genai does and
onnxruntime-genai runs the folder to the same tokens; int4 and a Llama 3 GGUF are certified too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from gptserve.export.artifact import read_manifest
from gptserve.model.generation import FinishReason, Sequence, StoppingParams, generate
from gptserve.model.spec import load_pretrained
from gptserve.service.engine import Engine
from tests.tiny_models import FAMILIES, FAMILY_NEW_TOKENS, FAMILY_PROMPT

GENAI_TYPES = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "phi3": "phi3"}


@pytest.fixture(scope="module")
def transformers_tokens(family_folders) -> dict[str, list[int]]:
    """transformers' greedy continuation of FAMILY_PROMPT for each family, stopping where its generation config
    says (Llama 3's second end-of-sequence id included)."""
    tokens = {}
    for kind, folder in family_folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        prompt = torch.tensor([load_pretrained(str(folder)).tokenizer.encode(FAMILY_PROMPT)])  # (1, T)
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=FAMILY_NEW_TOKENS)
        tokens[kind] = output[0, prompt.shape[1]:].tolist()
    return tokens


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_certified_with_the_family_in_its_manifest(kind, family_folders, family_artifacts):
    manifest = read_manifest(family_artifacts[kind])
    assert manifest.parity.passed and manifest.parity.criteria["max_abs_diff"] == 1e-5
    assert all(case.max_abs_diff <= 1e-5 and case.greedy_match for case in manifest.parity.cases)
    assert manifest.model.config == load_pretrained(str(family_folders[kind])).config


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_engine_greedy_equals_transformers_generate(kind, family_artifacts, transformers_tokens):
    engine = Engine.load(family_artifacts[kind])
    sequence = Sequence(engine.tokenizer, engine.tokenizer.encode(FAMILY_PROMPT),
                        stopping=StoppingParams(FAMILY_NEW_TOKENS))
    result = generate(engine.step, sequence)
    assert result.token_ids == transformers_tokens[kind]
    assert len(set(result.token_ids)) > 1
    # Llama 3 stops on its second end-of-sequence id, before the token limit; the others run to the limit.
    if kind == "llama3":
        assert result.finish_reason == FinishReason.EOS and len(result.token_ids) < FAMILY_NEW_TOKENS
        assert result.token_ids[-1] == engine.tokenizer.eos_token_ids[1]
    else:
        assert result.finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_genai_runs_the_folder_to_the_same_tokens(kind, family_artifacts, transformers_tokens):
    og = pytest.importorskip("onnxruntime_genai")
    artifact = family_artifacts[kind]
    genai_config = json.loads((artifact / "genai_config.json").read_text())["model"]
    assert genai_config["type"] == GENAI_TYPES[kind]
    eos = read_manifest(artifact).generation.eos_token_ids
    assert genai_config["eos_token_id"] == (list(eos) if len(eos) > 1 else eos[0])

    model = og.Model(str(artifact))
    prompt_ids = list(og.Tokenizer(model).encode(FAMILY_PROMPT))
    assert prompt_ids == Engine.load(artifact).tokenizer.encode(FAMILY_PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + FAMILY_NEW_TOKENS)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    expected = transformers_tokens[kind]
    if expected[-1] in eos:  # genai stops on the end-of-sequence id without writing it into the sequence
        expected = expected[:-1]
    assert [int(token) for token in generator.get_sequence(0)[len(prompt_ids):]] == expected


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_int4_is_certified_and_served(kind, family_folders, tmp_path):
    """The int4 path (MatMulNBits, the LM head split by token frequency) covers each family's graph: per-head
    norms, biases in the packed projection and sliding windows stay in float."""
    from gptserve.export.exporter import export
    from tests.export.test_precision import TINY_CRITERIA, matmul_kinds

    manifest = export(str(family_folders[kind]), tmp_path / kind, precision="int4", criteria=TINY_CRITERIA["int4"])
    assert manifest.parity.passed
    assert matmul_kinds(tmp_path / kind) == ({4: 2 * 5 + 1, 8: 1}, 0)  # 2 x (qkv, o, gate, up, down) + the head
    engine = Engine.load(tmp_path / kind)  # the start-up canary re-runs the recorded greedy tokens
    assert tuple(engine.manifest.canary.greedy_tokens) == manifest.canary.greedy_tokens


def test_engine_batches_across_mistrals_sliding_window(family_folders, family_artifacts):
    """Rows of 81 and 30 prompt tokens and 40 decode steps, batched as the scheduler batches them (KV buffers
    appended in place): both cross the 48-position window, and both rows are transformers' greedy tokens."""
    engine = Engine.load(family_artifacts["mistral"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders["mistral"], dtype=torch.float32)
    long_prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)
    prompts, steps = [long_prompt, long_prompt[:30]], 40
    logits, cache = engine.prefill(prompts)
    tokens = [[int(row.argmax())] for row in logits]
    for _ in range(steps - 1):
        logits = engine.decode(cache, np.array([row[-1] for row in tokens]))
        for row, row_logits in zip(tokens, logits):
            row.append(int(row_logits.argmax()))
    for prompt, row in zip(prompts, tokens):
        ids = torch.tensor([prompt])  # (1, T)
        with torch.no_grad():
            output = reference.eval().generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=steps, eos_token_id=None)
        assert row == output[0, len(prompt):].tolist()
    assert len(long_prompt) > 48 and len(set(tokens[0])) > 1


def test_llama3_gguf_is_certified(tmp_path, family_folders, default_gguf):
    """Llama 3.1's scaling as llama.cpp stores it (rope_freqs divisors) reaches the export's cos/sin caches."""
    from gptserve.export.exporter import export
    from gptserve.model.tokenizer import read_gguf_metadata
    from tests.model.test_gguf_families import write_family_gguf

    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders["llama3"])
    tokenizer = {name: value for name, value in read_gguf_metadata(default_gguf).items()
                 if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.pre"}
    write_family_gguf(tmp_path / "llama3.gguf", "llama3", reference, tokenizer)
    manifest = export(str(tmp_path / "llama3.gguf"), tmp_path / "artifact", tolerance=1e-5)
    assert manifest.parity.passed and manifest.model.config.rope_scaling.kind == "factors"
    assert Engine.load(tmp_path / "artifact").manifest.model.config == manifest.model.config
