"""`alignuser evaluate --backend ray`: the methods' answers sharded over Ray actors.

Each actor holds one copy of the bundle (put in Ray's object store once) and one model replica,
with the weights of the method it is answering: loaded on first use, replaced when a method
needs other weights, its prefix cache emptied between methods as the local run empties it. The
driver cuts every part of a method (a list ratio, the held-out pages, one recommender's
sessions, ...) into blocks of about one size, at most a local scorer call's worth
(``BLOCK_ROWS``) and at least one per actor, hands them to the actors as they free up, and
joins a part's blocks in order once all are back, so parts are committed, and a killed run
resumed, as in a local run. A block is batched with fewer pages than the local run batches, and
an actor's prefix cache holds other prompts than the local scorer's, so in bf16 scores differ
from a local run's by round-off (in fp32 the test finds the same answers).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agents.decide import Calibration
from evaluation.outputs import (
    BLOCK_ROWS,
    METHODS,
    EvalBundle,
    Part,
    PartRunner,
    answer_rows,
    join_blocks,
    part_rows,
    shown_pages,
)
from simulator.cluster import plan_actors, ray_cluster, use_threads

Block = tuple[Part, int, int]  # a part and its rows [start, stop)


class OutputsWorker:
    """One actor: the bundle and one model replica; one block of a part per call."""

    def __init__(self, bundle: EvalBundle, model: str, device: str, threads: int) -> None:
        use_threads(threads)
        self.bundle, self.model, self.device = bundle, model, device
        self.loaded: tuple[str, str | None] | None = None
        self.method: str | None = None
        self.scorer: Any = None
        self.cal = Calibration()

    def _scorer(self, method: str, adapter: str | None) -> Any:
        from agents.llm import load_lm
        from agents.scorer import Scorer

        weights = (METHODS[method].weights, adapter)
        if self.loaded != weights:
            self.scorer, self.loaded = None, None
            gc.collect()
            self.scorer = Scorer(load_lm(self.model, adapter=adapter, device=self.device),
                                 cache_size=2048)
            self.cal, self.loaded = Calibration.of_checkpoint(adapter), weights
        elif self.method != method:
            self.scorer.clear()  # as the local run does between methods
        self.method = method
        return self.scorer

    def answer(self, method: str, adapter: str | None, block: Block, temperature: float,
               seed: int) -> tuple[Block, Any, int | None]:
        """The block's answers and the tokens its model scored."""
        scorer = self._scorer(method, adapter)
        before = scorer.stats.tokens
        part, start, stop = block
        value = answer_rows(METHODS[method], scorer, self.cal, self.bundle, part,
                            part_rows(self.bundle, part)[start:stop], temperature=temperature,
                            seed=seed)
        return block, value, scorer.stats.tokens - before


def blocks_of(bundle: EvalBundle, parts: Sequence[Part], rows: dict[str, int] | None = None,
              spread: int = 1) -> list[Block]:
    """Every part cut into consecutive blocks of at most ``rows[kind]`` rows (default
    ``BLOCK_ROWS``; a kind it does not name is one block), and into at least ``spread`` blocks
    where it has the rows, all of about one size; a part without rows is one empty block."""
    sizes = BLOCK_ROWS if rows is None else rows
    out: list[Block] = []
    for part in parts:
        n = len(part_rows(bundle, part))
        cap = sizes.get(part[0])
        count = 1 if not cap else max(math.ceil(n / cap), min(spread, n), 1)
        size = max(math.ceil(n / count), 1)
        out += [(part, start, min(start + size, n)) for start in range(0, max(n, 1), size)]
    return out


@dataclass
class RayParts:
    """A ``PartRunner`` for one method on the actors of ``ray_runners``."""

    ray: Any
    actors: list[Any]
    method: str
    adapter: str | None
    bundle: EvalBundle
    temperature: float
    seed: int
    rows: dict[str, int] | None = None
    scored: int | None = field(default=0, init=False)

    def tokens(self) -> int | None:
        return self.scored

    def run(self, parts: Sequence[Part], progress: Callable[[int], None]
            ) -> Iterator[tuple[Part, Any]]:
        from ray.util import ActorPool

        blocks = blocks_of(self.bundle, parts, self.rows, spread=len(self.actors))
        waiting = {part: sum(b[0] == part for b in blocks) for part in parts}
        done: dict[Part, dict[int, Any]] = {part: {} for part in parts}
        pool = ActorPool(self.actors)
        for (part, start, stop), value, tokens in pool.map_unordered(
                lambda actor, block: actor.answer.remote(self.method, self.adapter, block,
                                                         self.temperature, self.seed), blocks):
            self.scored = None if tokens is None or self.scored is None else self.scored + tokens
            progress(shown_pages(part, part_rows(self.bundle, part)[start:stop],
                                  self.bundle.list_views))
            done[part][start] = value
            if len(done[part]) == waiting[part]:
                yield part, join_blocks(part, [done[part][s] for s in sorted(done[part])])


@contextmanager
def ray_runners(bundle: EvalBundle, model: str, device: str, address: str | None,
                concurrency: int | None, rows: dict[str, int] | None = None
                ) -> Iterator[Callable[[str, str | None, float, int], PartRunner]]:
    """Actors for a run (``simulator.cluster.plan_actors``: ``concurrency``, by default one
    per free GPU where the model runs on CUDA, else one per free CPU), and a factory of each
    method's runner on them."""
    with ray_cluster(address) as ray:
        jobs = sum(len(part_rows(bundle, ("lists", m))) for m in bundle.lists) or 1
        plan = plan_actors(ray, concurrency, jobs, device)
        worker = ray.remote(num_cpus=plan.cpus, num_gpus=plan.gpus)(OutputsWorker)
        shared = ray.put(bundle)
        actors = [worker.remote(shared, model, "cuda" if plan.gpus else "cpu", plan.cpus)
                  for _ in range(plan.actors)]
        try:
            yield lambda method, adapter, temperature, seed: RayParts(
                ray, actors, method, adapter, bundle, temperature, seed, rows)
        finally:
            for actor in actors:
                ray.kill(actor)
