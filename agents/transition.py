"""A human step rendered as the agent sees it: (state, action, next state) as prompt text.

Every example is built with the same renderers the agent uses (``agents.text``/``agents.prompts``)
so a checkpoint is trained on exactly the text it is scored on, and evaluation replays held-out
pages through the same ``Transition``. Personal evidence for a page is taken from what the person
rated *before that session* plus what they watched earlier in it: evidence from later ratings
would be a shortcut that does not exist when the agent runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agents import prompts, text
from agents.policy import DecisionInput
from agents.text import ItemView
from agents.world import World
from simulator.env import MAX_PAGES, PageAction
from simulator.trajectories import Step, Trajectory


@dataclass(frozen=True)
class Example:
    """Prompt segments (each newline-terminated) and the target whose tokens carry the loss."""

    kind: str  # "policy" | "wm" | "cr"
    segments: tuple[str, ...]
    target: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    weight: float = 1.0  # relative weight inside its kind's loss (training's class balance)


@dataclass(frozen=True)
class Transition:
    """One human step with everything needed to render its state, action and next state."""

    user: int
    persona: str
    views: tuple[ItemView, ...]
    session: tuple[tuple[str, int], ...]
    page: int
    max_pages: int
    ratings: Mapping[int, int]  # slot -> rating
    then: str
    next_views: tuple[ItemView, ...] | None
    items: tuple[int, ...]
    history: int | None = None  # ratings the persona and evidence draw on (None: not recorded)

    @property
    def at_limit(self) -> bool:
        """The last page a visit may show: it ends here whatever the action says."""
        return self.page >= self.max_pages

    @property
    def ends(self) -> bool:
        """Whether the visit ends after this page: an exit, or the last page it may show."""
        return self.then == "exit" or self.at_limit

    @property
    def page_text(self) -> str:
        return text.page_prompt(self.page, self.max_pages, self.views, self.session)

    @property
    def prefix(self) -> str:
        return prompts.prefix(self.persona, self.page_text)

    def wm_example(self, page_format: str = "titles") -> Example:
        """Stage 1's example: the state and action, then the next state in ``page_format``
        (``agents.text.render_next_state``)."""
        action = text.render_wm_action(len(self.views), list(self.ratings), self.then)
        return Example("wm", (prompts.persona_block(self.persona), self.page_text,
                              prompts.world_model_tail(action)),
                       text.render_next_state(self.ratings, self.next_views, page_format),
                       {"user": self.user, "page": self.page})

    @property
    def rating_cues(self) -> list[str]:
        """Each slot's rating cue line, as a cue-trained world model rates after it."""
        return text.page_rating_cues(self.views)

    def wm_examples(self, page_format: str = "titles", rating_cue: bool = False
                    ) -> list[Example]:
        """Stage 1's examples of this page: the whole next state; with ``rating_cue`` also each
        watched slot's rating alone, after the action and that slot's rating cue line, the
        context the world model's expected ratings are then scored in
        (``agents.world_model.expectation_requests``)."""
        out = [self.wm_example(page_format)]
        if not rating_cue:
            return out
        action = prompts.world_model_tail(
            text.render_wm_action(len(self.views), list(self.ratings), self.then))
        cues = self.rating_cues
        head = (prompts.persona_block(self.persona), self.page_text)
        return out + [Example("wm", (*head, action + text.cue_line(s, cues[s - 1])),
                              text.rating_line(s, r),
                              {"user": self.user, "page": self.page, "slot": s})
                      for s, r in sorted(self.ratings.items())]

    def human_action(self) -> PageAction:
        """What the human did on this page, as an agent's action reads."""
        return PageAction(watched={self.items[s - 1]: r for s, r in self.ratings.items()},
                          then=self.then)

    def decision_input(self, evidence: bool = True, seed: int = 0) -> DecisionInput:
        """This page as a policy decides it; ``evidence=False`` is the no-memory ablation."""
        return DecisionInput(user=self.user, page=self.page, items=list(self.items),
                             persona_text=self.persona,
                             page_text=text.page_prompt(self.page, self.max_pages, self.views,
                                                        self.session, evidence=evidence),
                             cues=text.page_cues(self.views, evidence),
                             rating_cues=text.page_rating_cues(self.views, evidence), seed=seed,
                             last=self.at_limit, history=self.history)

    def policy_examples(self, predictions: Mapping[int, float] | None = None,
                        rating_cue: bool = False) -> list[Example]:
        """The human's action as the agent decides it (``agents.decide``): one example per
        slot's watch/skip line after the page and the slot's cue line, and one for next/exit +
        ratings after the choices; with ``rating_cue``, one for next/exit and one per watched
        slot's rating after next/exit and the slot's rating cue line, each rating alone as it
        is scored. Slot examples carry ``meta['line']`` and ``meta['slot']`` for class
        balancing and the within-page ranking loss."""
        preds = dict(predictions or {})
        inp = self.decision_input().model_copy(update={"predictions": preds})
        head = (prompts.persona_block(self.persona), inp.page_text)
        tail = prompts.policy_tail(text.render_predictions(preds))
        meta = {"user": self.user, "page": self.page}
        out = [Example("policy", (*head, tail + inp.cue(s)), text.slot_line(s, c),
                       {**meta, "line": c, "slot": s})
               for s in range(1, len(self.views) + 1)
               for c in [text.WATCH if s in self.ratings else text.SKIP]]
        choices = tail + text.render_choices(len(self.views), list(self.ratings))
        if not rating_cue:
            out.append(Example("policy", (*head, choices), text.then_line(self.then)
                               + text.ratings_lines(self.ratings), meta))
            return out
        out.append(Example("policy", (*head, choices), text.then_line(self.then), meta))
        after = choices + text.then_line(self.then)
        out += [Example("policy", (*head, after + inp.rating_cue(s)), text.rating_line(s, r),
                        {**meta, "rating": r, "slot": s}) for s, r in sorted(self.ratings.items())]
        return out

    def cr_example(self, reflection: str, predictions: Mapping[int, float] | None = None
                   ) -> Example:
        target = (reflection.rstrip() + "\n" + prompts.CHOICES
                  + text.render_action(len(self.views), self.ratings, self.then))
        return Example("cr", (prompts.persona_block(self.persona), self.page_text,
                              prompts.reflection_tail(text.render_predictions(predictions or {}))),
                       target, {"user": self.user, "page": self.page})


