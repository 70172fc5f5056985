"""Small training examples shared by the training tests: four films on one page, a persona,
the tiny LoRA config and pages rendered as training transitions."""

from __future__ import annotations

from typing import Any

from agents import prompts, text
from agents.llm import LM, tiny_lm
from agents.text import Evidence, ItemView, PageView
from agents.transition import Example, Transition
from training.config import TrainConfig
from training.pipeline import _peft

VIEWS = (
    ItemView(id=10, title="Heat", year=1995, genres=("Action", "Crime"), popularity=80,
             mean_rating=3.9, evidence=[Evidence(title="Ronin", rating=4, similarity=0.5),
                                        Evidence(title="Face/Off", rating=5, similarity=0.4)]),
    ItemView(id=20, title="Babe", year=1995, genres=("Children's", "Comedy"), popularity=50),
    ItemView(id=30, title="Fargo", year=1996, genres=("Crime", "Drama"), popularity=300,
             mean_rating=4.2, evidence=[Evidence(title="Blood Simple", rating=2,
                                                 similarity=0.3)]),
    ItemView(id=40, title="Casper", year=1995, genres=("Children's",), popularity=20),
)
PERSONA = "You are a 34-year-old engineer. You like Crime and Action films.\n"
TINY_CFG = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.05, seed=0)


def example(kind: str, page: int, ratings: dict[int, int], then: str) -> Example:
    page_text = text.render_page(PageView(page=page, max_pages=5, items=list(VIEWS)))
    return Example(kind, (prompts.persona_block(PERSONA), page_text, prompts.policy_tail()),
                   text.render_action(4, ratings, then))


EXAMPLES = [example("policy", 1, {1: 4, 3: 5}, "next"), example("policy", 2, {}, "exit"),
            example("policy", 3, {2: 1}, "next"), example("policy", 4, {1: 5, 4: 2}, "exit")]


def peft_lm(dropout: float | None = None) -> tuple[Any, LM]:
    """A fresh tiny model with the tiny LoRA on it (``dropout``: its LoRA dropout instead of
    TINY_CFG's), and the LM it wraps."""
    lm = tiny_lm(seed=0)
    cfg = TINY_CFG if dropout is None else TINY_CFG.model_copy(update={"lora_dropout": dropout})
    return _peft(lm, cfg), lm


def transition(ratings: dict[int, int], then: str) -> Transition:
    return Transition(user=5, persona=PERSONA, views=VIEWS, session=(), page=1, max_pages=5,
                      ratings=ratings, then=then, next_views=VIEWS[:2],
                      items=tuple(v.id for v in VIEWS))


def pool(kind: str, n: int) -> list[Example]:
    return [Example(kind, (f"{kind} prompt {i}\n",), f"target {i}\n") for i in range(n)]
