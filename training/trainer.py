"""A small LoRA trainer for L = L_policy + λ_wm·L_wm + λ_CR·L_CR, resumable after a kill.

Each example's loss is the mean cross-entropy over its target tokens only; each kind's losses
are averaged and weighted. Batches cycle through the kinds in a seeded order that depends only
on (seed, step), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents import text
from agents.transition import Example
from training.batches import head, packed_losses, units
from training.config import TrainConfig


def weighted_loss(losses: torch.Tensor, kinds: Sequence[str],
                  weights: Mapping[str, float],
                  example_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Σ_kind λ_kind · (weighted mean of that kind's example losses)."""
    w = losses.new_tensor(list(example_weights) if example_weights is not None
                          else [1.0] * len(kinds))
    total = losses.new_zeros(())
    for kind in dict.fromkeys(kinds):
        sel = torch.tensor([k == kind for k in kinds], device=losses.device)
        total = total + weights.get(kind, 1.0) * (losses[sel] * w[sel]).sum() / w[sel].sum()
    return total


def pair_loss(margins: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    """Mean softplus(m_skipped - m_watched) over the (watched, skipped) slot pairs of each page.

    Per-user AUC asks only that a person's watched items rank above their skipped ones; this
    term rewards exactly that and is blind to a page's overall level, which the class-balanced
    lines and the calibrated offsets set. Zero when no page holds both answers."""
    page = {k: i for i, k in enumerate(dict.fromkeys(head(ex) for ex in examples))}
    g = torch.tensor([page[head(ex)] for ex in examples], device=margins.device)
    line = [ex.meta.get("line") for ex in examples]
    pos = torch.tensor([x == text.WATCH for x in line], device=margins.device)
    neg = torch.tensor([x == text.SKIP for x in line], device=margins.device)
    pairs = (pos[:, None] & neg[None, :] & (g[:, None] == g[None, :])
             & ~torch.isnan(margins)[:, None] & ~torch.isnan(margins)[None, :])
    if not bool(pairs.any()):
        return margins.new_zeros(())
    m = torch.nan_to_num(margins)
    return torch.nn.functional.softplus(m[None, :] - m[:, None])[pairs].mean()


@dataclass
class Schedule:
    """Which examples make batch ``step``: kinds in turn, each kind's units in a seeded
    permutation. A unit is all of a pool's examples that share a page (``batches.units``), so
    a page's examples are trained together from one forward of the page; ``batch_size`` counts
    units."""

    pools: Mapping[str, Sequence[Example]]
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        self._units = {k: [[pool[i] for i in u] for u in units(pool)]
                       for k, pool in self.pools.items()}

    def batch(self, step: int) -> list[Example]:
        kinds = sorted(k for k, v in self._units.items() if v)
        out: list[Example] = []
        for j in range(self.batch_size):
            slot = step * self.batch_size + j
            kind = kinds[slot % len(kinds)]
            pool = self._units[kind]
            n = slot // len(kinds)
            epoch, pos = divmod(n, len(pool))
            perm = np.random.default_rng([self.seed, epoch, kinds.index(kind)]).permutation(
                len(pool))
            out += pool[int(perm[pos])]
        return out


def _lr(step: int, total: int, base: float, warmup: int, spent: float = 0.0) -> float:
    """Warm-up, then a cosine decay over the steps or over ``spent``, the share of this run's
    time budget used, whichever is further along: a stage cut by its budget has annealed."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), spent)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


NOTHING_SPENT = {"seconds": 0.0, "tokens": 0}


def save_lora(model, folder: Path) -> None:
    """The adapter's weights only. PEFT's default ("auto") asks the Hub for the base model's
    config.json whenever the recorded base is not a local folder (ours is "default"), a network
    call on every save; no adapter here resizes or trains the embeddings, so there is nothing
    to ask."""
    model.save_pretrained(folder, save_embedding_layers=False)


def save_adapter(model, out: Path, save_dtype: str = "bfloat16") -> None:
    """The adapter in ``save_dtype`` (bf16 halves the file; weights are cast on load)."""
    import torch

    save_lora(model, out)
    if save_dtype == "bfloat16":
        from safetensors.torch import load_file, save_file

        path = out / "adapter_model.safetensors"
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    _portable_adapter_config(out)


def _portable_adapter_config(out: Path) -> None:
    """Name the base by its role, not by this machine's cache path (resolved at load time)."""
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "default"
    path.write_text(json.dumps(cfg, indent=2))


def _save(model, opt, ckpt: Path, step: int, history: list[dict], spent: dict) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_lora(model, tmp)
    torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()},
               tmp / "trainer_state.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history,
                                                   "spent": spent}))
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    tmp.rename(ckpt)


def _load(model, opt, ckpt: Path) -> tuple[int, list[dict], dict]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    prog = json.loads((ckpt / "progress.json").read_text())
    return prog["step"], prog["history"], prog.get("spent", NOTHING_SPENT)


def _keep_best(model, best_dir: Path, history: Sequence[dict]) -> int | None:
    """Early stopping's rule: the stage ends with the weights of its best validation loss (saved
    in ``best_dir`` whenever it improved); returns that step, None without validation."""
    scored = [h for h in history if "valid" in h]
    weights = best_dir / "adapter_model.safetensors"
    if not scored or not weights.is_file():
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(weights)))
    return min(scored, key=lambda h: h["valid"])["step"]


