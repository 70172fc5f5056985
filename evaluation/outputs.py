"""What each LLM method answers on the evaluation bundle, computed in one batched pass.

The bundle (``EvalBundle``) holds everything an agent is shown: the 1:m lists, held-out pages,
world-model transitions and the static recommender pages of the simulated sessions, with the
perceiver, personas and histories that render them. ``method_outputs`` turns one method's
weights into its answers; the metrics are computed from those answers alone (``evaluation.run``),
so the model-heavy part can run on any machine: ``python -m evaluation.outputs BUNDLE OUT
--adapter NAME=DIR ...`` (e.g. on a GPU) and ``alignuser evaluate --outputs OUT`` finishes.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel
from tqdm import tqdm

from agents import prompts, text
from agents.browse import browse, list_scores, pages_of
from agents.decide import Calibration, decide_chunked, rating_expectations
from agents.perception import Perceiver
from agents.policy import DEFAULT_TEMPERATURE
from agents.transition import Transition
from agents.world_model import generate_next_states
from simulator.sessions import PageRecord, SessionRecord


class MethodSpec(BaseModel):
    """An LLM method as evaluated: which weights, and which perception nodes are on."""

    label: str
    weights: str  # "base" | "sft" | "wm_policy" | "full"
    evidence: bool = True
    world_model: bool = True


METHODS: dict[str, MethodSpec] = {
    "zero_shot": MethodSpec(label="zero-shot", weights="base", world_model=False),
    "sft": MethodSpec(label="SFT (policy only)", weights="sft", world_model=False),
    "wm_policy": MethodSpec(label="world model + policy", weights="wm_policy"),
    "full": MethodSpec(label="AlignUSER", weights="full"),
    "full_no_memory": MethodSpec(label="AlignUSER w/o memory", weights="full", evidence=False),
    "full_no_wm": MethodSpec(label="AlignUSER w/o world model", weights="full",
                             world_model=False),
}
# What a method answers: 1:m list scores, held-out page actions and ratings, and (full agent
# only) world-model next states and simulated sessions; a run computes the ones its sections read.
OUTPUT_KINDS = ("lists", "pages", "next_state", "sessions")


@dataclass
class EvalBundle:
    perceiver: Perceiver
    personas: Mapping[int, str]
    histories: Mapping[int, Mapping[int, float]]
    lists: dict[int, list[tuple[int, list[int], list[int]]]]  # m -> (user, items, labels)
    pages: list[Transition]  # held-out human pages (next action, ratings)
    transitions: list[Transition]  # held-out transitions (world-model next state)
    sessions: dict[str, list[tuple[int, list[list[int]]]]]  # recommender -> (user, pages)
    meta: dict = field(default_factory=dict)
    list_views: int = 1  # times each list is shown to an agent (``agents.browse.list_scores``)


# One piece of a method's answers, computed and committed whole: ("lists", m) a 1:m ratio,
# ("pages", None) the held-out pages and their ratings, ("next_state", None) the world model's
# next states, ("sessions", recommender) the simulated sessions on one recommender.
Part = tuple[str, Any]
# Most rows of a part per block for a runner that shards blocks over processes: one scorer
# call's worth locally (``browse`` decides 64 sessions a call, ``decide_chunked`` 100 pages),
# so a block holds no more at once than the local run does; the next states stay one block, as
# ``greedy_many`` orders all of its prompts by length before it batches them.
BLOCK_ROWS = {"lists": 64, "pages": 100, "sessions": 64}


def part_rows(bundle: EvalBundle, part: Part) -> Sequence:
    kind, key = part
    return {"lists": lambda: bundle.lists[key], "pages": lambda: bundle.pages,
            "next_state": lambda: bundle.transitions, "sessions": lambda: bundle.sessions[key]
            }[kind]()


def shown_pages(part: Part, rows: Sequence, list_views: int = 1) -> int:
    """Pages a part's rows show (the progress bar's unit; a generated next state shows none)."""
    kind = part[0]
    if kind == "lists":
        return list_views * sum(len(pages_of(items)) for _, items, _ in rows)
    if kind == "sessions":
        return sum(len(pages) for _, pages in rows)
    return len(rows) if kind == "pages" else 0


def answer_rows(spec: MethodSpec, scorer, cal: Calibration, bundle: EvalBundle, part: Part,
                rows: Sequence, *, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> Any:
    """A method's answers on some rows of one part (all of them, or one block)."""
    kind, key = part
    if kind == "lists":
        offset = cal.list_offset if cal.list_offset is not None else cal.watch_offset
        return [s.tolist() for s in list_scores(
            scorer, bundle.perceiver, bundle.personas, bundle.histories,
            [(u, items) for u, items, _ in rows], world_model=spec.world_model,
            evidence=spec.evidence, offset=offset, calibration=cal, views=bundle.list_views,
            progress=progress)]
    if kind == "pages":
        return _page_answers(spec, scorer, cal, rows, progress)
    if kind == "next_state":
        return generate_next_states(
            lambda ps, n, stop: scorer.generate_many(ps, max_new_tokens=n, stop=stop),
            [tr.prefix + prompts.world_model_tail(text.render_wm_action(
                len(tr.items), sorted(tr.ratings), tr.then)) for tr in rows],
            [tr.ends for tr in rows], cal.wm_format)
    runs = browse(scorer, bundle.perceiver, bundle.personas, bundle.histories, rows,
                  world_model=spec.world_model, evidence=spec.evidence, calibration=cal,
                  exits=True, temperature=temperature, seed=seed, progress=progress)
    return [session_record(u, key, run) for (u, _), run in zip(rows, runs, strict=True)]


