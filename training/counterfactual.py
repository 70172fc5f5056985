"""Stage 2 data: for each human step, K alternatives, their predicted outcomes, a reflection.

Alternatives are sampled from the current policy (the stage-1 model scoring the action space),
never equal to the human's action or to each other; when the policy keeps proposing the human
action, single-line perturbations (flip one slot, flip next/exit) fill the remaining places.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from agents import prompts
from agents.policy import Decision, LLMPolicy, OptionScorer
from agents.transition import Example, Transition
from agents.world_model import Generator, expected_ratings_many, predict_next_state, wm_cues
from training.teacher import Option, Teacher

Key = tuple[tuple[int, ...], str]


def _perturbations(human: Key, n_slots: int) -> list[Key]:
    watched, then = human
    out = [(watched, "exit" if then == "next" else "next")]
    for s in range(1, n_slots + 1):
        flipped = tuple(sorted(set(watched) ^ {s}))
        out.append((flipped, then))
    return out


def sample_alternatives(policy: LLMPolicy, tr: Transition, k: int, seed: int,
                        tries: int = 4) -> list[Key]:
    """K distinct actions from the policy that differ from the human's (watched slots, then).

    One pass of the (greedy) policy gives each slot's watch log-odds and P(next)/P(exit);
    alternatives are drawn from those per-line distributions (a product approximation of the
    policy's joint, costing one decision instead of one per draw)."""
    return _alternatives(policy.decide(tr.decision_input(seed=seed)), tr, k, seed, tries)


def _alternatives(d: Decision, tr: Transition, k: int, seed: int, tries: int = 4) -> list[Key]:
    """``sample_alternatives`` from a decision already made on ``tr``'s page."""
    human: Key = (tuple(sorted(tr.ratings)), tr.then)
    p_watch = 1 / (1 + np.exp(-np.asarray([d.watch_scores.get(s, 0.0)
                                           for s in range(1, len(tr.items) + 1)])))
    p_next = d.then_probs[0] if d.then_probs else 0.5
    rng = np.random.default_rng([seed, tr.user, tr.page])
    found: list[Key] = []
    for _ in range(tries * k):
        if len(found) == k:
            break
        slots = tuple(int(s) + 1 for s in np.flatnonzero(rng.random(len(p_watch)) < p_watch))
        key = (slots, "next" if rng.random() < p_next else "exit")
        if key != human and key not in found:
            found.append(key)
    for key in _perturbations(human, len(tr.items)):
        if len(found) == k:
            break
        if key not in found:
            found.append(key)
    return found


def _option(key: Key, tr: Transition, expected: Mapping[int, float],
            generator: Generator | None, page_format: str = "titles") -> Option:
    """An action with the world model's predictions: expected ratings, optionally next page."""
    ns = None
    if generator is not None:
        ns = predict_next_state(generator, tr.prefix, len(tr.items), key[0], key[1],
                                last=tr.at_limit, page_format=page_format)
    return Option(watched=key[0], then=key[1], expected={s: expected[s] for s in key[0]},
                  next_state=ns)


def build_counterfactual(trs: Sequence[Transition], scorer: OptionScorer, teacher: Teacher,
                         liked: Mapping[int, Sequence[str]], k: int = 3, seed: int = 0,
                         generator: Generator | None = None, progress: bool = True,
                         chunk: int = 32, page_format: str = "titles", rating_cue: bool = False
                         ) -> Iterable[tuple[Example, str]]:
    """Yield (cr example, reflection) per transition (``page_format``: the world model's, in
    which a ``generator`` writes each option's next page; ``rating_cue``: the world model rates
    after each slot's rating cue, as it was trained).

    ``chunk`` transitions at a time share batched forwards for their expected ratings and
    their policy decisions (one transition per call ran 2.4 transitions/s on an H200)."""
    policy = LLMPolicy(scorer, name="current", temperature=0.0)
    with tqdm(total=len(trs), desc="counterfactuals", unit="step", disable=not progress) as bar:
        for start in range(0, len(trs), chunk):
            part = trs[start:start + chunk]
            expects = expected_ratings_many(
                scorer, [(tr.prefix, len(tr.items)) for tr in part],
                cues=wm_cues(part, rating_cue))
            decisions = policy.decide_many([tr.decision_input(seed=seed) for tr in part])
            for tr, expected, d in zip(part, expects, decisions, strict=True):
                human = _option((tuple(sorted(tr.ratings)), tr.then), tr, expected, generator,
                                page_format)
                alts = [_option(key, tr, expected, generator, page_format)
                        for key in _alternatives(d, tr, k, seed)]
                reflection = teacher.reflect(tr.views, liked.get(tr.user, ()), human, alts,
                                             tr.persona)
                bar.update()
                yield tr.cr_example(reflection, expected), reflection


def reflection_record(tr: Transition, reflection: str) -> dict:
    """What a person inspecting the reflections wants to see beside each one."""
    return {"user": tr.user, "page": tr.page, "human": {"watched": dict(tr.ratings),
                                                         "then": tr.then},
            "prompt_tail": prompts.THINK, "reflection": reflection}
