"""The training stages end to end: D_rollout -> world model -> counterfactuals -> alignment.

Everything lands in one output folder: the final PEFT adapter (loadable with plain
``PeftModel.from_pretrained``), the tokenizer, ``manifest.json`` (base model, data hashes,
config, steps, losses), a sample of reflections, and resumable per-stage checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from agents.browse import pages_of
from agents.llm import LM, load_lm, quiet_peft
from agents.perception import Perceiver
from agents.scorer import Scorer
from agents.transition import Example, Transition, transitions
from agents.world import ListRow, World
from simulator.env import MAX_PAGES, PAGE_SIZE
from simulator.recommenders import SELECTION
from simulator.runs import git_commit
from simulator.trajectories import Trajectory, experienced
from training.config import LORA_TARGETS, TrainConfig
from training.counterfactual import build_counterfactual, reflection_record
from training.list_pages import LIST_KIND, list_rows, list_transitions, slot_examples
from training.rollout import class_balance, fingerprint
from training.teacher import make_teacher
from training.trainer import save_adapter, train_loop, validation_loss


@dataclass
class TrainData:
    """What training may see: TRAIN trajectories for learning; VALID trajectories and 1:1
    lists for early stopping and calibration (with ``--list-pages``, also the validation lists
    of users no evaluation lists: ``training.list_pages``); never TEST. Personas, evidence and
    rendering come from ``world`` (``agents.transition.transitions``)."""

    world: World
    train: Sequence[Trajectory]
    valid: Sequence[Trajectory]
    valid_lists: Sequence[ListRow] = ()

    @property
    def split_hashes(self) -> dict[str, str]:
        split = self.world.split
        return {"protocol": split.config.describe(),
                **{p: split.fingerprint(p) for p in ("train", "valid", "test")}}


def train_data(world: World, cfg: TrainConfig) -> TrainData:
    """The configured sample of ``world``'s train and validation data."""
    n_valid = max(cfg.valid_examples, cfg.calibration_pages // 4, 1)
    valid_users = world.sample_users(n_valid, cfg.seed, part="valid")
    lists = world.lists("valid", 1, None, cfg.seed)
    pick = np.random.default_rng(cfg.seed).permutation(len(lists))[:cfg.calibration_lists]
    train = experienced(world.trajectories("train", cfg.recommender), world.split.train,
                        cfg.min_history)
    if not train:
        raise ValueError(f"no train visit has {cfg.min_history} earlier train ratings; "
                         "lower --min-history")
    return TrainData(
        world=world, train=train,
        valid=world.trajectories("valid", cfg.recommender, users=valid_users, progress=False),
        valid_lists=[lists[int(i)] for i in sorted(pick)])


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
        with quiet_peft():
            return PeftModel.from_pretrained(lm.model, cfg.init_adapter, is_trainable=True)
    import torch

    torch.manual_seed(cfg.seed)
    with quiet_peft():
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
        return validation_loss(model, lm.tokenizer, valid, weights, cfg.max_len,
                               pair_weight=cfg.pair_weight)

    return train_loop(model, lm.tokenizer, pools, weights, steps, out, cfg, resume=resume,
                      validate=validate if valid else None, stop_after=stop_after,
                      progress=progress)


def _cr_pools(model, lm: LM, cfg: TrainConfig, data: Prepared, trs: Sequence[Transition],
              out: Path, progress: bool) -> list[Example]:
    """Counterfactual examples, cached so a resume skips them (the prediction-aware policy
    examples are built for every transition by ``_with_predictions``, not here)."""
    cache = out / "counterfactuals.jsonl"
    done: list[dict] = []
    if cache.exists():
        done = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    model.eval()
    scorer = Scorer(LM(model=model, tokenizer=lm.tokenizer, name=lm.name))
    teacher = make_teacher(cfg.teacher, lm, cfg.teacher_model)
    generator = scorer if cfg.wm_generate else None
    with cache.open("a") as fh:
        for cr, refl in build_counterfactual(trs[len(done):], scorer, teacher, data.liked,
                                             cfg.k, cfg.seed, generator, progress,
                                             page_format=cfg.wm_format,
                                             rating_cue=cfg.wm_rating_cue):
            row = {"cr": [list(cr.segments), cr.target], "reflection": refl, "meta": cr.meta}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            done.append(row)
    crs = [Example("cr", tuple(r["cr"][0]), r["cr"][1], r["meta"]) for r in done]
    sample = [reflection_record(tr, r["reflection"]) for tr, r in zip(trs, done[:20],
                                                                      strict=False)]
    (out / "reflections_sample.json").write_text(json.dumps(sample, indent=1))
    return crs


@dataclass
class Prepared:
    """Rendered transitions and what calibration needs: everything a fit reads, picklable, so
    a machine without the data stack (e.g. a GPU box) can train from it."""

    train: list[Transition]
    cr: list[Transition]
    valid: list[Transition]
    calib: list[Transition]
    liked: Mapping[int, Sequence[str]]
    data_hashes: dict
    perceiver: Perceiver | None = None
    personas: Mapping[int, str] | None = None
    histories: Mapping[int, Mapping[int, float]] | None = None
    valid_lists: Sequence[tuple[int, list[int], list[int]]] = ()
    # validation users' first pages on each built-in recommender, and the validation visits
    # (pages, ended by exit): what the sampled exit offsets are fitted on
    sessions: Sequence[tuple[int, list[list[int]]]] = ()
    visits: Sequence[tuple[int, bool]] = ()
    # validation list pages of never-evaluated users (``--list-pages``, training.list_pages)
    lists: Sequence[Transition] = ()
    list_valid: Sequence[Transition] = ()  # the first calibration lists' pages: early stopping


def validation_sessions(world: World, valid: Sequence[Trajectory], users: int, seed: int
                        ) -> list[tuple[int, list[list[int]]]]:
    """``users`` validation users' sessions on every built-in recommender: its first pages
    (train items masked), as evaluation's sessions show them."""
    pool = sorted({t.user for t in valid})
    picked = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:users]]
    out = []
    for name in SELECTION:
        rec = world.recommender(name, reactive=False, seed=seed)
        out += [(u, pages_of(rec.rank(u, PAGE_SIZE * MAX_PAGES,
                                      exclude=set(world.histories.get(u, {})))))
                for u in picked]
    return out