def join_blocks(part: Part, blocks: Sequence[Any]) -> Any:
    """The answers of a part's consecutive blocks as one part's answers."""
    if part[0] == "pages":
        return {k: [x for b in blocks for x in b[k]] for k in ("pages", "ratings")}
    return [x for b in blocks for x in b]


class PartRunner(Protocol):
    """Answers parts of one method's work, yielding each part as it is finished."""

    def tokens(self) -> int | None: ...

    def run(self, parts: Sequence[Part], progress: Callable[[int], None]
            ) -> Iterator[tuple[Part, Any]]: ...


@dataclass
class LocalParts:
    """Every part in this process, one after another, on one scorer."""

    spec: MethodSpec
    scorer: Any
    cal: Calibration
    bundle: EvalBundle
    temperature: float = DEFAULT_TEMPERATURE
    seed: int = 0

    def __post_init__(self) -> None:
        # the scorer is shared by the methods on the same weights: count this method's tokens
        self._before = self._scored() or 0

    def _scored(self) -> int | None:
        return getattr(getattr(self.scorer, "stats", None), "tokens", None)

    def tokens(self) -> int | None:
        now = self._scored()
        return None if now is None else now - self._before

    def run(self, parts: Sequence[Part], progress: Callable[[int], None]
            ) -> Iterator[tuple[Part, Any]]:
        for part in parts:
            yield part, answer_rows(self.spec, self.scorer, self.cal, self.bundle, part,
                                    part_rows(self.bundle, part), temperature=self.temperature,
                                    seed=self.seed, progress=progress)


def parts_to_answer(spec: MethodSpec, bundle: EvalBundle, out: Mapping[str, Any], full: bool,
                    needs: Collection[str]) -> list[Part]:
    """The parts ``needs`` asks of this method that ``out`` does not hold yet, in order."""
    parts: list[Part] = []
    if "lists" in needs:
        parts += [("lists", m) for m in bundle.lists if m not in out["lists"]]
    if "pages" in needs and "pages" not in out:
        parts.append(("pages", None))
    if full and spec.world_model and "next_state" in needs and "next_state" not in out:
        parts.append(("next_state", None))
    if full and "sessions" in needs:
        parts += [("sessions", rec) for rec in bundle.sessions
                  if rec not in out.get("sessions", {})]
    return parts


