"""The ONNX Runtime engine: loads a certified artifact, checks it, and runs forward steps. No torch here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptserve.export.artifact import ArtifactError, read_manifest, verify_files
from gptserve.export.contract import LOGITS, empty_past, feed, ragged_mask
from gptserve.export.graph_file import position_limit
from gptserve.export.manifest import Manifest
from gptserve.export.runtime import create_session
from gptserve.model.greedy import greedy_tokens
from gptserve.model.tokenizer import Tokenizer
from gptserve.service.kv_cache import KVCache

log = logging.getLogger("gptserve.engine")

CANARY_STEPS = 8  # greedy steps re-run at start: enough to catch a wrong build, cheap enough for every start
KV_GROWTH = 64  # positions of room a KV buffer gains at least when it grows (it at least doubles, too)


class BoundBuffers(list):
    """A batch's KV buffers together with the IO binding that binds them as both past and present, and the
    logits buffer it writes: while a batch's buffers stay the same (from one decode step to the next) a step
    rebinds two small inputs, not every layer's cache. The binding lives and dies with the batch's list."""

    binding = None
    values: list | None = None  # the OrtValues bound, which keep the buffers' memory referenced
    logits: np.ndarray | None = None
    capacity = 0  # positions every buffer holds


def with_room(tensor: np.ndarray, needed: int, limit: int) -> np.ndarray:
    """The KV buffer (B, KV, capacity, D) itself when it holds `needed` positions, else a larger copy: it grows
    geometrically (up to the context length), so a sequence's cache is copied a few times, not at every step."""
    capacity = tensor.shape[2]
    if capacity >= needed and tensor.flags.c_contiguous:  # the kernel writes through the raw pointer
        return tensor
    grown = np.zeros((*tensor.shape[:2], max(needed, min(limit, max(2 * capacity, needed + KV_GROWTH))),
                      tensor.shape[3]), dtype=tensor.dtype)
    grown[:, :, :min(capacity, needed)] = tensor[:, :, :needed]
    return grown


