"""Train from prepared transitions: ``python -m training.fit_prepared PREPARED OUT [--flag v]``.

``alignuser train --prepare-only FILE`` renders the transitions where the data stack lives; this
entry point fits from that file on any machine with torch, transformers and peft (a GPU box),
with the same ``TrainConfig`` flags as ``alignuser train``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from simulator.runs import read_pickle
from training.config import TrainConfig, config_flags, parse_config, validation_line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.fit_prepared", description=__doc__)
    ap.add_argument("prepared", help="file written by alignuser train --prepare-only")
    ap.add_argument("output", help="folder for the adapter and manifest")
    ap.add_argument("--resume", action="store_true")
    config_flags(ap, TrainConfig)
    args = ap.parse_args(argv)
    try:
        cfg = parse_config(TrainConfig, args)
    except ValidationError as exc:  # one line, as the front door prints it, before any load
        ap.error(validation_line(exc))
    if not Path(args.prepared).is_file():
        ap.error(f"{args.prepared}: no such file (write one with alignuser train --prepare-only)")
    from training.pipeline import fit, lacks_list_pages  # torch, transformers: flags hold

    prep = read_pickle(args.prepared)
    if lacks_list_pages(cfg, prep):
        ap.error(f"--list-pages: {args.prepared} holds no list pages; prepare it with "
                 "--list-pages (alignuser train --prepare-only)")
    manifest = fit(cfg, prep, Path(args.output), resume=args.resume)
    print(manifest["final_losses"], manifest["calibration"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
