"""Agent4Rec's 1:m lists: a user's held-out items against items they never rated.

Both sides of the project read them: evaluation scores every method on test lists, and training
fits the list offset of a checkpoint's calibration on validation lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

# Agent4Rec's list sizes (positives, negatives) per 1:m ratio.
LIST_SIZES: dict[int, tuple[int, int]] = {1: (10, 10), 2: (6, 12), 3: (5, 15), 9: (2, 18)}

ListRow = tuple[int, list[int], list[int]]
"""(user, items, labels): one 1:m list, label 1 for a held-out item."""


def discrimination_lists(test: pd.DataFrame, train_items_by_user: Mapping[int, set[int]],
                         all_items: Sequence[int], m: int,
                         seed: int) -> list[ListRow]:
    """Per-user 1:m lists: held-out rated items (any rating) against items never rated at all.

    ``train_items_by_user`` must hold every non-test item the user rated (train and validation),
    so that no negative was ever chosen. Each user's draw is seeded by (seed, m, user), so adding
    or dropping users leaves the other lists unchanged. Users without enough positives or
    negatives are skipped, not padded.
    """
    if m not in LIST_SIZES:
        raise ValueError(f"1:m ratio must be one of {sorted(LIST_SIZES)}, got {m}")
    n_pos, n_neg = LIST_SIZES[m]
    catalogue = np.array(sorted(set(all_items)), dtype=np.int64)
    out: list[ListRow] = []
    for user, group in test.groupby("user", sort=True):
        uid = int(user)
        positives = np.array(sorted(set(group["item"].astype(int))), dtype=np.int64)
        if len(positives) < n_pos:
            continue
        rated = set(positives.tolist()) | set(train_items_by_user.get(uid, set()))
        row = user_list(uid, positives, rated, catalogue, n_pos, n_neg,
                        np.random.default_rng([seed, m, uid]))
        if row is not None:
            out.append(row)
    return out


def user_list(uid: int, positives: np.ndarray, rated: set[int], catalogue: np.ndarray,
              n_pos: int, n_neg: int, rng: np.random.Generator) -> ListRow | None:
    """``n_pos`` of ``positives`` against ``n_neg`` catalogue items outside ``rated``, shuffled;
    None when too few items were never rated."""
    negatives = catalogue[~np.isin(catalogue, list(rated))]
    if len(negatives) < n_neg:
        return None
    items = np.concatenate([rng.choice(positives, n_pos, replace=False),
                            rng.choice(negatives, n_neg, replace=False)])
    labels = np.array([1] * n_pos + [0] * n_neg)
    order = rng.permutation(len(items))
    return uid, items[order].tolist(), labels[order].tolist()