class Engine:
    def __init__(self, folder: Path, manifest: Manifest, session, tokenizer: Tokenizer) -> None:
        self.folder, self.manifest, self.session, self.tokenizer = folder, manifest, session, tokenizer
        self.graph = manifest.graph
        self.context_length = manifest.generation.context_length
        self.vocab_size = self.graph.vocab_size
        self.execution_provider = session.get_providers()[0]
        self.on_device = self.execution_provider == "CUDAExecutionProvider"
        self.device_id = int(session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))
        self._past_names, self._present_names = self.graph.past_names, self.graph.present_names
        self.load_options: dict = {}  # Engine.load's arguments besides the folder

    @classmethod
    def load(cls, folder: str | Path, provider: str = "auto", threads: int | None = None, device_id: int = 0,
             gpu_mem_limit: int | None = None) -> Engine:
        """Verifies every file's sha256, opens the session, checks the manifest against the graph and re-runs the
        start-up canary."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        if not manifest.parity.passed:
            raise ArtifactError(f"{folder}: its parity certification did not pass; refusing to serve it")
        graph_path = folder / manifest.graph.file
        try:
            session = create_session(graph_path, provider, threads, device_id, gpu_mem_limit)
        except Exception as error:  # onnxruntime raises its own untyped failures for unreadable graphs
            raise ArtifactError(f"{folder}: ONNX Runtime cannot load the graph: {error}") from error
        _check_contract(folder, manifest, session)
        engine = cls(folder, manifest, session, Tokenizer.from_folder(folder))
        engine.run_canary()
        engine.load_options = {"provider": provider, "threads": threads, "device_id": device_id,
                               "gpu_mem_limit": gpu_mem_limit}
        return engine

    def load_beside(self, folder: Path) -> Engine:
        """Another artifact (a draft model) on this engine's provider, device and threads."""
        return Engine.load(folder, **self.load_options)

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        return empty_past(self.graph, batch_size)

    # The scheduler's verbs: a batch's cache is a KVCache this engine fills; nothing else reads its buffers.

    def prefill(self, prompts: list, cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """Prompts (token ids, a ragged batch) into a new cache; or, with `cache` (one row), the next chunk of
        that row's prompt appended to it (GroupQueryAttention runs several new tokens over a past for a batch of
        one only). Each row's last token's logits (B, V), and the cache."""
        lengths = np.array([len(prompt) for prompt in prompts])
        if cache is None:
            attention_mask = ragged_mask(lengths)  # (B, T)
            input_ids: np.ndarray = np.zeros(attention_mask.shape, dtype=np.int64)  # (B, T); padding ids are masked out
            for row, prompt in enumerate(prompts):
                input_ids[row, :len(prompt)] = prompt
            logits, present = self.step(input_ids, attention_mask, None)
            return logits, KVCache(present, lengths)
        if cache.size != 1 or len(prompts) != 1:
            raise ValueError("a prompt chunk over a cache is a batch of one")
        input_ids = np.array(prompts, dtype=np.int64)  # (1, T)
        logits, present = self.step(input_ids, cache.attention_mask(input_ids.shape[1]), cache.buffers)
        cache.advance(present, input_ids.shape[1])
        return logits, cache

    def decode(self, cache: KVCache, token_ids: np.ndarray) -> np.ndarray:
        """One new token per row (B,), appended to the cache in place. The logits (B, V) are the batch's logits
        buffer, which its next step overwrites: take the tokens first."""
        logits, present = self.step(token_ids.reshape(-1, 1).astype(np.int64), cache.attention_mask(), cache.buffers)
        cache.advance(present)
        return logits

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None):
        """A generation step. input_ids (B, T), attention_mask (B, longest row + T), past: flat per-layer
        [key, value, ...] each (B, KV, P, D) with P at least the longest row, or None for a prefill. Rows are
        ragged (export/fused.py): row b's tokens, its new ones included, are its first sum(attention_mask[b])
        positions; a row's new tokens other than the longest's are followed by padding. Returns each row's last
        token's logits (B, V) and the present, in the same layout.

        On CPU a step's present is the past's own buffers (grown when needed) with the new positions written in:
        positions beyond the mask's width are room, not cache, and the past passed in is spent. A decode step's
        logits are the batch's logits buffer, which its next step overwrites: take the tokens first."""
        logits, present = self._forward(input_ids, attention_mask, past)
        if logits.shape[1] == 1:
            return logits[:, 0], present
        # Every position's logits (B, T, V): each row's own last token, which padding may follow.
        last = attention_mask.sum(-1) - 1 - (attention_mask.shape[1] - logits.shape[1])
        return logits[np.arange(len(logits)), last], present

    def verify(self, cache: KVCache, token_ids: Sequence[int]) -> np.ndarray:
        """A stream's last token and the tokens drafted after it (T,) over its cache, a batch of one (the graph runs
        several new tokens over a past for one row only), in one forward: every position's logits (T, V), the
        batch's logits buffer, which its next step overwrites. The cache gains all T positions; `cache.rewind`
        takes back those of the drafts rejected."""
        if cache.size != 1:
            raise ValueError("drafts are verified for a batch of one")
        input_ids = np.array([token_ids], dtype=np.int64)  # (1, T)
        logits, present = self._forward(input_ids, cache.attention_mask(input_ids.shape[1]), cache.buffers)
        cache.advance(present, input_ids.shape[1])
        return logits[0]

    def _forward(self, input_ids, attention_mask, past):
        """The provider's way of running a step: logits (B, T', V) of the last T' positions, and the present."""
        if self.on_device:
            return self._step_on_device(input_ids, attention_mask, past)
        if past is None:
            return self._prefill(input_ids, attention_mask)
        return self._step_in_place(input_ids, attention_mask, past)

    def _prefill(self, input_ids, attention_mask):
        """CPU: logits of the last positions only (logits_to_keep), as many as reach back to the shortest prompt's
        last token: one each when no prompt is padded. A plain run: IO binding cannot bind an input that has a
        default."""
        keep = int(input_ids.shape[1] - attention_mask.sum(-1).min() + 1)
        inputs = feed(self.graph, input_ids, attention_mask, self.empty_past(input_ids.shape[0]), logits_to_keep=keep)
        logits, *present = self.session.run(None, inputs)
        return logits, present

    def _step_in_place(self, input_ids, attention_mask, past):
        """CPU: each layer's past and present are bound to one buffer, so GroupQueryAttention appends the new
        keys and values where they belong instead of copying the whole cache into a new present every step. A
        prompt chunk over a past comes here too: its T positions' logits cost less than copying a long cache."""
        needed = attention_mask.shape[1]
        if not (isinstance(past, BoundBuffers) and needed <= past.capacity):  # else every buffer has the room
            past = BoundBuffers([with_room(tensor, needed, self.context_length) for tensor in past])
            past.capacity = min(tensor.shape[2] for tensor in past)
            past.binding = self.session.io_binding()
            past.values = [ort.OrtValue.ortvalue_from_numpy(tensor) for tensor in past]  # share the arrays' memory
            for past_name, present_name, value in zip(self._past_names, self._present_names, past.values):
                past.binding.bind_ortvalue_input(past_name, value)
                past.binding.bind_ortvalue_output(present_name, value)
        shape = (*input_ids.shape, self.vocab_size)  # (B, T, V)
        if past.logits is None or past.logits.shape != shape:
            past.logits = np.empty(shape, dtype=np.float32)
            past.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(past.logits))
        past.binding.bind_cpu_input("input_ids", input_ids)
        past.binding.bind_cpu_input("attention_mask", attention_mask)
        self.session.run_with_iobinding(past.binding)
        return past.logits, past  # no copy (a fresh 1.5 MB at batch 8 is ~1% of a step): callers sample first

    def _step_on_device(self, input_ids, attention_mask, past):
        """CUDA: the presents stay on the GPU as OrtValues and come back as the next step's past (IO binding);
        only the logits cross to the host for sampling. Numpy pasts (new or regrouped batches) are uploaded."""
        if past is None:
            past = self.empty_past(input_ids.shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        for name, tensor in zip(self._past_names, past):
            if isinstance(tensor, np.ndarray):
                binding.bind_cpu_input(name, tensor)
            else:
                binding.bind_ortvalue_input(name, tensor)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present

    def run_canary(self) -> None:
        """Refuse to serve when this runtime's greedy tokens differ from those recorded at export, or when none
        were recorded: only fp16, which no CPU certifies, has none, and it is served on CUDA alone (unchecked)."""
        canary, precision = self.manifest.canary, self.manifest.precision
        if canary is None:
            if not (self.on_device and precision == "fp16"):
                raise ArtifactError(f"{self.folder}: no start-up canary recorded ({precision}, certified by "
                                    f"{self.manifest.parity.runtime}); refusing to serve it unchecked on "
                                    f"{self.execution_provider}")
            log.warning("%s: no canary recorded (fp16 is certified structurally only); serving unchecked on %s",
                        self.folder, self.execution_provider)
            return
        expected = list(canary.greedy_tokens[:CANARY_STEPS])
        ids = [*canary.prompt_ids, *expected]
        if len(expected) < CANARY_STEPS or not canary.prompt_ids or len(ids) > self.context_length:
            raise ArtifactError(f"{self.folder}: the recorded canary ({len(canary.prompt_ids)} prompt ids, "
                                f"{len(canary.greedy_tokens)} greedy tokens) is not one the engine can check "
                                f"({CANARY_STEPS} tokens, within the context length {self.context_length})")
        if not all(0 <= token < self.vocab_size for token in ids):
            raise ArtifactError(f"{self.folder}: the recorded canary holds token ids outside the vocabulary "
                                f"of {self.vocab_size}")
        tokens = greedy_tokens(self.step, canary.prompt_ids, CANARY_STEPS)[0].tolist()
        if tokens != expected:
            raise ArtifactError(
                f"{self.folder}: start-up canary failed on {self.execution_provider}: greedy tokens {tokens}, "
                f"recorded at export {expected}; the runtime, its execution provider or the files are wrong")
        log.info("canary passed on %s (%d greedy tokens)", self.execution_provider, len(tokens))


# ONNX Runtime's names of the contract's dtypes.
ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)", "float16": "tensor(float16)"}


