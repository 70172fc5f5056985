"""Train/valid/test splits of the interaction log that never let a model see its own future.

Both kinds are pure functions of the log and the config, and each part carries a fingerprint, so a
run can prove later which ratings it trained and was scored on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from simulator.data import COLUMNS, DataError, sort_log

PARTS = ("train", "valid", "test")


class SplitConfig(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["user_chrono", "global_time"] = Field(
        "user_chrono", description="user_chrono: each user's latest ratings are held out; "
        "global_time: one calendar cut-off for everybody (later users may be cold-start).")
    valid_frac: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of each user's ratings (user_chrono) or of the "
        "log's timeline (global_time default cut-off) used for validation.")
    test_frac: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of each user's latest ratings (user_chrono) or "
        "of the log's timeline (global_time default cut-off) used for testing.")
    valid_time: int | None = Field(
        None, ge=0, description="global_time only: unix seconds where validation starts; "
        "None = the (1 - valid_frac - test_frac) quantile of timestamps (70th percentile by "
        "default).")
    test_time: int | None = Field(
        None, ge=0, description="global_time only: unix seconds where the test starts; None = the "
        "(1 - test_frac) quantile of timestamps (80th percentile by default).")

    # Checked on the later field, so an error names the option that completes the clash.
    @field_validator("test_frac")
    @classmethod
    def _leaves_training(cls, test_frac: float, info: ValidationInfo) -> float:
        valid_frac = info.data.get("valid_frac", 0.0)
        if valid_frac + test_frac >= 1.0:
            raise ValueError(f"with valid_frac {valid_frac}, valid_frac + test_frac must leave "
                             "some ratings for training")
        return test_frac

    @field_validator("test_time")
    @classmethod
    def _after_valid(cls, test_time: int | None, info: ValidationInfo) -> int | None:
        valid_time = info.data.get("valid_time")
        if test_time is not None and valid_time is not None and valid_time > test_time:
            raise ValueError(f"valid_time {valid_time} must not be later than test_time")
        return test_time

    def describe(self) -> str:
        """The protocol in words, for manifests and reports."""
        if self.kind == "user_chrono":
            return (f"user_chrono: per-user chronological, each user's latest "
                    f"{self.test_frac:.0%} test, the {self.valid_frac:.0%} before it valid")
        valid = (f"unix time {self.valid_time}" if self.valid_time is not None else
                 f"the {1 - self.valid_frac - self.test_frac:.0%} quantile of timestamps")
        test = (f"unix time {self.test_time}" if self.test_time is not None else
                f"the {1 - self.test_frac:.0%} quantile of timestamps")
        return f"global_time: valid from {valid}, test from {test}"


@dataclass
class Split:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    config: SplitConfig

    def part(self, part: str) -> pd.DataFrame:
        if part not in PARTS:
            raise ValueError(f"unknown split part {part!r}; expected one of {', '.join(PARTS)}")
        return getattr(self, part)

    def fingerprint(self, part: str) -> str:
        """Order-independent, so the same ratings hash the same however they were produced."""
        triples = self.part(part)[["user", "item", "timestamp"]].to_numpy(dtype="<i8")
        order = np.lexsort((triples[:, 2], triples[:, 1], triples[:, 0]))
        return hashlib.sha256(np.ascontiguousarray(triples[order]).tobytes()).hexdigest()

    def sizes(self) -> dict[str, int]:
        return {p: len(self.part(p)) for p in PARTS}


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """Python's round() is banker's rounding; half-up keeps counts monotone in n."""
    return np.floor(x + 0.5 + 1e-9).astype("int64")


def _user_chrono(log: pd.DataFrame, cfg: SplitConfig) -> np.ndarray:
    """Label each row 0/1/2 (train/valid/test) from its position within its user's history."""
    n = log.groupby("user")["user"].transform("size").to_numpy()
    pos = log.groupby("user").cumcount().to_numpy()
    n_test = _round_half_up(cfg.test_frac * n)
    n_valid = _round_half_up(cfg.valid_frac * n)
    enough = n >= 3
    if cfg.test_frac > 0:
        n_test = np.where(enough, np.maximum(n_test, 1), n_test)
    if cfg.valid_frac > 0:
        n_valid = np.where(enough, np.maximum(n_valid, 1), n_valid)
    # Keep at least one training rating: shrink validation first, then test.
    over = np.maximum(n_test + n_valid - (n - 1), 0)
    cut_valid = np.minimum(over, n_valid)
    n_valid = n_valid - cut_valid
    n_test = np.maximum(n_test - (over - cut_valid), 0)
    from_end = n - pos  # 1 for the user's latest rating
    return np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_valid, 1, 0))


def global_cutoffs(ratings: pd.DataFrame, cfg: SplitConfig) -> tuple[int, int]:
    """The (valid_time, test_time) a global_time split uses, defaults filled from quantiles."""
    ts = np.sort(ratings["timestamp"].to_numpy(dtype="int64"))
    if len(ts) == 0:
        raise DataError("cannot split an empty interaction log")
    valid_time = cfg.valid_time
    test_time = cfg.test_time
    if valid_time is None:
        valid_time = int(np.quantile(ts, 1.0 - cfg.valid_frac - cfg.test_frac, method="lower"))
    if test_time is None:
        test_time = int(np.quantile(ts, 1.0 - cfg.test_frac, method="lower"))
    if valid_time > test_time:
        raise DataError(f"valid_time {valid_time} is later than test_time {test_time}")
    return valid_time, test_time


def make_split(ratings: pd.DataFrame, config: SplitConfig | None = None) -> Split:
    """Split a log (columns user, item, rating, timestamp) into train/valid/test."""
    cfg = config or SplitConfig()
    log = sort_log(ratings)
    if log.empty:
        raise DataError("cannot split an empty interaction log")
    if cfg.kind == "user_chrono":
        label = _user_chrono(log, cfg)
    else:
        valid_time, test_time = global_cutoffs(log, cfg)
        ts = log["timestamp"].to_numpy()
        label = np.where(ts >= test_time, 2, np.where(ts >= valid_time, 1, 0))
    parts = [log.loc[label == k, COLUMNS].reset_index(drop=True) for k in range(3)]
    return Split(train=parts[0], valid=parts[1], test=parts[2], config=cfg)