def train_loop(model, tokenizer, pools: Mapping[str, Sequence[Example]],
               weights: Mapping[str, float], steps: int, out_dir: Path, cfg: TrainConfig, *,
               resume: bool = False, validate: Callable[[], float] | None = None,
               stop_after: int | None = None, progress: bool = True) -> dict:
    """Train the trainable (LoRA) weights; checkpoints to ``out_dir/checkpoint``. Batch size,
    length, learning rate, warm-up, seed, checkpoint and validation cadence, patience and time
    budget are ``cfg``'s, so they have one default (``TrainConfig``)."""
    max_len, lr, warmup, save_every = cfg.max_len, cfg.lr, cfg.warmup, cfg.save_every
    eval_every, patience, time_budget = cfg.eval_every, cfg.patience, cfg.time_budget_s
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = Schedule(pools, cfg.batch_size, cfg.seed)
    ckpt = out_dir / "checkpoint"
    start, history, before = (_load(model, opt, ckpt) if resume and ckpt.exists()
                              else (0, [], NOTHING_SPENT))
    valids = [h["valid"] for h in history if "valid" in h]
    best = min(valids, default=float("inf"))
    bad = len(valids) - 1 - valids.index(best) if valids else 0  # checks since the best
    # The clock starts before the step-0 validation: it is part of what the stage costs. A
    # resumed stage goes on with the seconds it had spent, so its budget, its learning rate's
    # decay and its patience read as in one uninterrupted run.
    t0, tokens = time.perf_counter(), 0

    def used() -> float:
        return before["seconds"] + time.perf_counter() - t0

    def spent_out() -> bool:
        return time_budget is not None and used() > time_budget

    # A stage that had already stopped on its budget or its patience does not train on.
    ended = start > 0 and (spent_out() or (validate is not None and bad >= patience))

    def check(rec: dict) -> None:
        """Validate the weights as they are now; keep them in ``best/`` when they are best."""
        nonlocal best, bad
        model.eval()
        rec["valid"] = round(validate(), 4)
        model.train()
        if rec["valid"] < best:
            best, bad = rec["valid"], 0
            save_lora(model, out_dir / "best")
        else:
            bad += 1

    if validate is not None and not history:
        # The starting weights are a candidate too: a stage that only makes them worse on
        # validation (too few steps, too hot a rate) ends where it began.
        history.append({"step": start})
        check(history[-1])
    # Gradient checkpointing turns the KV cache off, and a shared page needs it.
    pack = not any(getattr(model, a, False) for a in ("is_activation_checkpointing",
                                                      "is_gradient_checkpointing"))
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", disable=not progress)
    for step in bar:
        if ended or (stop_after is not None and step >= stop_after):
            break
        examples = sched.batch(step)
        began = time.perf_counter()
        spent = used() / time_budget if time_budget else 0.0
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup, spent)
        losses, pushed, margins = packed_losses(model, tokenizer, examples, max_len, pack,
                                                cfg.detach_head)
        loss = weighted_loss(losses, [ex.kind for ex in examples], weights,
                             [ex.weight for ex in examples])
        ranked = pair_loss(margins, examples) if cfg.pair_weight else None
        if ranked is not None:
            loss = loss + cfg.pair_weight * ranked
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += pushed
        # Per-step tokens and seconds show where a stage slows down (a long page, a busy CPU).
        rec = {"step": step + 1, "loss": round(float(loss.detach()), 4), "tokens": pushed,
               "s": round(time.perf_counter() - began, 2)}
        for kind in dict.fromkeys(ex.kind for ex in examples):
            sel = [i for i, ex in enumerate(examples) if ex.kind == kind]
            rec[f"loss_{kind}"] = round(float(losses[sel].detach().mean()), 4)
        if ranked is not None:
            rec["loss_pair"] = round(float(ranked.detach()), 4)
        over = spent_out()
        # A stage's last step is validated too, so one cut by its budget before its first
        # ``eval_every`` does not end on weights nobody checked.
        if validate is not None and ((step + 1) % eval_every == 0 or step + 1 == steps or over):
            check(rec)
        history.append(rec)
        tps = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=rec["loss"], tok_s=f"{tps:.0f}")
        if (step + 1) % save_every == 0 or step + 1 == steps or over:
            _save(model, opt, ckpt, step + 1, history,
                  {"seconds": used(), "tokens": before["tokens"] + tokens})
        if over or (validate is not None and bad >= patience):
            break
    model.eval()
    kept = _keep_best(model, out_dir / "best", history)
    # Time and tokens add up over interrupted runs, so a resumed stage reports its whole cost.
    elapsed = used()
    tokens += before["tokens"]
    return {"steps": history[-1]["step"] if history else 0, "history": history,
            "best_valid": None if best == float("inf") else best, "kept_step": kept,
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "seconds": round(elapsed, 1)}


def validation_loss(model, tokenizer, examples: Sequence[Example], weights: Mapping[str, float],
                    max_len: int, batch_size: int = 4, pair_weight: float = 0.0) -> float:
    """Kind-weighted mean loss, plus ``pair_weight`` times the pages' mean ``pair_loss`` (the
    objective training minimises); a page's examples are scored together from one forward."""
    total, pairs = [], []
    groups = [[examples[i] for i in u] for u in units(examples)]
    with torch.no_grad():
        for i in range(0, len(groups), batch_size):
            chunk = [ex for g in groups[i:i + batch_size] for ex in g]
            losses, _, margins = packed_losses(model, tokenizer, chunk, max_len)
            total += [weights.get(ex.kind, 1.0) * float(v) for ex, v in zip(chunk, losses,
                                                                            strict=True)]
            if pair_weight:
                pairs.append(float(pair_loss(margins, chunk)))
    if not total:
        return float("nan")
    return float(np.mean(total)) + (pair_weight * float(np.mean(pairs)) if pairs else 0.0)