def transitions(trajs: Iterable[Trajectory], world: World, max_pages: int = MAX_PAGES,
                full_history: bool = False) -> list[Transition]:
    """Render each step of each trajectory. Persona and evidence come from the train ratings
    entered before the session; ``full_history`` uses the whole train split instead (right for
    held-out trajectories, which all come after the train period). A train trajectory's match
    comes from a fit without the person's own ratings, which hold its labels."""
    perceiver = world.perceiver
    by_user = {int(u): g for u, g in world.split.train.groupby("user")}
    out: list[Transition] = []
    for t in trajs:
        rows = by_user.get(t.user)
        past: dict[int, float] = {}
        if rows is not None:
            keep = rows if full_history else rows[rows["timestamp"] < t.start]
            past = dict(zip(keep["item"].astype(int), keep["rating"].astype(float), strict=True))
        persona = world.persona_at(t.user, None if full_history else t.start)
        session: list[tuple[int, int]] = []
        for k, step in enumerate(t.steps):
            history = {**past, **dict(session)}
            views = tuple(perceiver.page(step.items, history,
                                         None if full_history else t.user))
            nxt: Step | None = t.steps[k + 1] if k + 1 < len(t.steps) else None
            next_views = None if nxt is None else tuple(perceiver.facts(i) for i in nxt.items)
            slots = {i: s for s, i in enumerate(step.items, 1)}
            out.append(Transition(
                user=t.user, persona=persona, views=views,
                session=tuple((perceiver.items[i].title, r) for i, r in session),
                page=step.page, max_pages=max_pages,
                ratings={slots[i]: r for i, r in step.watched.items()}, then=step.then,
                next_views=next_views, items=tuple(step.items), history=len(past)))
            session += [(i, r) for i, r in step.watched.items()]
    return out
