"""Summary numbers for a dataset and its split, so a run's inputs can be checked at a glance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
from rich.table import Table

from simulator.data import RATING_MAX, RATING_MIN, Dataset
from simulator.split import Split


def _date(ts: int) -> str:
    return datetime.fromtimestamp(int(ts), tz=UTC).strftime("%Y-%m-%d")


def dataset_info(ds: Dataset, split: Split | None = None) -> dict[str, Any]:
    """Plain JSON-ready numbers (CLI tables and run manifests both use them)."""
    r = ds.ratings
    n_users, n_items, n_ratings = len(ds.users), len(ds.items), len(r)
    stars = np.clip(np.floor(r["rating"].to_numpy() + 0.5), RATING_MIN, RATING_MAX).astype(int)
    per_user = r.groupby("user").size()
    info: dict[str, Any] = {
        "name": ds.name,
        "users": n_users,
        "items": n_items,
        "ratings": n_ratings,
        "density": n_ratings / (n_users * n_items) if n_users and n_items else 0.0,
        "rating_histogram": {k: int((stars == k).sum()) for k in range(RATING_MIN, RATING_MAX + 1)},
        "mean_rating": float(r["rating"].mean()) if n_ratings else None,
        "ratings_per_user": {
            "mean": float(per_user.mean()) if n_ratings else 0.0,
            "median": float(per_user.median()) if n_ratings else 0.0,
            "min": int(per_user.min()) if n_ratings else 0,
            "max": int(per_user.max()) if n_ratings else 0,
        },
        "first_rating": _date(r["timestamp"].min()) if n_ratings else None,
        "last_rating": _date(r["timestamp"].max()) if n_ratings else None,
        "genres": len(ds.genres),
        "split": None,
    }
    if split is not None:
        info["split"] = {
            "kind": split.config.kind,
            "sizes": split.sizes(),
            "users": {p: int(split.part(p)["user"].nunique()) for p in ("train", "valid", "test")},
            "fingerprints": {p: split.fingerprint(p)[:12] for p in ("train", "valid", "test")},
        }
    return info


def format_info(info: dict[str, Any]) -> list[Table]:
    """Rich tables for ``alignuser data info``; one per topic keeps each narrow."""
    overview = Table(title=f"Dataset {info['name']}", show_header=False)
    overview.add_column("field", style="bold")
    overview.add_column("value", justify="right")
    rpu = info["ratings_per_user"]
    for label, value in [
        ("users", f"{info['users']:,}"),
        ("items", f"{info['items']:,}"),
        ("ratings", f"{info['ratings']:,}"),
        ("density", f"{info['density']:.2%}"),
        ("mean rating", f"{info['mean_rating']:.2f}" if info["mean_rating"] is not None else "-"),
        ("ratings per user (mean / median)", f"{rpu['mean']:.1f} / {rpu['median']:.0f}"),
        ("ratings per user (min / max)", f"{rpu['min']} / {rpu['max']}"),
        ("period", f"{info['first_rating']} to {info['last_rating']}"),
        ("genres", str(info["genres"])),
    ]:
        overview.add_row(label, value)

    hist = Table(title="Ratings")
    hist.add_column("stars", justify="right")
    hist.add_column("count", justify="right")
    hist.add_column("share", justify="right")
    hist.add_column("")
    total = max(info["ratings"], 1)
    for stars, count in info["rating_histogram"].items():
        share = count / total
        hist.add_row(str(stars), f"{count:,}", f"{share:.1%}", "█" * round(share * 40))
    tables = [overview, hist]

    if info.get("split"):
        sp = info["split"]
        split_t = Table(title=f"Split ({sp['kind']})")
        for col in ("part", "ratings", "share", "users", "fingerprint"):
            split_t.add_column(col, justify="left" if col in ("part", "fingerprint") else "right")
        n = max(sum(sp["sizes"].values()), 1)
        for part, size in sp["sizes"].items():
            split_t.add_row(part, f"{size:,}", f"{size / n:.1%}", f"{sp['users'][part]:,}",
                            sp["fingerprints"][part])
        tables.append(split_t)
    return tables
