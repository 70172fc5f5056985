"""Does a simulate run repeat exactly? The same command N times, each in a fresh process.

Prints, per run: the run's own wall time, the lockstep batcher's counters (batches, requests,
batches flushed before every agent in flight waited) and peak RSS; then whether every run's
``sessions.jsonl`` equals the first's, and how many sessions took other actions or only
scored otherwise. Runs on older checkouts too (``PYTHONPATH=<checkout>``): it only reads
``BatchingScorer.batches``.

    python bench/bench_repeat.py --runs 2 -- --agents 12 --pages 5 --recommenders pop,itemknn
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def child(simulate_args: list[str]) -> None:
    """One simulate in this process, the batcher's counters and peak RSS as a JSON line."""
    import agents.batching as batching
    from alignuser.cli import main

    made: list = []
    init = batching.BatchingScorer.__post_init__

    def post_init(self) -> None:
        init(self)
        made.append(self)

    batching.BatchingScorer.__post_init__ = post_init  # type: ignore[method-assign]
    t0 = time.perf_counter()
    main(["simulate", *simulate_args])
    stats = [(b.batches.flushes, b.batches.requests, b.batches.timeouts) for b in made]
    print(json.dumps({"s": round(time.perf_counter() - t0, 1),
                      "batches": sum(s[0] for s in stats), "requests": sum(s[1] for s in stats),
                      "early": sum(s[2] for s in stats),
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def sessions(path: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["recommender"], r["user"]): r for r in rows}


def actions(s: dict) -> list:
    return [(p.get("watched"), p.get("then")) for p in s["pages"]] + [s.get("end")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("simulate_args", nargs=argparse.REMAINDER,
                    help="after --: the simulate flags (without --output)")
    args = ap.parse_args()
    rest = [a for a in args.simulate_args if a != "--"]
    if args.child:
        child(rest)
        return
    table = Table("run", "s", "batches", "requests", "flushed early", "peak RSS GiB",
                  "sessions.jsonl vs run 1", title=" ".join(["simulate", *rest]))
    with tempfile.TemporaryDirectory() as tmp:
        first: dict | None = None
        for k in range(1, args.runs + 1):
            out = Path(tmp) / f"run{k}"
            proc = subprocess.run([sys.executable, __file__, "--child", "--", *rest,
                                   "--output", str(out)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            now = sessions(out / "sessions.jsonl")
            if first is None:
                first, same = now, "-"
            else:
                other = sum(actions(now[key]) != actions(first[key]) for key in first)
                scored = sum(now[key] != first[key] for key in first) - other
                same = ("identical" if (out / "sessions.jsonl").read_bytes()
                        == (Path(tmp) / "run1" / "sessions.jsonl").read_bytes()
                        else f"{other} of {len(first)} other actions, {scored} other scores only")
            table.add_row(str(k), f"{got['s']:.1f}", str(got["batches"]), str(got["requests"]),
                          str(got["early"]), f"{got['peak_gib']:.2f}", same)
    Console().print(table)


if __name__ == "__main__":
    main()