def prepare(cfg: TrainConfig, data: TrainData) -> Prepared:
    world = data.world
    pool = _trajectories_for(data.train, cfg.wm_transitions + cfg.cr_transitions, cfg.seed)
    train_trs = transitions(pool, world)
    valid_all = transitions(data.valid, world, full_history=True)
    return Prepared(
        train=_sample(train_trs, cfg.wm_transitions, cfg.seed),
        cr=_sample(train_trs, cfg.cr_transitions, cfg.seed + 1),
        valid=_sample(valid_all, cfg.valid_examples, cfg.seed),
        calib=_sample(valid_all, cfg.calibration_pages, cfg.seed + 2),
        liked=world.liked_genres(),
        data_hashes={"train_trajectories": fingerprint(data.train),
                     "valid_trajectories": fingerprint(data.valid),
                     "split": data.split_hashes,
                     "transitions": {"train": len(train_trs), "valid": len(valid_all)}},
        perceiver=world.perceiver, personas=world.personas, histories=world.histories,
        valid_lists=list(data.valid_lists)[:cfg.calibration_lists],
        sessions=validation_sessions(world, data.valid, cfg.calibration_sessions, cfg.seed + 3)
        if cfg.calibration_sessions and data.valid else (),
        visits=[(len(t.steps), t.end == "exit") for t in data.valid],
        lists=_sample(list_transitions(world, list_rows(world, cfg.seed)), cfg.list_pages,
                      cfg.seed + 4) if cfg.list_pages else (),
        list_valid=list_transitions(world, list(data.valid_lists)[:max(1, cfg.valid_examples // 5)])
        if cfg.list_pages and data.valid_lists else ())


def _with_predictions(model, lm: LM, trs: Sequence[Transition], cfg: TrainConfig,
                      progress: bool = False) -> list[Example]:
    """Policy examples whose context holds the world model's expected ratings, as at run time;
    the expectations of all pages are scored in batched calls."""
    expected = _expectations(model, lm, trs, cfg.wm_rating_cue, progress)
    return [e for t, p in zip(trs, expected, strict=True)
            for e in t.policy_examples(p, cfg.rating_cue)]


def _expectations(model, lm: LM, trs: Sequence[Transition], wm_rating_cue: bool = False,
                  progress: bool = False) -> list[dict[int, float]]:
    """The world model's expected rating of every slot of ``trs``' pages, cached by weights and
    pages: the world model + policy ablation starts from the full agent's world-model weights
    and would score the same pages again (5,000 pages: part of the 3 minutes a GPU fit spent
    outside its timed stages), as would a resumed alignment stage. The scoring code is
    part of the key, so a change to it is never answered from the cache."""
    import hashlib

    from agents import attention, kvcache, packing, policy, scorer, world_model
    from agents.world_model import expectation_requests, expected_ratings_many, wm_cues
    from simulator.readers import cache_root
    from simulator.runs import write_atomic

    model.eval()
    pages = [(t.prefix, len(t.items)) for t in trs]
    h = hashlib.sha256(f"{lm.name}|{lm.device}|{next(model.parameters()).dtype}".encode())
    for module in (attention, kvcache, packing, policy, scorer, world_model):
        h.update(Path(module.__file__).read_bytes())
    base_seen = False
    for name, param in model.named_parameters():
        if "lora_" in name or not base_seen:  # every LoRA weight, and a sample of the base's
            base_seen = base_seen or "lora_" not in name
            h.update(name.encode())
            h.update(param.detach().flatten()[:1 << 20].float().cpu().numpy().tobytes())
    requests = expectation_requests(pages, wm_cues(trs, wm_rating_cue))
    h.update(json.dumps(requests).encode())
    path = cache_root() / "expectations" / f"{h.hexdigest()[:24]}.json"
    if path.is_file():
        return [{int(k): v for k, v in p.items()} for p in json.loads(path.read_text())]
    scoring = Scorer(LM(model=model, tokenizer=lm.tokenizer, name=lm.name), cache_size=128)
    out: list[dict[int, float]] = []
    with tqdm(total=len(pages), desc="world-model expectations", unit="page",
              disable=not progress) as bar:  # minutes on a CPU before a stage's first step
        for i in range(0, len(pages), 128):
            out += expected_ratings_many(scoring, pages[i:i + 128], requests[i:i + 128])
            scoring.clear()
            bar.update(len(pages[i:i + 128]))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out))
    return out


def run_training(cfg: TrainConfig, data: TrainData, out: Path, resume: bool = False,
                 progress: bool = True, lm: LM | None = None,
                 stop_after: int | None = None) -> dict:
    """Prepare the transitions, then fit the configured stage(s)."""
    return fit(cfg, prepare(cfg, data), out, resume, progress, lm, stop_after)


def lacks_list_pages(cfg: TrainConfig, prep: Prepared) -> bool:
    """``--list-pages`` asked of a stage with policy lines, on a file prepared without them."""
    return bool(cfg.list_pages) and cfg.stage != "wm" and not prep.lists


def fit(cfg: TrainConfig, prep: Prepared, out: Path, resume: bool = False,
        progress: bool = True, lm: LM | None = None, stop_after: int | None = None) -> dict:
    """Run the configured stage(s), calibrate on validation; returns (and writes) the manifest."""
    import time

    if lacks_list_pages(cfg, prep):
        raise ValueError("--list-pages: the prepared file holds no list pages; prepare it "
                         "with --list-pages (alignuser train --prepare-only)")
    lists = list(prep.lists) if cfg.list_pages and cfg.stage != "wm" else []  # policy lines
    out.mkdir(parents=True, exist_ok=True)
    lm = lm or load_lm(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model = _peft(lm, cfg)
    wm_trs, valid_trs = prep.train, prep.valid
    result: dict[str, Any] = {}
    balance: dict[str, float] = {}
    cue = cfg.rating_cue
    def wm_pool_of(trs: Sequence[Transition]) -> list[Example]:
        return [e for t in trs for e in t.wm_examples(cfg.wm_format, cfg.wm_rating_cue)]

    wm_pool = wm_pool_of(wm_trs) if cfg.stage != "policy" else []
    if cfg.stage in ("wm", "all"):
        result["wm"] = _stage(model, lm, cfg, {"wm": wm_pool}, {"wm": 1.0}, cfg.wm_steps,
                              out / "stage_wm", wm_pool_of(valid_trs), resume, progress,
                              stop_after)
    if cfg.stage == "policy":
        pols, balance = class_balance([e for t in wm_trs
                                       for e in t.policy_examples(rating_cue=cue)])
        pools, valid = {"policy": pols}, [e for t in valid_trs
                                          for e in t.policy_examples(rating_cue=cue)]
        if lists:
            pools[LIST_KIND] = class_balance(slot_examples(
                [e for t in lists for e in t.policy_examples()]))[0]
            valid += slot_examples([e for t in prep.list_valid for e in t.policy_examples()])
        result["policy"] = _stage(model, lm, cfg, pools, {"policy": 1.0, LIST_KIND: 1.0},
                                  cfg.cr_steps, out / "stage_policy", valid,
                                  resume, progress, stop_after)
    if cfg.stage in ("cr", "all"):
        pols, balance = class_balance(_with_predictions(model, lm, wm_trs, cfg, progress))
        pools = {"policy": pols, "wm": wm_pool}
        weights = {"policy": 1.0, "wm": cfg.lambda_wm, "cr": cfg.lambda_cr, LIST_KIND: 1.0}
        if lists:
            pools[LIST_KIND] = class_balance(slot_examples(
                _with_predictions(model, lm, lists, cfg, progress)))[0]
        if cfg.lambda_cr > 0:  # with λ_CR = 0 the reflections would go unused: not generated
            pools["cr"] = _cr_pools(model, lm, cfg, prep, prep.cr, out, progress)
        # Validated as this agent decides at run time and as it trains here: with the world
        # model's expectations in the prompt (the weights kept are chosen on this loss).
        valid = _with_predictions(model, lm, valid_trs, cfg, progress)
        if lists:
            valid += slot_examples(_with_predictions(model, lm, prep.list_valid, cfg, progress))
        result["cr"] = _stage(model, lm, cfg, pools, weights, cfg.cr_steps, out / "stage_cr",
                              valid, resume, progress, stop_after)
    model.eval()
    t0 = time.perf_counter()
    from training.calibrate import calibrate, session_data

    # Calibrate on merged weights, as load_lm runs the adapter: the offsets then fit the
    # numbers the agent will produce (bf16 merging moves a watch score by up to ~0.1), and a
    # page costs ~15% less. The saved adapter holds the LoRA weights, untouched by merging.
    sessions, visits = session_data(prep)
    model.merge_adapter()
    try:
        calibration = calibrate(Scorer(LM(model=model, tokenizer=lm.tokenizer, name=lm.name),
                                       cache_size=128),
                                prep.calib, world_model=cfg.stage != "policy",
                                perceiver=prep.perceiver, personas=prep.personas,
                                histories=prep.histories, valid_lists=prep.valid_lists,
                                sessions=sessions, visits=visits,
                                seed=cfg.seed, rating_cue=cue,
                                wm_rating_cue=cfg.wm_rating_cue)
    finally:
        model.unmerge_adapter()
    calibration["seconds"] = round(time.perf_counter() - t0, 1)
    save_adapter(model, out, cfg.save_dtype)
    lm.tokenizer.save_pretrained(out)
    manifest = {"kind": "train", "status": "complete", "base_model": lm.name,
                "config": cfg.model_dump(mode="json"),
                "data": {**prep.data_hashes, "wm": len(wm_trs), "valid": len(valid_trs),
                         "list_pages": len(lists)},
                "class_balance": balance, "calibration": calibration,
                "stages": {k: {kk: vv for kk, vv in v.items() if kk != "history"}
                           for k, v in result.items()},
                "final_losses": {k: v["history"][-1] if v["history"] else None
                                 for k, v in result.items()},
                "git_commit": git_commit()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "history.json").write_text(json.dumps({k: v["history"] for k, v in result.items()}))
    _plot_curves(result, out)
    return manifest


def _plot_curves(result: Mapping[str, dict], out: Path) -> None:
    """Training and validation loss per stage, as a PNG beside the manifest."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, max(len(result), 1), figsize=(5 * max(len(result), 1), 3.5),
                             squeeze=False)
    for ax, (stage, res) in zip(axes[0], result.items(), strict=False):
        hist = res["history"]
        seen = [h for h in hist if "loss" in h]  # step 0: the starting weights' validation
        ax.plot([h["step"] for h in seen], [h["loss"] for h in seen], lw=0.8, label="train")
        val = [h for h in hist if "valid" in h]
        ax.plot([h["step"] for h in val], [h["valid"] for h in val], "o-", label="validation")
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    plt.close(fig)
