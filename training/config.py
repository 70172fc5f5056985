"""TrainConfig: every training choice in one place, each with its reason as help text.

The paper publishes no loss weights, K, LoRA settings or backbone; these defaults are sized for
a 2-core CPU and a 135M model and are meant to be changed (see README, "Training").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(BaseModel):
    stage: Literal["wm", "policy", "cr", "all"] = Field(
        "all", description="wm = world model only (stage 1); policy = SFT on human actions only "
        "(ablation); cr = counterfactual alignment on top of --init-adapter; all = wm then cr")
    model: str = Field("default", description="base causal LM ('default' = SmolLM2-135M-Instruct)")
    init_adapter: str | None = Field(None, description="adapter to continue from (stage cr)")
    dataset: str = Field("ml-100k", description="dataset whose TRAIN split builds D_rollout")
    recommender: str = Field("exposure", description="what fills the human pages' other slots: "
                             "'exposure' (the trajectory config's mixture) or one recommender")
    wm_steps: int = Field(100, ge=0, description="optimizer steps of stage 1 (world model)")
    cr_steps: int = Field(60, ge=0,
                          description="optimizer steps of stage 2 (or of policy-only SFT)")
    batch_size: int = Field(4, ge=1, description="units per step: a unit is all of a page's "
                            "examples of a pool, trained from one forward of the page (4 policy "
                            "pages = 20 examples ~ 9 s on 2 cores); other examples count one each")
    max_len: int = Field(1024, ge=16,
                         description="tokens per example; prompts are cut from the left")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate for the LoRA weights")
    warmup: int = Field(10, ge=0, description="linear warm-up steps")
    lora_r: int = Field(16, ge=1,
                        description="LoRA rank (r=16 on all projections: a ~20 MB adapter)")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.0, ge=0, lt=1,
                                description="LoRA dropout (masks cost ~10%% of a CPU step)")
    lambda_wm: float = Field(0.5, ge=0, description="weight of the world-model loss in stage 2")
    lambda_cr: float = Field(1.0, ge=0, description="weight of the counterfactual-reflection loss; "
                             "0 trains world model + policy without reflections (ablation)")
    k: int = Field(3, ge=1, description="counterfactual alternatives per human step")
    teacher: Literal["grounded", "local", "chat"] = Field(
        "grounded", description="reflection writer: grounded (offline, cites numbers), local "
        "(the base model writes free text; weak at 135M) or chat (--teacher-model writes it)")
    teacher_model: str | None = Field(None, description="teacher chat: PROVIDER:MODEL or "
                                      "pkg.module:factory, as simulate's --chat-model")
    wm_format: Literal["titles", "genres"] = Field(
        "titles", description="how stage 1's next state names the next page: titles (each "
        "item with its genres, as the shipped adapters were trained) or genres (the page's "
        "genre mix only: the titles depend on the recommender, which the state does not show; "
        "see docs/training-experiments.md)")
    wm_rating_cue: bool = Field(False, description="the world model rates each slot after "
                                "that slot's rating cue line (agents.text.rating_cue), in "
                                "stage 1 and in its expected ratings; off (the shipped "
                                "adapters' format): after the action alone, many lines below "
                                "the item's numbers, where a small model expected nearly one "
                                "rating for every slot of a page (docs/training-experiments.md)")
    wm_generate: bool = Field(False, description="also generate each alternative's next page "
                              "with the world model (slow on CPU: ~3 s per alternative)")
    min_history: int = Field(5, ge=0, description="leave out train visits whose person had "
                             "fewer train ratings before the visit: with an empty history every "
                             "match cue reads 0/100, so such pages teach deciding by popularity "
                             "and title alone (0 keeps all; chosen on validation lists, see "
                             "README, Training)")
    list_pages: int = Field(0, ge=0, description="validation 1:1 list pages of users who have "
                            "no 1:1 test list (so never on an evaluated list) trained beside "
                            "the policy's pages, half of each batch, watch/skip lines only: the "
                            "footing of the feature-regression bar, which is fit on validation "
                            "lists (training.list_pages; 0 = off, the shipped adapters)")
    wm_transitions: int = Field(2000, ge=1, description="train transitions sampled for stage 1")
    cr_transitions: int = Field(100, ge=1, description="train transitions given counterfactuals")
    valid_examples: int = Field(24, ge=0, description="validation examples for early stopping")
    eval_every: int = Field(40, ge=1, description="steps between validation losses (the "
                            "starting weights and a stage's last step are validated too)")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    save_every: int = Field(20, ge=1, description="steps between resumable checkpoints")
    grad_checkpointing: bool = Field(False, description="trade ~30%% speed for ~45%% less RAM")
    detach_head: bool = Field(False, description="no gradient through a page's shared persona "
                              "and page blocks: the weights learn only from the lines after "
                              "them, and a step costs about half (training.batches)")
    rating_cue: bool = Field(False, description="train each rating line after its own cue "
                             "line (the item's mean rating, the person's ratings of its closest "
                             "items: agents.text.rating_cue), as the agent then rates; off (the "
                             "shipped adapters' format): the ratings follow the choices alone. "
                             "Recorded in the manifest, so the agent rates in the format it was "
                             "trained on")
    pair_weight: float = Field(0.0, ge=0, description="weight of a within-page ranking loss "
                               "on the watch/skip log-odds (training.trainer.pair_loss): per-user "
                               "AUC only ranks a person's items, and this term ignores a page's "
                               "level; 0 = off")
    dtype: Literal["auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16"] = Field(
        "auto", description="auto (bf16 when the CPU has it), bfloat16, float32")
    calibration_pages: int = Field(400, ge=0, description="validation pages that fit the watch and "
                                   "exit offsets (agents.decide.Calibration)")
    calibration_lists: int = Field(100, ge=0, description="validation 1:1 lists that fit the 1:m "
                                   "list offset")
    calibration_sessions: int = Field(20, ge=0, description="validation users whose sessions "
                                      "on each of the 5 built-in recommenders' pages fit the "
                                      "sampled exit offset, so simulated sessions end by exit "
                                      "as often as validation visits do (0: the offset fitted "
                                      "on pages is kept)")
    time_budget_s: float | None = Field(None, gt=0, description="stop each stage after this many "
                                        "seconds (checkpointed; None = run all steps)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present), cpu or cuda")
    save_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="adapter file dtype: bfloat16 (half the size) or float32")
    seed: int = Field(0, ge=0, description="seeds data order, sampling and LoRA init")

    @model_validator(mode="after")
    def _every_stage_trains(self) -> TrainConfig:
        """A stage of zero steps would save an untrained adapter as if it were trained."""
        steps = {"wm": ("wm_steps",), "policy": ("cr_steps",), "cr": ("cr_steps",),
                 "all": ("wm_steps", "cr_steps")}[self.stage]
        for name in steps:
            if getattr(self, name) < 1:
                what = "the world model" if name == "wm_steps" else "the policy"
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: stage "
                                 f"{self.stage} trains {what} and needs at least 1 step "
                                 "(to skip the world model: --stage cr --init-adapter DIR)")
        if self.stage == "cr" and not self.init_adapter:
            raise ValueError("--stage cr aligns an existing world model and needs "
                             "--init-adapter DIR (an adapter from --stage wm); --stage all "
                             "trains both")
        return self

    @model_validator(mode="after")
    def _chat_teacher_needs_model(self) -> TrainConfig:
        if self.teacher == "chat" and not self.teacher_model:
            raise ValueError("teacher chat needs --teacher-model PROVIDER:MODEL or "
                             "pkg.module:factory")
        return self


def config_flags(parser, model: type[BaseModel]) -> None:
    """One flag per field of ``model``, with its help text and default (one source of both)."""
    for name, field in model.model_fields.items():
        flag = flag_of((name,))
        if field.annotation is bool:
            parser.add_argument(flag, action="store_true", help=field.description)
        else:
            parser.add_argument(flag, default=None, help=f"{field.description} "
                                f"(default: {field.default})")


def parse_config(model: type[BaseModel], args) -> BaseModel:
    given = {k: v for k, v in vars(args).items()
             if k in model.model_fields and v not in (None, False)}
    return model.model_validate(given)


def flag_of(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the flag that set it: ('data', 'dataset') -> --dataset."""
    names = [str(part) for part in loc if isinstance(part, str)]
    return "--" + names[-1].replace("_", "-") if names else ""


def validation_line(exc: ValidationError) -> str:
    """Every field error of a config on one line, named by its flag and the value given: the
    front door and ``python -m training.fit_prepared`` print the same line."""
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        value = err.get("input")
        given = f" {value}" if isinstance(value, int | float | str) else ""
        head = f"{flag_of(err['loc'])}{given}".strip()
        parts.append(f"{head}: {msg}" if head else msg)
    return "; ".join(parts)