def _check_contract(folder: Path, manifest: Manifest, session) -> None:
    """The graph is the one the manifest describes. The manifest cannot hash itself, so an edited one is caught
    here: its tensors (names, dtypes, fixed dimensions), its vocabulary, KV heads and head size against the
    graph's own inputs and outputs, its context length against the positions the graph can embed."""
    graph = manifest.graph
    fail = lambda message: ArtifactError(f"{folder}: {message}; the manifest does not describe this graph")
    nodes = {node.name: node for node in (*session.get_inputs(), *session.get_outputs())}
    optional = {node.name for node in session.get_overridable_initializers()}  # inputs with a default
    wanted = {"input_ids", "attention_mask", *graph.past_names, LOGITS, *graph.present_names}
    listed = {spec.name for spec in (*graph.inputs, *graph.outputs)}
    odd = sorted((set(nodes) ^ wanted) | (listed ^ wanted) | (optional ^ {spec.name for spec in graph.optional_inputs}))
    if odd:
        raise fail(f"inputs/outputs {', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''} are not in both the graph "
                   f"and the manifest (of {graph.n_layer} layers)")
    for spec in (*graph.inputs, *graph.outputs):
        node = nodes[spec.name]
        fixed = [(actual, wanted) for actual, wanted in zip(node.shape, spec.shape) if isinstance(wanted, int)]
        if len(node.shape) != len(spec.shape) or any(actual != wanted for actual, wanted in fixed):
            raise fail(f"{node.name} has shape {node.shape} in the graph, the manifest says {list(spec.shape)}")
        if node.type != ORT_TYPES.get(spec.dtype):
            raise fail(f"{node.name} is {node.type} in the graph, the manifest says {spec.dtype}")
    vocabulary = nodes[LOGITS].shape[-1]
    if vocabulary != graph.vocab_size:
        raise fail(f"the graph's logits cover {vocabulary} tokens, the manifest's vocabulary is {graph.vocab_size}")
    for name in graph.past_names:
        shape = nodes[name].shape  # (B, KV, P, D)
        if len(shape) != 4 or (shape[1], shape[3]) != (graph.n_kv_heads, graph.head_dim):
            raise fail(f"{name} has shape {shape} in the graph, not {graph.n_kv_heads} KV heads of "
                       f"{graph.head_dim}, as the manifest says")
    try:
        positions = position_limit(folder / graph.file)
    except ValueError as error:
        raise fail(str(error)) from error
    if manifest.generation.context_length != positions:
        raise fail(f"context length {manifest.generation.context_length}, but the graph embeds {positions} positions")
    if (manifest.precision == "fp16") != (graph.kv_dtype == np.float16):
        raise fail(f"precision {manifest.precision} with a {graph.kv_dtype} KV cache")
