"""Continuous batching: one engine thread steps every active sequence together, newcomers join at step boundaries.

Each iteration of the engine thread: drop cancelled sequences, prefill the newcomers (together, each prompt
followed by padding), one decode step for every running sequence, drop the finished ones. Rows are ragged (see
service/batch_cache.py): each attends to its own tokens only, so a sequence's tokens are the same alone or in any
batch.

The asyncio side submits checked requests and reads their tokens; the engine thread owns the batch. They meet in
three places only: the waiting queue (under a lock), each request's cancel flag, and `call_soon_threadsafe`
deliveries of tokens back to the event loop.

Slow readers: a request whose client has not yet taken `max_unread_tokens` of its tokens is paused -- its KV
rows leave the batch and wait aside, still holding its slot -- and rejoins once the client catches up. So a client
that stops reading costs no compute and at most that many tokens of memory, and never slows the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from gptserve.model.generation import Sequence, TokenEvent
from gptserve.service.api import GenerationRequest, Timings
from gptserve.export.contract import ragged_mask
from gptserve.service.batch_cache import BatchCache
from gptserve.service.errors import EngineFailure, NotServing, QueueFull
from gptserve.service.metrics import Metrics

log = logging.getLogger("gptserve.scheduler")


class RequestHandle:
    """One request as both sides see it. The engine thread writes the sequence, counters and timestamps; the
    event loop reads tokens through `updates()` and may `cancel()`."""

    def __init__(self, request: GenerationRequest, sequence: Sequence, scheduler: "Scheduler",
                 loop: asyncio.AbstractEventLoop) -> None:
        self.request, self.sequence, self.loop = request, sequence, loop
        self._scheduler = scheduler
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.ended: float | None = None
        self.produced = 0  # tokens the engine thread made
        self.consumed = 0  # tokens the event loop took
        self.paused = False
        self.cancelled = False
        self.done = False
        self.error: Exception | None = None
        self._events: list[TokenEvent] = []
        self._wakeup = asyncio.Event()

    @property
    def unread(self) -> int:
        return self.produced - self.consumed

    async def updates(self) -> AsyncIterator[tuple[list[TokenEvent], bool]]:
        """(tokens since the last update, whether the request has ended). Raises the request's failure."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Taken together: more tokens (and the end) may arrive while the caller holds this update.
            events, self._events, done = self._events, [], self.done
            self.consumed += len(events)
            if self.paused:
                self._scheduler.wake()
            if self.error is not None:
                raise self.error
            if events or done:
                yield events, done
            if done:
                return

    def cancel(self) -> None:
        """The client is gone: stop generating at the next step boundary. A no-op once the request has ended."""
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._scheduler.withdraw(self)

    def timings(self) -> Timings:
        end = self.ended or time.perf_counter()
        since = lambda moment: (moment - self.submitted) if moment is not None else 0.0
        return Timings(queue=since(self.admitted), time_to_first_token=since(self.first_token),
                       total=end - self.submitted)

    def _receive(self, events: list[TokenEvent], done: bool, error: Exception | None) -> None:
        """On the event loop: what the engine thread produced for this request since the last delivery."""
        self._events.extend(events)
        self.done = self.done or done or error is not None
        self.error = self.error or error
        self._wakeup.set()


@dataclass
class _Outgoing:
    events: list[TokenEvent] = field(default_factory=list)
    done: bool = False
    error: Exception | None = None


def _deliver(items: list[tuple[RequestHandle, _Outgoing]]) -> None:
    for handle, outgoing in items:
        handle._receive(outgoing.events, outgoing.done, outgoing.error)


# Padded prompt tokens in one prefill pass: bounds the padding wasted on prompts of unequal length and the
# logits the pass returns (B x V floats per position reaching back to the shortest prompt's end).
PREFILL_TOKEN_BUDGET = 512


def prefill_groups(handles: list[RequestHandle], token_budget: int) -> list[list[RequestHandle]]:
    """Newcomers grouped by prompt length, each group within the budget (a longer prompt goes alone)."""
    groups: list[list[RequestHandle]] = []
    for handle in sorted(handles, key=lambda handle: len(handle.request.prompt_ids)):
        length = len(handle.request.prompt_ids)
        if groups and (len(groups[-1]) + 1) * length <= token_budget:
            groups[-1].append(handle)
        else:
            groups.append([handle])
    return groups


