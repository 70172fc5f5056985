"""Would int8 weights make the agent faster on a CPU without native bf16, and would it still
decide as the fp32 model does? torch's dynamic int8 quantization of the decoder's Linear layers
(weights per output channel, activations given one scale per tensor at run time), against the
fp32 model, on the same validation 1:1 lists browsed by the full agent: seconds a list, how far
each item's watch log-odds moved, how often its watch/skip decision stayed the same, and the
per-user AUC of each; and first, how far the largest input of each kind of projection stands
above the rest, which one int8 scale per tensor must cover.

    python bench/bench_quantize.py [--lists 8] [--adapter DIR] [--keep-sets "|down_proj|..."]

``--keep-sets``: variants, separated by ``|``, each the comma-separated projections left in fp32
(empty: every Linear in int8). Some projections' inputs carry a few very large activations
(the first table), against which one scale per tensor rounds the rest; those projections can
stay fp32. torch marks ``torch.ao.quantization`` deprecated, one more reason it is measured here and
not offered as an option.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.metrics import roc_auc_score

from agents.browse import list_scores
from agents.decide import Calibration
from agents.llm import LM, load_lm
from agents.prompts import persona_block
from agents.scorer import Scorer
from agents.world import World, load_world
from evaluation.sections import validation_lists

SHIPPED = "checkpoints/alignuser-ml100k"


def quantized(lm: LM, keep: set[str]) -> LM:
    """``lm`` with the decoder layers' Linear modules in dynamic int8, but those whose name
    holds one of ``keep``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layers = lm.model.get_decoder().layers
    spec = {name: per_channel_dynamic_qconfig for name, mod in layers.named_modules()
            if isinstance(mod, torch.nn.Linear) and not any(k in name for k in keep)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's own deprecation
        warnings.simplefilter("ignore", UserWarning)  # ... and its quantized tensors'
        lm.model.get_decoder().layers = quantize_dynamic(layers, spec, dtype=torch.qint8)
    return lm


def outliers(lm: LM, text: str) -> list[tuple[str, str, float, float]]:
    """Per projection, the layer whose input's largest |activation| on ``text`` stands furthest
    above its median: (projection, layer, max / median, max / 99th percentile). One int8 scale
    per tensor is set by the largest value; what sits below 1/254 of it rounds to zero."""
    seen: dict[str, tuple[float, float, float]] = {}

    def hook(name: str):
        def read(_mod, inp, _out) -> None:
            x = inp[0].detach().abs().flatten().float()
            seen[name] = (x.max().item(), x.quantile(0.99).item(), x.median().item())
        return read

    layers = lm.model.get_decoder().layers
    handles = [mod.register_forward_hook(hook(name)) for name, mod in layers.named_modules()
               if isinstance(mod, torch.nn.Linear)]
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([lm.tokenizer(text).input_ids]))
    for h in handles:
        h.remove()
    out = []
    for proj in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        name, (mx, p99, med) = max(((n, v) for n, v in seen.items() if n.endswith(proj)),
                                   key=lambda nv: nv[1][0] / nv[1][2])
        out.append((proj, name.split(".")[0], mx / med, mx / p99))
    return out


def scores(world: World, lm: LM, rows: list, cal: Calibration) -> tuple[list, float]:
    """Each list's watch log-odds as evaluation reads them, and the seconds they took."""
    t0 = time.perf_counter()
    out = list_scores(Scorer(lm, cache_size=4096), world.perceiver, world.personas,
                      world.histories, [(u, items) for u, items, _ in rows], world_model=True,
                      offset=cal.list_offset, calibration=cal)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lists", type=int, default=8, help="validation 1:1 lists (of the 200 "
                    "the discrimination section fits cuts on)")
    ap.add_argument("--adapter", default=SHIPPED)
    ap.add_argument("--keep-sets", default="|down_proj|down_proj,q_proj,k_proj,v_proj,o_proj",
                    help="variants, '|'-separated: projections each keeps in fp32")
    args = ap.parse_args()
    if args.lists < 1:
        ap.error("--lists must be at least 1")
    world = load_world()
    rows = validation_lists(world, 200, 0)[:args.lists]
    labels = [np.asarray(lab) for _, _, lab in rows]
    cal = Calibration.of_checkpoint(args.adapter)
    lm = load_lm(adapter=args.adapter, dtype="fp32")
    # One forward over a few persona blocks (~250 tokens each): far inside the model's context
    # and torch.quantile's 16M-element limit whatever --lists is.
    text = "".join(persona_block(world.personas[u]) for u, _, _ in rows[:8])
    spread = Table(title=f"the Linear layers' inputs on the first {min(len(rows), 8)} lists' "
                   f"persona blocks ({len(lm.tokenizer(text).input_ids)} tokens)")
    for col in ("projection", "its widest layer", "max / median", "max / 99th percentile"):
        spread.add_column(col, justify="right")
    for proj, layer, med, p99 in outliers(lm, text):
        spread.add_row(proj, layer, f"{med:,.0f}", f"{p99:,.0f}")
    Console().print(spread)
    ref, ref_s = scores(world, lm, rows, cal)
    table = Table(title=f"{len(rows)} validation 1:1 lists, the full agent ({args.adapter})")
    for col in ("weights", "s a list", "speed-up", "mean |Δ log-odds|", "max", "same decision",
                "AUC"):
        table.add_column(col, justify="right")
    auc = np.mean([roc_auc_score(lab, s) for lab, s in zip(labels, ref, strict=True)])
    table.add_row("fp32", f"{ref_s / len(rows):.2f}", "1.00", "0", "0", "1.000", f"{auc:.4f}")
    for keep in args.keep_sets.split("|"):
        kept = {k for k in keep.split(",") if k}
        lm = quantized(load_lm(adapter=args.adapter, dtype="fp32"), kept)
        got, sec = scores(world, lm, rows, cal)
        d = np.abs(np.concatenate([np.subtract(a, b) for a, b in zip(got, ref, strict=True)]))
        same = np.mean(np.concatenate([(np.asarray(a) >= 0) == (np.asarray(b) >= 0)
                                       for a, b in zip(got, ref, strict=True)]))
        auc = np.mean([roc_auc_score(lab, s) for lab, s in zip(labels, got, strict=True)])
        name = "int8" + (f", fp32: {', '.join(sorted(kept))}" if kept else "")
        table.add_row(name, f"{sec / len(rows):.2f}", f"{ref_s / sec:.2f}", f"{d.mean():.3f}",
                      f"{d.max():.3f}", f"{same:.3f}", f"{auc:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
