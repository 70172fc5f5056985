"""1:1 lists as training pages (``--list-pages``): the footing the feature-regression bar has.

The bar an agent must clear on held-out 1:m lists is a logistic regression fit on validation
1:1 lists; an agent trained on train-period pages alone reads its cues with the train period's
footing. These pages give the policy the regression's footing without touching any evaluated
person: they come only from users who have no 1:1 test list (fewer than 10 test ratings), so
no evaluation at any seed or size shows them a 1:m list, and no calibration list is theirs
(those need 10 validation ratings). Each such user's validation items and as many items they
never rated in any part are shuffled into lists of at most 20 (5 pages of 4, as evaluation's),
perceived from the train split as evaluation perceives its lists; only the watch/skip lines
train (a list has no next/exit of its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agents.browse import pages_of
from agents.transition import Example, Transition, transitions
from agents.world import ListRow, World
from simulator.env import MAX_PAGES, PAGE_SIZE
from simulator.lists import user_list
from simulator.trajectories import Step, Trajectory

LIST_KIND = "lists"  # the pool (and loss term) of list pages' watch/skip lines


def list_rows(world: World, seed: int) -> list[ListRow]:
    """Validation 1:1 lists of the users evaluation never lists (no 1:1 test list): each
    user's validation items against as many never rated, drawn as the protocol's lists are
    (``simulator.lists.user_list``), cut into lists of at most 20."""
    evaluated = {u for u, _, _ in world.lists("test", 1, None, seed)}
    rated = world.rated_in()
    catalogue = np.asarray(sorted(world.ds.items), dtype=np.int64)
    size = PAGE_SIZE * MAX_PAGES
    out: list[ListRow] = []
    for u, g in world.split.valid.groupby("user"):
        u = int(u)
        if u in evaluated or len(g) < 2:
            continue
        pos = np.asarray(sorted(set(g["item"].astype(int))), dtype=np.int64)
        row = user_list(u, pos, rated.get(u, set()), catalogue, len(pos), len(pos),
                        np.random.default_rng([seed, u]))
        if row is not None:
            _, shown, labels = row
            out += [(u, shown[i:i + size], labels[i:i + size])
                    for i in range(0, len(shown), size)]
    return out


def list_transitions(world: World, rows: Sequence[ListRow]) -> list[Transition]:
    """Each validation list as a visit whose positives are watched at their validation
    ratings (what a later page's session lines show), perceived from the whole train split."""
    valid = world.split.valid
    rating = {(int(u), int(i)): int(r)
              for u, i, r in zip(valid["user"], valid["item"], valid["rating"], strict=True)}
    visits = []
    for u, shown, labels in rows:
        pos = {i for i, y in zip(shown, labels, strict=True) if y}
        steps = [Step(page=p, items=page, watched={i: rating[(u, i)] for i in page if i in pos},
                      then="next") for p, page in enumerate(pages_of(shown), 1)]
        visits.append(Trajectory(user=u, part="valid", session=0, visit=0, recommender="list",
                                 steps=steps))
    return transitions(visits, world, full_history=True)


def slot_examples(examples: Sequence[Example]) -> list[Example]:
    """The watch/skip lines of list pages' policy examples, in the lists' own pool."""
    from dataclasses import replace

    return [replace(e, kind=LIST_KIND) for e in examples if e.meta.get("line")]
