"""The training stages end to end: D_rollout -> world model -> counterfactuals -> alignment.

Everything lands in one output folder: the final PEFT adapter (loadable with plain
``PeftModel.from_pretrained``), the tokenizer, ``manifest.json`` (base model, data hashes,
config, steps, losses), a sample of reflections, and resumable per-stage checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.llm import LM, load_lm
from agents.perception import Perceiver
from agents.scorer import Scorer
from simulator.runs import git_commit
from simulator.trajectories import Trajectory
from training.config import LORA_TARGETS, TrainConfig
from training.counterfactual import build_counterfactual, reflection_record
from training.rollout import Example, Transition, fingerprint, transitions
from training.teacher import ChatTeacher, GroundedTeacher
from training.trainer import train_loop, validation_loss


@dataclass
class TrainData:
    """What training may see: TRAIN trajectories, and VALID ones for early stopping only."""

    train: Sequence[Trajectory]
    valid: Sequence[Trajectory]
    perceiver: Perceiver
    persona_at: Callable[[int, int | None], str]  # (user, session start or None) -> text
    liked: Mapping[int, Sequence[str]]
    train_log: Any  # the train ratings frame: evidence before each session
    split_hashes: Mapping[str, str]


def _sample(items: Sequence, n: int, seed: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def _trajectories_for(trajs: Sequence[Trajectory], n_steps: int, seed: int) -> list[Trajectory]:
    """A seeded sample of whole trajectories holding at least ``n_steps`` pages."""
    order = np.random.default_rng(seed).permutation(len(trajs))
    out, total = [], 0
    for i in order:
        if total >= n_steps:
            break
        out.append(trajs[int(i)])
        total += len(trajs[int(i)].steps)
    return out


def _peft(lm: LM, cfg: TrainConfig):
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(lm.model, PeftModel):
        return lm.model
    if cfg.init_adapter:
        return PeftModel.from_pretrained(lm.model, cfg.init_adapter, is_trainable=True)
    import torch

    torch.manual_seed(cfg.seed)
    return get_peft_model(lm.model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))


def _stage(model, lm: LM, cfg: TrainConfig, pools: Mapping[str, Sequence[Example]],
           weights: Mapping[str, float], steps: int, out: Path, valid: Sequence[Example],
           resume: bool, progress: bool, stop_after: int | None) -> dict:
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    def validate() -> float:
        return validation_loss(model, lm.tokenizer, valid, weights, cfg.max_len)

    return train_loop(model, lm.tokenizer, pools, weights, steps, out,
                      batch_size=cfg.batch_size, max_len=cfg.max_len, lr=cfg.lr,
                      warmup=cfg.warmup, seed=cfg.seed, save_every=cfg.save_every,
                      resume=resume, validate=validate if valid else None,
                      eval_every=cfg.eval_every, patience=cfg.patience, stop_after=stop_after,
                      progress=progress)


def _cr_pools(model, lm: LM, cfg: TrainConfig, data: TrainData, trs: Sequence[Transition],
              out: Path, progress: bool) -> tuple[list[Example], list[Example]]:
    """Counterfactual and prediction-aware policy examples, cached so a resume skips them."""
    cache = out / "counterfactuals.jsonl"
    done: list[dict] = []
    if cache.exists():
        done = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    model.eval()
    scorer = Scorer(LM(model=model, tokenizer=lm.tokenizer, name=lm.name))
    teacher = GroundedTeacher() if cfg.teacher == "grounded" else ChatTeacher(
        __import__("agents.chat", fromlist=["LocalTextModel"]).LocalTextModel(lm))
    generator = scorer if cfg.wm_generate else None
    with cache.open("a") as fh:
        for cr, pol, refl in build_counterfactual(trs[len(done):], scorer, teacher, data.liked,
                                                  cfg.k, cfg.seed, generator, progress):
            row = {"cr": [list(cr.segments), cr.target], "policy": [list(pol.segments),
                                                                    pol.target],
                   "reflection": refl, "meta": cr.meta}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done.append(row)
    crs = [Example("cr", tuple(r["cr"][0]), r["cr"][1], r["meta"]) for r in done]
    pols = [Example("policy", tuple(r["policy"][0]), r["policy"][1], r["meta"]) for r in done]
    sample = [reflection_record(tr, r["reflection"]) for tr, r in zip(trs, done[:20],
                                                                      strict=False)]
    (out / "reflections_sample.json").write_text(json.dumps(sample, indent=1))
    return crs, pols


def run_training(cfg: TrainConfig, data: TrainData, out: Path, resume: bool = False,
                 progress: bool = True, lm: LM | None = None,
                 stop_after: int | None = None) -> dict:
    """Run the configured stage(s); returns (and writes) the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    lm = lm or load_lm(cfg.model, dtype=cfg.dtype)
    model = _peft(lm, cfg)
    pool = _trajectories_for(data.train, cfg.wm_transitions + cfg.cr_transitions, cfg.seed)
    train_trs = transitions(pool, data.perceiver, data.persona_at, data.train_log)
    valid_trs = _sample(transitions(data.valid, data.perceiver, data.persona_at, data.train_log,
                                    full_history=True), cfg.valid_examples, cfg.seed)
    wm_trs = _sample(train_trs, cfg.wm_transitions, cfg.seed)
    result: dict[str, Any] = {}
    if cfg.stage in ("wm", "all"):
        result["wm"] = _stage(model, lm, cfg, {"wm": [t.wm_example() for t in wm_trs]},
                              {"wm": 1.0}, cfg.wm_steps, out / "stage_wm",
                              [t.wm_example() for t in valid_trs], resume, progress, stop_after)
    if cfg.stage == "policy":
        pools = {"policy": [t.policy_example() for t in wm_trs]}
        result["policy"] = _stage(model, lm, cfg, pools, {"policy": 1.0}, cfg.cr_steps,
                                  out / "stage_policy", [t.policy_example() for t in valid_trs],
                                  resume, progress, stop_after)
    if cfg.stage in ("cr", "all"):
        cr_trs = _sample(train_trs, cfg.cr_transitions, cfg.seed + 1)
        crs, pols = _cr_pools(model, lm, cfg, data, cr_trs, out, progress)
        pools = {"policy": pols, "wm": [t.wm_example() for t in wm_trs]}
        weights = {"policy": 1.0, "wm": cfg.lambda_wm, "cr": cfg.lambda_cr}
        if cfg.lambda_cr > 0:
            pools["cr"] = crs
        result["cr"] = _stage(model, lm, cfg, pools, weights, cfg.cr_steps, out / "stage_cr",
                              [t.policy_example() for t in valid_trs], resume, progress,
                              stop_after)
    model.save_pretrained(out)
    _portable_adapter_config(out)
    lm.tokenizer.save_pretrained(out)
    manifest = {"base_model": lm.name, "config": cfg.model_dump(mode="json"),
                "data": {"train_trajectories": fingerprint(data.train),
                         "valid_trajectories": fingerprint(data.valid),
                         "split": dict(data.split_hashes),
                         "transitions": {"train": len(train_trs), "wm": len(wm_trs),
                                         "valid": len(valid_trs)}},
                "stages": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                           for k, v in result.items()},
                "final_losses": {k: v["history"][-1] if v["history"] else None
                                 for k, v in result.items()},
                "git_commit": git_commit()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "history.json").write_text(json.dumps({k: v["history"] for k, v in result.items()}))
    return manifest


def _portable_adapter_config(out: Path) -> None:
    """Name the base by its role, not by this machine's cache path (resolved at load time)."""
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "default"
    path.write_text(json.dumps(cfg, indent=2))
