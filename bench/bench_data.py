"""Times load + split + human-trajectory build on ml-100k (goal: under 10 s on 2 cores)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from agents.world import load_world
from simulator.trajectories import trajectory_stats


def main() -> None:
    rows = []
    t = time.perf_counter()
    world = load_world()
    rows.append(("load + split", time.perf_counter() - t, f"{len(world.ds.ratings):,} ratings"))
    t = time.perf_counter()
    world.recommender("itemknn")
    rows.append(("fit itemknn", time.perf_counter() - t, ""))
    t = time.perf_counter()
    train = world.trajectories("train", progress=False)
    s = trajectory_stats(train)
    rows.append(("train trajectories", time.perf_counter() - t,
                 f"{s['visits']:,} visits, {s['pages']:,} pages, watch ratio "
                 f"{s['watch_ratio']:.3f}"))
    t = time.perf_counter()
    test = world.trajectories("test", progress=False)
    s = trajectory_stats(test)
    rows.append(("test trajectories", time.perf_counter() - t,
                 f"{s['visits']:,} visits, {s['pages']:,} pages"))
    table = Table(title="ml-100k data pipeline")
    for col in ("stage", "seconds", "output"):
        table.add_column(col)
    for name, sec, out in rows:
        table.add_row(name, f"{sec:.2f}", out)
    table.add_row("total", f"{sum(r[1] for r in rows):.2f}", "goal < 10 s for load+split+train")
    Console().print(table)


if __name__ == "__main__":
    main()