def method_outputs(spec: MethodSpec, scorer, cal: Calibration, bundle: EvalBundle,
                   full: bool = False, needs: Collection[str] = OUTPUT_KINDS,
                   progress: bool = False, kept: Mapping[str, Any] | None = None,
                   commit: Callable[[dict[str, Any]], None] | None = None,
                   temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
                   runner: PartRunner | None = None) -> dict[str, Any]:
    """Lists' watch scores, held-out page actions and ratings; for the simulating agent
    (``full``) also the simulated sessions and, when it has a world model, its next states;
    only the kinds in ``needs``. Lists and page replays are greedy; sessions browse as
    ``simulate`` does, sampling at ``temperature`` (seeded by ``seed``, user and page).

    Each part (a list ratio, the held-out pages, the next states, one recommender's sessions)
    is handed to ``commit`` (the answers so far) as soon as it is done, and what ``kept`` (such
    answers from an interrupted run) already holds is not computed again: an hours-long method
    loses at most one part to a kill. A kind kept empty (answers of a run that did not ask for
    it) is computed. ``runner`` answers the parts (default: here, on ``scorer``;
    ``evaluation.distributed`` shards them over Ray actors)."""
    t0 = time.perf_counter()
    kept = {k: v for k, v in (kept or {}).items() if k not in OUTPUT_KINDS or v}
    out: dict[str, Any] = {"lists": dict(kept.get("lists", {})), "calibration": cal.model_dump(),
                           **{k: kept[k] for k in ("pages", "ratings", "next_state")
                              if k in kept}}
    if "sessions" in kept:
        out["sessions"] = dict(kept["sessions"])
    runner = runner or LocalParts(spec, scorer, cal, bundle, temperature, seed)

    def spent() -> dict[str, Any]:
        """Seconds and scored tokens of this method so far, those of kept parts included."""
        tokens = runner.tokens()
        return {"seconds": round(kept.get("seconds", 0.0) + time.perf_counter() - t0, 1),
                "tokens": None if tokens is None else kept.get("tokens", 0) + tokens}

    todo = parts_to_answer(spec, bundle, out, full, needs)
    # session pages count as shown; a session that exits early leaves the bar short of its total
    bar = tqdm(total=sum(shown_pages(p, part_rows(bundle, p), bundle.list_views) for p in todo),
               desc=spec.label, unit="page", disable=not progress)
    for (kind, key), value in runner.run(todo, bar.update):
        if kind == "lists":
            out["lists"][key] = value
        elif kind == "pages":
            out |= value
        elif kind == "next_state":
            out["next_state"] = value
        else:
            out["sessions"] = {**out.get("sessions", {}), key: value}
        if commit is not None:
            commit({**out, "lists": dict(out["lists"]), **spent()})
    bar.close()
    out.setdefault("pages", [])  # not asked for
    out.setdefault("ratings", [])
    if "sessions" in out:  # in the bundle's order, whatever order the parts finished in
        out["sessions"] = {rec: out["sessions"][rec] for rec in bundle.sessions
                           if rec in out["sessions"]}
    return out | spent()


def _page_answers(spec: MethodSpec, scorer, cal: Calibration, pages: Sequence[Transition],
                  progress: Callable[[int], None] | None) -> dict[str, list]:
    """The agent's action on each held-out human page, and its expected rating of each item
    the human watched there (given the human's action)."""
    inputs = [tr.decision_input(spec.evidence) for tr in pages]
    decisions = decide_chunked(scorer, inputs, world_model=spec.world_model,
                               calibration=cal, progress=progress)
    inputs = [i.model_copy(update={"predictions": d.predictions})
              for i, d in zip(inputs, decisions, strict=True)]
    human = [tr.human_action() for tr in pages]
    return {"pages": [{"watched": sorted(tr.items.index(i) + 1 for i in d.action.watched),
                       "then": d.action.then, "watch_scores": d.watch_scores}
                      for tr, d in zip(pages, decisions, strict=True)],
            "ratings": rating_expectations(scorer, inputs, human, calibration=cal)
                       if inputs else []}


