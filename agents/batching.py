"""Lockstep scoring across concurrently running agents.

Agents of a population run in threads (``graph.runner.run_population``) and call the scorer as
if alone. ``BatchingScorer`` queues their requests and serves every waiting request with one
``Scorer.score_many`` call, so N agents on the same page step cost about one batched forward
instead of N small ones. Torch releases the GIL inside forwards, and the agents' other nodes
(perception, memory, the recommender) run while a batch is being scored.

Results do not depend on batching beyond float round-off of the padded forwards (see
``tests/test_engine.py``); every sampled choice draws from its own (seed, user, page) generator.
By default a batch waits for every running agent and runs its requests in a fixed order, so
which requests share a padded forward, and with it every bf16 score, is the same run to run
whatever the threads' timing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Request = tuple[str, Sequence[tuple[str, str]]]


def _key(request: Request) -> tuple[str, tuple[tuple[str, str], ...]]:
    prefix, options = request
    return prefix, tuple(tuple(o) for o in options)


@dataclass
class _Ticket:
    requests: list[Request]
    result: list[list[float]] | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class BatchStats:
    """How well the lockstep works: requests per flush is the effective batch size."""

    flushes: int = 0
    requests: int = 0
    timeouts: int = 0  # flushes that did not wait for every active agent


@dataclass
class BatchingScorer:
    """Thread-safe front of a ``Scorer`` that merges concurrent callers' requests.

    A batch is flushed once every registered participant (``participant()``, one per running
    agent) is waiting; its requests run sorted by their text, ``max_requests`` per scorer call.
    Each agent then has exactly one request in every batch it is part of, so batches are
    the same in every run of the same population, and so are the scores: in bf16 a padded
    forward sums in another order than the same row in another batch, and a near-tie read
    the other way changes a trajectory. ``max_wait`` (seconds after the first waiter) also
    flushes without an agent busy elsewhere, which trades that repeatability for less
    waiting. With no participants registered every call is flushed at once: a plain scorer
    behind a lock.
    """

    inner: Any  # agents.scorer.Scorer
    max_wait: float | None = None
    max_requests: int = 256
    batches: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[_Ticket] = []
        self._since: float | None = None
        self._active = 0
        self._busy = False

    @property
    def lm(self) -> Any:
        return self.inner.lm

    @property
    def stats(self) -> Any:
        """The inner scorer's forward and token counters."""
        return self.inner.stats

    def enter(self, n: int = 1) -> None:
        """Count ``n`` more agents that will call in; registering a whole pool before it
        starts keeps the first agents from flushing alone."""
        with self._cond:
            self._active += n

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()  # the waiters may now be everyone left

    @contextlib.contextmanager
    def participant(self) -> Iterator[None]:
        """Count one running agent for the flush rule while the block runs."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def clear(self) -> None:
        with self._cond:
            self.inner.clear()

    def score(self, prefix: str, options: Sequence[tuple[str, str]]) -> list[float]:
        return self.score_many([(prefix, options)])[0]

    def score_many(self, requests: Sequence[Request]) -> list[list[float]]:
        ticket = _Ticket(list(requests))
        if not ticket.requests:
            return []
        with self._cond:
            self._pending.append(ticket)
            if self._since is None:
                self._since = time.monotonic()
            self._cond.notify_all()
            while not ticket.done:
                batch = self._take()
                if batch is None:  # a running batch notifies when done: no polling meanwhile
                    self._cond.wait(None if self._busy else self._wait_left())
                    continue
                self._busy = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if ticket.error is not None:
            raise ticket.error
        assert ticket.result is not None
        return ticket.result

    def _wait_left(self) -> float | None:
        if self.max_wait is None:
            return None
        if self._since is None:
            return self.max_wait
        return max(1e-4, self._since + self.max_wait - time.monotonic())

    def _take(self) -> list[_Ticket] | None:
        """The batch to run now, if the flush rule says so (called with the lock held)."""
        if self._busy or not self._pending:
            return None
        everyone = len(self._pending) >= max(self._active, 1)
        late = (self.max_wait is not None and self._since is not None
                and (time.monotonic() - self._since >= self.max_wait
                     or sum(len(t.requests) for t in self._pending) >= self.max_requests))
        if not (everyone or late):
            return None
        self.batches.timeouts += int(late and not everyone)
        batch, self._pending, self._since = self._pending, [], None
        return batch

    def _run(self, batch: list[_Ticket]) -> None:
        flat = [r for t in batch for r in t.requests]
        self.batches.flushes += 1
        self.batches.requests += len(flat)
        # Arrival order follows thread timing; the text order does not.
        order = sorted(range(len(flat)), key=lambda i: _key(flat[i]))
        scores: list[list[float]] = [[] for _ in flat]
        try:
            for start in range(0, len(order), self.max_requests):
                chunk = order[start:start + self.max_requests]
                for i, s in zip(chunk, self.inner.score_many([flat[i] for i in chunk]),
                                strict=True):
                    scores[i] = s
        except BaseException as exc:  # every caller of the batch sees the failure
            for t in batch:
                t.error, t.done = exc, True
            return
        start = 0
        for t in batch:
            t.result, t.done = scores[start:start + len(t.requests)], True
            start += len(t.requests)

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: str | None = None) -> str:
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            return self.inner.generate(prompt, max_new_tokens, stop)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
