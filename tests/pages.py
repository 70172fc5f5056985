"""Small pages for the decision and calibration tests: four films and pages of unrated
train-catalogue items as the agent sees them."""

from __future__ import annotations

from agents import text
from agents.policy import DecisionInput
from agents.text import Evidence, ItemView
from agents.world import World

VIEWS = tuple(ItemView(id=i, title=f"Film {i}", year=1990 + i, genres=("Drama",), popularity=i,
                       evidence=[Evidence(title="Old", rating=4, similarity=0.3)] if i == 2
                       else []) for i in range(1, 5))


def page_inputs(world: World, n: int = 3, pages: int = 1) -> list[DecisionInput]:
    """Pages of train-history items that the users did not rate, rendered as the agent sees
    them (persona, facts, personal evidence)."""
    users = sorted(world.histories)[:n]
    catalogue = sorted(world.ds.items)
    out = []
    for k, u in enumerate(users):
        unseen = [i for i in catalogue if i not in world.histories[u]]
        for p in range(1, pages + 1):
            items = unseen[7 * k + 4 * p: 7 * k + 4 * p + 4]
            views = world.perceiver.page(items, world.histories[u])
            out.append(DecisionInput(user=u, page=p, items=items, persona_text=world.personas[u],
                                     page_text=text.page_prompt(p, 5, views), seed=3))
    return out