def session_record(user: int, recommender: str, decisions: Sequence) -> dict[str, Any]:
    """A simulated session in the shape of ``evaluation.macro.human_sessions``."""
    pages = [PageRecord(page=p, items=[], then=d.action.then, watched=d.action.watched)
             for p, d in enumerate(decisions, 1)]
    ends = bool(decisions) and decisions[-1].action.then == "exit"
    return SessionRecord(user=user, recommender=recommender, pages=pages,
                         end="exit" if ends else "max_pages").json_form(full=False)


def all_outputs(bundle: EvalBundle, methods: Sequence[str], adapters: Mapping[str, str | None],
                model: str = "default", device: str = "auto", log=print, *,
                needs: Collection[str] = OUTPUT_KINDS, done: Mapping[str, Any] | None = None,
                commit: Callable[[str, dict[str, Any]], None] | None = None,
                partial: Mapping[str, Mapping[str, Any]] | None = None,
                commit_part: Callable[[str, dict[str, Any]], None] | None = None,
                simulator: str = "full", temperature: float = DEFAULT_TEMPERATURE,
                seed: int = 0,
                runners: Callable[[str, str | None, float, int], PartRunner] | None = None
                ) -> dict[str, Any]:
    """Every method's outputs; one model load per set of weights. Methods in ``done`` (from
    an interrupted run) are kept as they are, and the parts in ``partial`` of a method that was
    cut short; each method computed is handed to ``commit`` as soon as it is finished, and each
    of its parts to ``commit_part``. ``runners`` (method, adapter, temperature, seed) answers
    each method elsewhere (``evaluation.distributed.ray_runners``); nothing loads here then."""
    from agents.llm import load_lm
    from agents.scorer import Scorer

    out: dict[str, Any] = {}
    scorers: dict[str, Any] = {}
    for name in methods:
        spec = METHODS[name]
        if done is not None and name in done:
            out[name] = done[name]
            log(f"{spec.label}: answers kept from the interrupted run")
            continue
        path = None if spec.weights == "base" else adapters.get(spec.weights)
        runner = None if runners is None else runners(name, path, temperature, seed)
        if runner is None and spec.weights not in scorers:
            # Many entries (each user's persona is reused across pages and lists), but the
            # scorer's byte budget bounds them (a 200-user run held 24 GB before it had one).
            scorers[spec.weights] = Scorer(load_lm(model, adapter=path, device=device),
                                           cache_size=2048)
        scorer = scorers.get(spec.weights)
        kept = (partial or {}).get(name)
        log(f"{spec.label}: scoring" + (" (its finished parts kept)" if kept else ""))
        out[name] = method_outputs(
            spec, scorer, Calibration.of_checkpoint(path), bundle, full=name == simulator,
            needs=needs, progress=True, kept=kept,
            commit=None if commit_part is None else functools.partial(commit_part, name),
            temperature=temperature, seed=seed, runner=runner)
        if scorer is not None:
            scorer.clear()
        if commit is not None:
            commit(name, out[name])
        log(f"{spec.label}: {out[name]['seconds']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle")
    ap.add_argument("output")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--adapter", action="append", default=[], help="NAME=DIR (sft, wm_policy, "
                    "full)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                    help="sampling temperature of the simulated sessions (evaluate's)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampled sessions (evaluate's)")
    args = ap.parse_args(argv)
    if not 0 <= args.temperature < float("inf"):
        ap.error(f"--temperature {args.temperature}: a finite number >= 0")
    from simulator.runs import read_pickle

    adapters = dict(a.split("=", 1) for a in args.adapter)
    bundle = read_pickle(args.bundle)
    methods = [m for m in args.methods.split(",") if m]
    out = all_outputs(bundle, methods, adapters, device=args.device,
                      temperature=args.temperature, seed=args.seed)
    Path(args.output).write_bytes(pickle.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
