"""Continuous batching: one engine thread steps every running sequence together, newcomers join at step boundaries.

Each iteration of the engine thread has vLLM's three parts: plan (`Plan`, plain data: who is dropped, paused,
resumed or admitted, which prompt tokens are prefilled, whether to decode), execute (the engine's steps), apply
(sample each row's token, send it on, end what finished). Rows are ragged (service/kv_cache.py): each attends to
its own tokens only, so a sequence's tokens are the same alone or in any batch.

Chunked prefill: one iteration prefills either several short prompts together or one chunk of a long prompt (its
cache grows chunk by chunk), then runs one decode step of the running sequences. A chunk is as many tokens as
the last prefill's rate says fit in `prefill_step_seconds` (at most `prefill_chunk_tokens`): a prompt token costs
more the longer its past, so chunks shrink as a long prompt is read. So a long prompt delays each running
stream's next token by about that long, and a request cancelled mid-prompt (its client gone, its deadline passed)
stops within a chunk.

Prefix caching (service/prefix_cache.py): a prompt whose start is cached is admitted as one already read that far,
from a copy of the cached blocks, and its remaining tokens are read as chunks over them; a prompt's blocks are kept
as soon as it is read, before decode steps write into its cache.

Slow readers: a token counts as unread until its message's write has completed. A stream with
`max_unread_tokens` unread is paused: its KV rows leave the batch and wait aside, and it gives up its slot (up to
`max_paused` paused streams; more than that keep their slots), so a client that stops reading costs no compute and
never blocks admission; it rejoins once its client has read half of them. Memory: a paused stream holds its cache
(at most context length x the KV bytes of a position) and its unread tokens. The server ends a stream whose writes
make no progress (service/server.py).

The asyncio side submits checked requests and reads their tokens; the engine thread owns the batch. They meet in
three places only: the waiting queue (under a lock), each request's cancel flag and read count, and
`call_soon_threadsafe` deliveries of tokens back to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from collections.abc import Sequence as Prompt
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gptserve.model.generation import Sequence, TokenEvent
from gptserve.model.guidance import ConstraintError
from gptserve.model.tokenizer import Tokenizer
from gptserve.service.api import GenerationRequest, Timings
from gptserve.service.errors import EngineFailure, InvalidRequest, NotServing, QueueFull
from gptserve.service.kv_cache import KVCache
from gptserve.service.metrics import Metrics
from gptserve.service.prefix_cache import Block, PrefixCache
from gptserve.service.speculative import Speculator

log = logging.getLogger("gptserve.scheduler")

# Prompt tokens one iteration prefills at most (the padded size of a batch of short prompts), and the time a
# chunk aims at. A running stream waits for that, one decode step, and, after a long prompt's last chunk, the copy
# that joins its cache to the batch: 0.2 s keeps the longest wait under 0.5 s here (README: limits).
PREFILL_CHUNK_TOKENS = 512
PREFILL_STEP_SECONDS = 0.2
MIN_CHUNK_TOKENS = 16
# A prompt over a cached prefix is read in a pass of its own (several new tokens over a past run for a batch of one):
# a shorter prefix is read again with the prompts admitted beside it, one pass, as a step costs about the reading of
# a few dozen prompt tokens (the weights are read once either way).
MIN_REUSE_TOKENS = 64


class BatchEngine(Protocol):
    """What the scheduler needs of an engine (service/engine.py's Engine)."""

    tokenizer: Tokenizer

    def prefill(self, prompts: list[Prompt[int]], cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]: ...

    def decode(self, cache: KVCache, token_ids: np.ndarray) -> np.ndarray: ...

    def verify(self, cache: KVCache, token_ids: Prompt[int]) -> np.ndarray: ...


class RequestHandle:
    """One sequence of a request as both sides see it. The engine thread writes the sequence, counters and
    timestamps; the event loop reads tokens through `updates()` and may `cancel()`. A request for n sequences is
    its first sequence's handle (the leader, which waits in the queue and whose prompt is read) with the others as
    its followers: they take their slots with it and start from a copy of its prompt's cache."""

    def __init__(self, request: GenerationRequest, sequence: Sequence, scheduler: Scheduler,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.sequence, self.loop = request, sequence, loop
        self._scheduler = scheduler
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.ended: float | None = None
        self.produced = 0  # tokens the engine thread made
        self.consumed = 0  # tokens whose messages the client's side has written
        self.paused = False
        self.cancelled = False
        self.done = False
        self.error: Exception | None = None
        self._events: list[TokenEvent] = []
        self._wakeup = asyncio.Event()
        self.followers: list[RequestHandle] = []
        self.cached_tokens = 0  # of the prompt, taken from the prefix cache rather than read (the leader's)

    @property
    def group(self) -> list[RequestHandle]:
        """The request's sequences: this one and its followers."""
        return [self, *self.followers]

    @property
    def unread(self) -> int:
        return self.produced - self.consumed

    async def updates(self) -> AsyncIterator[tuple[list[TokenEvent], bool]]:
        """(tokens since the last update, whether the request has ended). Raises the request's failure. The tokens
        of an update count as read once the caller asks for the next one (after writing them)."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Taken together: more tokens (and the end) may arrive while the caller holds this update.
            events, self._events, done = self._events, [], self.done
            if self.error is not None:
                raise self.error
            if events or done:
                yield events, done
            self.consumed += len(events)
            if self.paused:
                self._scheduler.wake()
            if done:
                return

    def group_updates(self) -> AsyncIterator[tuple[RequestHandle, list[TokenEvent], bool]]:
        """The updates of every sequence of this request, as they come (see `merge_updates`)."""
        return merge_updates(self.group)

    def cancel(self) -> None:
        """The client is gone: stop generating (every sequence of the request) at the next step boundary. A no-op
        for the sequences that have ended."""
        live = [handle for handle in self.group if not handle.done and not handle.cancelled]
        for handle in live:
            handle.cancelled = True
        if live:
            self._scheduler.withdraw(self)

    def timings(self) -> Timings:
        """Of the whole request: its first token is the first of any sequence, its end the last one's."""
        ends = [handle.ended for handle in self.group]
        end = max(moment for moment in ends if moment is not None) if None not in ends else time.perf_counter()
        firsts = [handle.first_token for handle in self.group if handle.first_token is not None]
        since = lambda moment: (moment - self.submitted) if moment is not None else 0.0
        return Timings(queue=since(self.admitted), time_to_first_token=since(min(firsts) if firsts else None),
                       total=end - self.submitted)

    def _receive(self, events: list[TokenEvent], done: bool, error: Exception | None) -> None:
        """On the event loop: what the engine thread produced for this request since the last delivery."""
        self._events.extend(events)
        self.done = self.done or done or error is not None
        self.error = self.error or error
        self._wakeup.set()


async def merge_updates(handles: list[RequestHandle]) -> AsyncIterator[tuple[RequestHandle, list[TokenEvent], bool]]:
    """The updates of several sequences, as they come: (its handle, tokens, whether it has ended). As with
    `updates()`, a sequence's tokens count as read once the caller asks for its next update."""
    if len(handles) == 1:
        async for events, done in handles[0].updates():
            yield handles[0], events, done
        return
    streams = {handle: handle.updates() for handle in handles}
    pending = {asyncio.ensure_future(anext(stream)): handle for handle, stream in streams.items()}
    try:
        while pending:
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                handle = pending.pop(task)
                try:
                    events, done = task.result()
                except StopAsyncIteration:
                    continue
                yield handle, events, done
                pending[asyncio.ensure_future(anext(streams[handle]))] = handle
    finally:
        for task in pending:
            task.cancel()


@dataclass(frozen=True)
class Chunk:
    """Prompt positions [start, stop) of one request, prefilled in this iteration."""

    handle: RequestHandle
    start: int
    stop: int

    @property
    def completes_prompt(self) -> bool:
        return self.stop == len(self.handle.request.prompt_ids)


@dataclass(frozen=True)
class Plan:
    """One iteration of the engine thread, decided before anything runs."""

    drop: tuple[RequestHandle, ...] = ()  # cancelled: ended, their caches freed
    pause: tuple[RequestHandle, ...] = ()  # running, with max_unread_tokens unread: aside until their clients read
    resume: tuple[RequestHandle, ...] = ()  # paused, caught up: back into the batch
    admit: tuple[RequestHandle, ...] = ()  # from the queue into free slots
    reuse: tuple[tuple[RequestHandle, tuple[Block, ...]], ...] = ()  # of the admitted: their cached prefixes
    prefill: tuple[Chunk, ...] = ()  # whole short prompts (one ragged batch), or one chunk of a long one
    decode: bool = False  # one step of every running sequence

    @property
    def empty(self) -> bool:
        return not (self.drop or self.pause or self.resume or self.admit or self.prefill or self.decode)


@dataclass
class _Outgoing:
    events: list[TokenEvent] = field(default_factory=list)
    done: bool = False
    error: Exception | None = None


def _deliver(items: list[tuple[RequestHandle, _Outgoing]]) -> None:
    for handle, outgoing in items:
        handle._receive(outgoing.events, outgoing.done, outgoing.error)


def plan_prefill(waiting: list[RequestHandle], progress: dict[RequestHandle, int], budget: int) -> tuple[Chunk, ...]:
    """The prompt tokens of one iteration, within `budget`: the next chunk of a prompt already begun (one at a
    time, so few half-read caches wait); else, in arrival order, whole prompts while their padded batch fits; else
    the first chunk of a prompt longer than the budget."""
    begun = [handle for handle in waiting if progress.get(handle, 0)]
    if begun:
        handle = begun[0]
        start = progress[handle]
        return (Chunk(handle, start, min(len(handle.request.prompt_ids), start + budget)),)
    chunks: list[Chunk] = []
    for handle in waiting:
        length = len(handle.request.prompt_ids)
        width = max([length, *(chunk.stop for chunk in chunks)])
        if length > budget or (len(chunks) + 1) * width > budget:
            break
        chunks.append(Chunk(handle, 0, length))
    if not chunks and waiting:
        chunks.append(Chunk(waiting[0], 0, budget))
    return tuple(chunks)


class Scheduler:
    def __init__(self, engine: BatchEngine, metrics: Metrics, max_batch_size: int = 8, max_queue: int = 64,
                 max_unread_tokens: int = 32, max_paused: int | None = None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                 prefill_step_seconds: float = PREFILL_STEP_SECONDS, prefix_cache: PrefixCache | None = None,
                 speculator: Speculator | None = None) -> None:
        max_paused = max_batch_size if max_paused is None else max_paused
        if min(max_batch_size, max_unread_tokens, prefill_chunk_tokens) < 1 or min(max_queue, max_paused) < 0 \
                or not prefill_step_seconds > 0:
            raise ValueError("max_batch_size, max_unread_tokens and prefill_chunk_tokens must be at least 1, "
                             "max_queue and max_paused at least 0, prefill_step_seconds above 0")
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_queue, self.max_unread_tokens = max_batch_size, max_queue, max_unread_tokens
        self.max_paused, self.prefill_chunk_tokens = max_paused, prefill_chunk_tokens
        self.prefill_step_seconds = prefill_step_seconds
        self.prefix_cache = prefix_cache  # the engine thread's own
        self.speculator = speculator  # the engine thread's own too
        self._seconds_per_prompt_token = 0.0  # of the last prefill: sizes the next chunk
        self._condition = threading.Condition()
        # Under the condition's lock: the queue, and how many requests are in the server (queued or admitted).
        self._waiting: deque[RequestHandle] = deque()
        self._outstanding = 0
        self._accepting = True
        self._stopping = False
        # The engine thread's own: the running rows (in their cache's row order), the admitted requests whose
        # prompts are being read (with the cache of the chunks read so far), and the paused ones.
        self._running: list[RequestHandle] = []
        self._batch: KVCache | None = None
        self._prefilling: dict[RequestHandle, KVCache | None] = {}
        self._paused: dict[RequestHandle, KVCache] = {}
        # Every request taken from the queue and not yet ended, wherever it is: what a failure must end.
        self._admitted: set[RequestHandle] = set()
        self._outgoing: dict[RequestHandle, _Outgoing] = {}
        self._thread: threading.Thread | None = None

    # The event loop's side -------------------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        """Sequences admitted and not yet ended: running, reading their prompts, or paused."""
        return len(self._running) + _width(self._prefilling) + len(self._paused)

    @property
    def queued_count(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a checked request (its n sequences count n); refused at once when they do not fit beside the
        max_batch_size + max_queue sequences in already (paused ones included). Returns the leader."""
        loop = asyncio.get_running_loop()
        handles = [RequestHandle(request, Sequence(self.engine.tokenizer, list(request.prompt_ids), request.sampling,
                                                   request.stopping, index=index, top_logprobs=request.top_logprobs,
                                                   with_logprobs=request.return_logprobs),
                                 self, loop) for index in range(request.n)]
        handle, handle.followers = handles[0], handles[1:]
        with self._condition:
            if not self._accepting:
                raise NotServing("the server is shutting down; retry on another replica")
            if self._outstanding + request.n > self.max_batch_size + self.max_queue:
                raise QueueFull(f"the server is full: {self.max_batch_size} requests running and {self.max_queue} "
                                "waiting (--max-batch-size, --max-queue); retry later")
            self._outstanding += request.n
            self._waiting.append(handle)
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()
        return handle

    def withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request leaves the queue at once; an admitted one at the engine's next step boundary."""
        with self._condition:
            if handle in self._waiting:
                self._waiting.remove(handle)
                self._outstanding -= len(handle.group)
                for member in handle.group:
                    member.ended = time.perf_counter()
                    self.metrics.finished.labels("cancelled").inc()
                self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()

    def wake(self) -> None:
        with self._condition:
            self._condition.notify()

    def close(self) -> None:
        """Refuse new requests; those in the server run on."""
        with self._condition:
            self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the engine thread; requests still in the server fail with UNAVAILABLE."""
        with self._condition:
            self._accepting = False
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # The engine thread: plan ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if (plan := self._next_plan()) is None:
                    break
                self._execute(plan)
            except Exception:  # a bug here must not end the loop: fail what is in the server, go on
                log.exception("scheduler step failed; failing the %d requests in it", len(self._admitted))
                self._fail()
            self._flush()
        with self._condition:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in [*self._admitted, *(member for leader in waiting for member in leader.group)]:
            self._end(handle, NotServing("the server shut down before this request finished"))
        self._flush()

    def _next_plan(self) -> Plan | None:
        """Blocks until there is something to do; what to do now (None when stopping)."""
        with self._condition:
            while not self._stopping:
                plan = self._plan()
                if not plan.empty:
                    self.metrics.queue_depth.set(len(self._waiting))
                    return plan
                self._condition.wait()
            return None

    def _slots_taken(self, running: int, prefilling: int, paused: int) -> int:
        return running + prefilling + max(0, paused - self.max_paused)

    def _plan(self) -> Plan:
        """Under the lock (admitting takes from the queue); reads the engine thread's state and records the
        admitted, nothing else. A paused stream resumes once half its unread tokens are read, so a reader slower
        than generation does not pause and resume (two copies of its cache) every few tokens."""
        drop = tuple(handle for handle in self._admitted if handle.cancelled)  # each flag read once
        running = [handle for handle in self._running if handle not in drop]
        prefilling = [handle for handle in self._prefilling if handle not in drop]
        paused = [handle for handle in self._paused if handle not in drop]
        pause = [handle for handle in running if handle.unread >= self.max_unread_tokens]
        running = [handle for handle in running if handle not in pause]
        paused += pause
        resume: list[RequestHandle] = []
        reading = _width(prefilling)  # slots of the requests whose prompts are being read
        for handle in [handle for handle in paused if handle.unread <= self.max_unread_tokens // 2]:
            after = self._slots_taken(len(running) + len(resume) + 1, reading, len(paused) - len(resume) - 1)
            if after <= self.max_batch_size:
                resume.append(handle)
        slots = self._slots_taken(len(running) + len(resume), reading, len(paused) - len(resume))
        admit: list[RequestHandle] = []
        while self._waiting and slots + _width(admit) + len(self._waiting[0].group) <= self.max_batch_size:
            admit.append(self._waiting.popleft())
        self._admitted.update(member for handle in admit for member in handle.group)
        progress = {handle: int(cache.lengths[0]) for handle, cache in self._prefilling.items() if cache is not None}
        reuse = []  # an admitted prompt with a cached prefix is read from the prefix's end, as a begun one
        if self.prefix_cache is not None:
            for handle in admit:
                blocks = self.prefix_cache.match(handle.request.prompt_ids)
                if (cached := len(blocks) * self.prefix_cache.block_tokens) >= MIN_REUSE_TOKENS:
                    reuse.append((handle, tuple(blocks)))
                    progress[handle] = cached
        prefill = plan_prefill([*prefilling, *admit], progress, self._chunk_budget())
        ready = [chunk for chunk in prefill if chunk.completes_prompt]
        return Plan(drop, tuple(pause), tuple(resume), tuple(admit), tuple(reuse), prefill,
                    decode=bool(running or resume or ready))

    def _chunk_budget(self) -> int:
        if not self._seconds_per_prompt_token:
            return self.prefill_chunk_tokens
        fits = int(self.prefill_step_seconds / self._seconds_per_prompt_token)
        return min(self.prefill_chunk_tokens, max(MIN_CHUNK_TOKENS, fits))

    # The engine thread: execute and apply -----------------------------------------------------------------------

    def _execute(self, plan: Plan) -> None:
        for handle in plan.drop:
            self._end(handle)
            self._prefilling.pop(handle, None)
            self._paused.pop(handle, None)
        self._keep_rows([row for row, handle in enumerate(self._running) if handle not in plan.drop])
        self._pause(plan.pause)
        if plan.resume:
            self._batch = KVCache.join([self._batch, *(self._paused.pop(handle) for handle in plan.resume)])
            self._running += plan.resume
            for handle in plan.resume:
                handle.paused = False
        now = time.perf_counter()
        reuse = dict(plan.reuse)
        for handle in plan.admit:
            for member in handle.group:
                member.admitted = now
            self._prefilling[handle] = self._reuse(handle, list(reuse[handle])) if handle in reuse else None
            self.metrics.queue_time.observe(now - handle.submitted)
            self.metrics.prompt_length.observe(len(handle.request.prompt_ids))
            if self.prefix_cache is not None:
                self.metrics.prefix_cache_queries.inc(len(handle.request.prompt_ids))
                self.metrics.prefix_cache_hits.inc(handle.cached_tokens)
                queried = self.metrics.value("gptserve_prefix_cache_queries_total")
                self.metrics.prefix_cache_hit_ratio.set(
                    self.metrics.value("gptserve_prefix_cache_hits_total") / queried if queried else 0.0)
        if plan.prefill:
            self._prefill(plan.prefill)
            self._flush()  # first tokens go out now, not one decode step later
        if self._running and not (self.speculator and len(self._running) == 1 and self._speculate()):
            self._decode()
        self.metrics.active_sequences.set(self.active_count)
        self._measure_caches()

    def _reuse(self, handle: RequestHandle, blocks: list[Block]) -> KVCache:
        """The cache an admitted prompt starts from: a copy of its cached prefix, with room for the whole sequence."""
        assert self.prefix_cache is not None  # only a plan made with one reuses
        request = handle.request
        cache = self.prefix_cache.cache_of(blocks, len(request.prompt_ids) + request.stopping.max_new_tokens)
        handle.cached_tokens = int(cache.lengths[0])
        return cache

    def _measure_caches(self) -> None:
        caches = [self._batch, *self._paused.values(), *self._prefilling.values()]
        positions = sum(int(cache.lengths.sum()) for cache in caches if cache is not None)
        self.metrics.kv_cache_tokens.set(positions)
        context_length = getattr(self.engine, "context_length", None)
        if context_length:
            self.metrics.kv_cache_usage.set(positions / (self.max_batch_size * context_length))
        if self.prefix_cache is not None:
            self.metrics.prefix_cache_bytes.set(self.prefix_cache.nbytes)
            self.metrics.prefix_cache_tokens.set(self.prefix_cache.tokens)

    def _prefill(self, chunks: tuple[Chunk, ...]) -> None:
        handles = [chunk.handle for chunk in chunks]
        prompts: list[Prompt[int]] = [chunk.handle.request.prompt_ids[chunk.start:chunk.stop] for chunk in chunks]
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        self.metrics.prefill_batch_size.observe(len(prompts))
        started = time.perf_counter()
        try:
            logits, cache = self.engine.prefill(prompts, self._prefilling[handles[0]] if chunks[0].start else None)
            self._seconds_per_prompt_token = (time.perf_counter() - started) / sum(map(len, prompts))
        except Exception:
            log.exception("prefill failed for requests %s", [handle.request.request_id for handle in handles])
            for handle in handles:
                del self._prefilling[handle]
                for member in handle.group:
                    self._end(member, engine_failure(member))
            return
        if not chunks[0].completes_prompt:  # one chunk of a long prompt: no token yet
            if not chunks[0].start:
                request = handles[0].request
                cache.reserve(len(request.prompt_ids) + request.stopping.max_new_tokens)
            self._prefilling[handles[0]] = cache
            return
        for handle in handles:
            del self._prefilling[handle]
        if self.prefix_cache is not None:  # before the decode steps append to the cache in place
            self.prefix_cache.insert([handle.request.prompt_ids for handle in handles], cache)
        # Each prompt's row serves every live sequence of its request: their first tokens come from its logits.
        rows, members = [], []
        for row, handle in enumerate(handles):
            for member in handle.group:
                if member.ended is None:
                    rows.append(row)
                    members.append(member)
        keep = self._take_tokens(members, logits[rows])
        if keep:
            kept_rows = [rows[index] for index in keep]
            self._batch = KVCache.join([self._batch, cache if kept_rows == list(range(len(handles)))
                                        else cache.select(kept_rows)])
            self._running += [members[index] for index in keep]

    def _decode(self) -> None:
        """One step of every running sequence: each feeds its last token."""
        rows = self._running
        token_ids = np.array([handle.sequence.token_ids[-1] for handle in rows], dtype=np.int64)  # (B,)
        self.metrics.batch_size.observe(len(rows))
        assert self._batch is not None  # running rows always have their cache
        try:
            logits = self.engine.decode(self._batch, token_ids)  # (B, V)
        except Exception:
            self._step_failed()
            return
        self._keep_rows(self._take_tokens(rows, logits))

    def _speculate(self) -> bool:
        """A step of the one running stream over the tokens its drafter guesses (service/speculative.py): the
        guesses its own sampling confirms, and the token after them. False when it guesses none."""
        assert self.speculator is not None and self._batch is not None  # a running stream has its cache
        handle = self._running[0]
        sequence = handle.sequence
        limit = sequence.stopping.max_new_tokens - len(sequence.token_ids) - 1  # guesses past the end are waste
        drafts = self.speculator.draft(handle, handle.request.prompt_ids, sequence.token_ids, limit)
        if not drafts:
            return False
        self.metrics.batch_size.observe(1)
        try:
            logits = self.engine.verify(self._batch, [sequence.token_ids[-1], *drafts])  # (1 + guesses, V)
        except Exception:
            self._step_failed()
            return True
        for accepted in range(len(drafts) + 1):
            if not self._take_tokens([handle], logits[accepted:accepted + 1]):
                self._keep_rows([])  # it ended (or failed): its cache goes with it
                break
            if accepted == len(drafts) or sequence.token_ids[-1] != drafts[accepted]:
                self._batch.rewind(len(drafts) - accepted)  # the positions of the rejected guesses
                break
        self.speculator.record(handle, len(drafts), accepted)
        self.metrics.speculative_drafted.inc(len(drafts))
        self.metrics.speculative_accepted.inc(accepted)
        self.metrics.speculative_acceptance.set(self.speculator.accepted / self.speculator.drafted)
        return True

    def _step_failed(self) -> None:
        """A decode or verification step raised: its streams end (the paused and the prefilling go on)."""
        rows = self._running
        log.exception("decode step failed for requests %s", [handle.request.request_id for handle in rows])
        for handle in rows:
            self._end(handle, engine_failure(handle))
        self._running, self._batch = [], None

    def _take_tokens(self, handles: list[RequestHandle], logits: np.ndarray) -> list[int]:
        """Each row's next token from its logits (B, V), sent on; returns the rows still running."""
        keep = []
        for row, handle in enumerate(handles):
            try:
                event = handle.sequence.step(logits[row])
            except ConstraintError as error:  # the request's own constraint gave out: its error, not a bug
                self._end(handle, InvalidRequest("constraint", str(error)))
                continue
            except Exception:
                log.exception("sampling failed for request %s", handle.request.request_id)
                self._end(handle, engine_failure(handle))
                continue
            self._emit(handle, event)
            if handle.sequence.finished:
                self._end(handle)
            else:
                keep.append(row)
        return keep

    def _keep_rows(self, rows: list[int]) -> None:
        if len(rows) == len(self._running):
            return
        self._batch = self._batch.select(rows) if rows and self._batch is not None else None
        self._running = [self._running[row] for row in rows]

    def _pause(self, handles: tuple[RequestHandle, ...]) -> None:
        if not handles:
            return
        rows = [self._running.index(handle) for handle in handles]
        assert self._batch is not None  # the paused are running rows, which have their cache
        for handle, row in zip(handles, rows):
            handle.paused = True
            self._paused[handle] = self._batch.select([row])
            self.metrics.paused_sequences.inc()
        self._keep_rows([row for row in range(len(self._running)) if row not in rows])

    def _emit(self, handle: RequestHandle, event: TokenEvent) -> None:
        now = time.perf_counter()
        if handle.first_token is None:
            handle.first_token = now
            self.metrics.time_to_first_token.observe(now - handle.submitted)
        else:
            assert handle.last_token is not None  # set with first_token
            self.metrics.inter_token_latency.observe(now - handle.last_token)
        handle.last_token = now
        handle.produced += 1
        self.metrics.generated_tokens.inc()
        self._outgoing.setdefault(handle, _Outgoing()).events.append(event)

    def _end(self, handle: RequestHandle, error: Exception | None = None) -> None:
        """The request leaves the server: its slot (or queue place) is free from here on. Once per request."""
        if handle.ended is not None:
            return
        handle.ended = time.perf_counter()
        self._admitted.discard(handle)
        if self.speculator is not None:
            self.speculator.forget(handle)
        sequence = handle.sequence
        reason = sequence.finish_reason.value if sequence.finish_reason else "failed" if error else "cancelled"
        self.metrics.finished.labels(reason).inc()
        self.metrics.generation_length.observe(len(sequence.token_ids))
        outgoing = self._outgoing.setdefault(handle, _Outgoing())
        outgoing.done, outgoing.error = True, error
        with self._condition:
            self._outstanding -= 1

    def _fail(self) -> None:
        """After a bug: every admitted request ends with INTERNAL (none is dropped unended), state resets."""
        for handle in list(self._admitted):
            self._end(handle, engine_failure(handle))
        self._running, self._batch, self._prefilling, self._paused = [], None, {}, {}

    def _flush(self) -> None:
        """Hands this step's tokens to the event loops, one call per loop."""
        outgoing, self._outgoing = self._outgoing, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, _Outgoing]]] = defaultdict(list)
        for handle, pending in outgoing.items():
            if not handle.cancelled:
                by_loop[handle.loop].append((handle, pending))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting for these tokens any more
                pass


def _width(leaders) -> int:
    """Slots the requests of these leaders take: one per sequence."""
    return sum(len(leader.group) for leader in leaders)


def engine_failure(handle: RequestHandle) -> EngineFailure:
    """What the client is told: the request id to quote in a report; the details are in the server log."""
    return EngineFailure(f"engine failure (request {handle.request.request_id}); the details are in the server log")
