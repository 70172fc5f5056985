"""Seconds and tokens per optimizer step of the policy objective, a step's pages trained from
two forwards (packed: heads, then each page's tails as a tree), the same with the heads run
without gradient (detached, ``TrainConfig.detach_head``) or each example alone:
``python bench/bench_training.py PREPARED [--pages 2] [--steps 3] [--modes packed,detached,alone]
[--device cuda] [--model DIR]``
(PREPARED from ``alignuser train --prepare-only``). ``--model`` takes any HF folder, e.g. the
base's config.json and tokenizer with random weights, so a GPU box can be timed before the
base model's weights reach it (``bench/gpu_pipeline.sh probe``)."""

from __future__ import annotations

import argparse
import time

import torch

from agents.llm import load_lm
from simulator.runs import read_pickle
from training.batches import packed_losses
from training.config import TrainConfig
from training.pipeline import _peft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("prepared")
    ap.add_argument("--pages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--model", default="default", help="base model folder (default: SmolLM2)")
    ap.add_argument("--modes", default="packed,detached,alone")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"packed", "detached", "alone"})
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)}; use packed, detached and/or alone")
    prep = read_pickle(args.prepared)
    cfg = TrainConfig()
    lm = load_lm(args.model, dtype=cfg.dtype, device=args.device)
    model = _peft(lm, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    print("| mode | examples/step | tokens/step | s/step | examples/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        pack, detach = mode != "alone", mode == "detached"
        times, tokens, n = [], 0, 0
        for step in range(-1, args.steps):  # step -1 warms up (allocator, kernels) untimed
            pages = prep.train[(step + 1) * args.pages:(step + 2) * args.pages]
            examples = [e for t in pages for e in t.policy_examples()]
            t0 = time.perf_counter()
            losses, pushed, _ = packed_losses(model, lm.tokenizer, examples, cfg.max_len, pack,
                                              detach)
            opt.zero_grad()
            losses.mean().backward()
            opt.step()
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 0:
                times.append(time.perf_counter() - t0)
                tokens, n = tokens + pushed, n + len(examples)
        s = sum(times)
        print(f"| {mode} | {n / args.steps:.0f} | {tokens / args.steps:.0f} | "
              f"{s / args.steps:.1f} | {n / s:.2f} | {tokens / s:.0f} |")


if __name__ == "__main__":
    main()