class Scheduler:
    def __init__(self, engine, metrics: Metrics, max_batch_size: int = 8, max_queue: int = 64,
                 max_unread_tokens: int = 256, prefill_token_budget: int = PREFILL_TOKEN_BUDGET) -> None:
        if max_batch_size < 1 or max_queue < 0 or max_unread_tokens < 1:
            raise ValueError("max_batch_size and max_unread_tokens must be at least 1, max_queue at least 0")
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_queue, self.max_unread_tokens = max_batch_size, max_queue, max_unread_tokens
        self._condition = threading.Condition()
        # Under the condition's lock: the queue, and how many requests are in the server (waiting or in a slot).
        self._waiting: deque[RequestHandle] = deque()
        self._outstanding = 0
        self._accepting = True
        self._stopping = False
        # The engine thread's own: the running rows (in the batch cache's row order), and paused ones.
        self._rows: list[RequestHandle] = []
        self._batch: BatchCache | None = None
        self._paused: dict[RequestHandle, BatchCache] = {}
        self._outgoing: dict[RequestHandle, _Outgoing] = {}
        self._thread: threading.Thread | None = None
        self.prefill_token_budget = prefill_token_budget

    # The event loop's side -------------------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._rows) + len(self._paused)

    @property
    def queued_count(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptserve-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a checked request; refused at once when max_batch_size + max_queue requests are in already."""
        sequence = Sequence(self.engine.tokenizer, list(request.prompt_ids), request.sampling, request.stopping)
        handle = RequestHandle(request, sequence, self, asyncio.get_running_loop())
        with self._condition:
            if not self._accepting:
                raise NotServing("the server is shutting down; retry on another replica")
            if self._outstanding >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"the server is full: {self.max_batch_size} requests running and {self.max_queue} "
                                "waiting (--max-batch-size, --max-queue); retry later")
            self._outstanding += 1
            self._waiting.append(handle)
            self.metrics.queue_depth.set(len(self._waiting))
            self._condition.notify()
        return handle

    def withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request leaves the queue at once; a running one at the engine's next step boundary."""
        with self._condition:
            if handle in self._waiting:
                self._waiting.remove(handle)
                self._outstanding -= 1
                handle.ended = time.perf_counter()
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

    # The engine thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while (newcomers := self._next_newcomers()) is not None:
            try:
                self._iterate(newcomers)
            except Exception as error:  # a bug here must not end the loop: fail what was running, go on
                log.exception("scheduler step failed; failing the %d requests in it", self.active_count)
                self._fail_everything([*newcomers, *self._rows, *self._paused], EngineFailure(f"scheduler: {error}"))
            self._flush()
        self._fail_everything([*self._rows, *self._paused, *self._take_waiting()],
                              NotServing("the server shut down before this request finished"))
        self._flush()

    def _next_newcomers(self) -> list[RequestHandle] | None:
        """Blocks until there is work; the requests to admit now (None when stopping)."""
        with self._condition:
            while not self._stopping and not self._has_work():
                self._condition.wait()
            if self._stopping:
                return None
            newcomers = []
            while self._waiting and self.active_count + len(newcomers) < self.max_batch_size:
                newcomers.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
            return newcomers

    def _has_work(self) -> bool:
        return bool(self._rows or (self._waiting and self.active_count < self.max_batch_size)
                    or any(handle.cancelled or handle.unread < self.max_unread_tokens for handle in self._paused))

    def _take_waiting(self) -> list[RequestHandle]:
        with self._condition:
            waiting, self._waiting = list(self._waiting), deque()
            return waiting

    def _iterate(self, newcomers: list[RequestHandle]) -> None:
        self._drop_cancelled()
        self._resume_readers()
        for group in prefill_groups(newcomers, self.prefill_token_budget):
            self._prefill(group)
        if newcomers:
            self._flush()  # first tokens go out now, not one decode step later
        if self._rows:
            self._decode()
        self._pause_slow_readers()
        self.metrics.active_sequences.set(self.active_count)

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Newcomers' prompts in one forward pass (padded after their ends), each one's first token; then they
        join the batch for the next decode step. One pass reads the weights once for all of them."""
        now = time.perf_counter()
        for handle in handles:
            handle.admitted = now
        for handle in [handle for handle in handles if handle.cancelled]:
            self._end(handle)
        handles = [handle for handle in handles if not handle.cancelled]
        if not handles:
            return
        prompts = [handle.request.prompt_ids for handle in handles]
        lengths = np.array([len(prompt) for prompt in prompts])
        attention_mask = ragged_mask(lengths)  # (B, T)
        input_ids = np.zeros(attention_mask.shape, dtype=np.int64)  # (B, T); padding ids are masked out
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = prompt
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        self.metrics.prefill_batch_size.observe(len(prompts))
        try:
            logits, present = self.engine.step(input_ids, attention_mask, None)  # (B, V): each prompt's last
        except Exception as error:
            log.exception("prefill failed for requests %s", [handle.request.request_id for handle in handles])
            for handle in handles:
                self._end(handle, EngineFailure(f"the engine failed on this request's prompt: {error}"))
            return
        cache = BatchCache(present, lengths)
        keep = self._take_tokens(handles, logits)
        if keep:
            self._batch = BatchCache.join([self._batch, cache if len(keep) == len(handles) else cache.select(keep)])
            self._rows += [handles[row] for row in keep]

    def _decode(self) -> None:
        """One step of every running sequence: each feeds its last token."""
        rows, batch = self._rows, self._batch
        input_ids = np.array([[handle.sequence.token_ids[-1]] for handle in rows], dtype=np.int64)  # (B, 1)
        self.metrics.batch_size.observe(len(rows))
        try:
            logits, present = self.engine.step(input_ids, batch.decode_mask(), batch.past)  # (B, V)
        except Exception as error:
            log.exception("decode step failed with %d sequences in the batch", len(rows))
            self._fail_everything(list(rows), EngineFailure(f"the engine failed during a decode step: {error}"))
            return
        batch.extend(present)
        keep = self._take_tokens(rows, logits)
        self._keep_rows(keep)

    def _take_tokens(self, handles: list, logits: np.ndarray) -> list[int]:
        """Each row's next token from its logits (B, V), sent on; returns the rows still running."""
        keep = []
        for row, handle in enumerate(handles):
            try:
                event = handle.sequence.step(logits[row])
            except Exception as error:
                log.exception("sampling failed for request %s", handle.request.request_id)
                self._end(handle, EngineFailure(f"choosing the next token failed: {error}"))
                continue
            self._emit(handle, event)
            if handle.sequence.finished:
                self._end(handle)
            else:
                keep.append(row)
        return keep

    def _keep_rows(self, rows: list[int]) -> None:
        if len(rows) == len(self._rows):
            return
        self._batch = self._batch.select(rows) if rows else None
        self._rows = [self._rows[row] for row in rows]

    def _drop_cancelled(self) -> None:
        for handle in [handle for handle in self._paused if handle.cancelled]:
            del self._paused[handle]
            self._end(handle)
        if any(handle.cancelled for handle in self._rows):
            keep = [row for row, handle in enumerate(self._rows) if not handle.cancelled]
            for handle in self._rows:
                if handle.cancelled:
                    self._end(handle)
            self._keep_rows(keep)

    def _pause_slow_readers(self) -> None:
        slow = [row for row, handle in enumerate(self._rows) if handle.unread >= self.max_unread_tokens]
        if not slow:
            return
        for row in slow:
            handle = self._rows[row]
            handle.paused = True
            self._paused[handle] = self._batch.select([row])
            self.metrics.paused_sequences.inc()
        self._keep_rows([row for row in range(len(self._rows)) if row not in slow])

    def _resume_readers(self) -> None:
        ready = [handle for handle in self._paused if handle.unread < self.max_unread_tokens]
        if not ready:
            return
        self._batch = BatchCache.join([self._batch, *(self._paused.pop(handle) for handle in ready)])
        for handle in ready:
            handle.paused = False
            self._rows.append(handle)

    def _emit(self, handle: RequestHandle, event: TokenEvent) -> None:
        now = time.perf_counter()
        if handle.first_token is None:
            handle.first_token = now
            self.metrics.time_to_first_token.observe(now - handle.submitted)
        else:
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
        outgoing = self._outgoing.setdefault(handle, _Outgoing())
        outgoing.done, outgoing.error = True, error
        with self._condition:
            self._outstanding -= 1

    def _fail_everything(self, handles: list[RequestHandle], error: Exception) -> None:
        for handle in handles:
            self._end(handle, error)  # a no-op for those that had already ended
        self._rows, self._batch, self._paused = [], None, {}

    def _flush(self) -> None:
        """Hands this step's tokens to the event loops, one call per loop."""
        outgoing, self._outgoing = self._outgoing, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for handle, items in outgoing.items():
            if not handle.cancelled:
                by_loop[handle.loop].append((handle, items))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is waiting for these tokens any more
                pass
