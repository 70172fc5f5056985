"""The report's figures: matplotlib Figures the report embeds and saves as PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_session_outcomes(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per session outcome, one bar per recommender: what each would be shipped on."""
    frame = pd.DataFrame(list(rows))
    outcomes = [c for c in ("watch_ratio", "likes_per_page", "pages_per_session", "exit_share")
                if c in frame]
    fig = Figure(figsize=(3.2 * max(len(outcomes), 1), 3.0), layout="constrained")
    axes = fig.subplots(1, max(len(outcomes), 1), squeeze=False)[0]
    for ax, col in zip(axes, outcomes, strict=False):
        ax.bar(frame["recommender"].astype(str), frame[col].to_numpy(dtype=float),
               color="tab:blue")
        ax.set_title(col.replace("_", " "))
        if col in ("watch_ratio", "exit_share"):
            ax.set_ylim(0, 1)  # shares: an empty bar reads as 0, not as a missing panel
        ax.tick_params(axis="x", labelrotation=45)
    return fig


def _hist_bins(values: np.ndarray) -> np.ndarray:
    """Unit bins for small integer data (pages, watches, ratings), automatic bins otherwise."""
    lo, hi = float(values.min()), float(values.max())
    if np.all(np.equal(np.mod(values, 1), 0)) and hi - lo <= 60:
        return np.arange(lo - 0.5, hi + 1.5)
    return np.histogram_bin_edges(values, bins="auto")[:62]


def plot_distributions(human: Mapping[str, Sequence[float]],
                       sim: Mapping[str, Sequence[float]]) -> Figure:
    """One panel per session statistic, normalised so samples of different sizes compare."""
    names = list(human) + [k for k in sim if k not in human]
    fig = Figure(figsize=(3.6 * max(len(names), 1), 3.0), layout="constrained")
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        h = np.asarray(human.get(name, []), dtype=float)
        s = np.asarray(sim.get(name, []), dtype=float)
        both = np.concatenate([h, s])
        ax.set_title(name)
        if both.size == 0:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        bins = _hist_bins(both)
        if h.size:
            ax.hist(h, bins=bins, density=True, alpha=0.5, label=f"human (n={h.size})")
        if s.size:
            ax.hist(s, bins=bins, density=True, histtype="step", linewidth=2,
                    label=f"simulated (n={s.size})")
        ax.legend(fontsize="small")
    return fig


def _err(table: pd.DataFrame, metric: str) -> np.ndarray | None:
    vals = table[metric].to_numpy(dtype=float)
    for lo, hi in ((f"{metric}_lo", f"{metric}_hi"), ("lo", "hi")):
        if lo in table and hi in table:
            low = vals - table[lo].to_numpy(dtype=float)
            high = table[hi].to_numpy(dtype=float) - vals
            return np.nan_to_num(np.vstack([low, high]).clip(min=0))
    if f"{metric}_std" in table:
        return np.nan_to_num(table[f"{metric}_std"].to_numpy(dtype=float))
    return None


def plot_method_bars(table: pd.DataFrame, metric: str) -> Figure:
    """Bars per method (grouped by 1:m when an ``m`` column exists), with CI bars if given."""
    frame = table.reset_index() if "method" not in table else table.reset_index(drop=True)
    if metric not in frame:
        raise ValueError(f"plot_method_bars: no column {metric!r}")
    groups = sorted(frame["m"].unique()) if "m" in frame else [None]
    methods = list(dict.fromkeys(frame["method"]))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(max(4.0, 1.2 * len(groups) * len(methods) ** 0.5 + 2) + 2.5, 3.2),
                 layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20" if len(methods) > 10 else "tab10"].colors
    for j, method in enumerate(methods):
        sub = frame[frame["method"] == method]
        xs = np.array([groups.index(g) for g in sub["m"]]) if "m" in sub else np.zeros(len(sub))
        ax.bar(xs + (j - (len(methods) - 1) / 2) * width, sub[metric].to_numpy(dtype=float),
               width, yerr=_err(sub, metric), capsize=3, label=str(method),
               color=colours[j % len(colours)])
    if metric == "auc":
        ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance (AUC 0.5)")
    ax.set_xticks(range(len(groups)), [f"1:{g}" if g is not None else "" for g in groups])
    ax.set_ylabel(metric)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def plot_ranking(truth: Mapping[str, float], predicted: Mapping[str, float],
                 cis: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """True vs simulated score per recommender; a monotone cloud means the same selection."""
    keys = sorted(set(truth) & set(predicted))
    x = np.array([truth[k] for k in keys], dtype=float)
    y = np.array([predicted[k] for k in keys], dtype=float)
    fig = Figure(figsize=(4.5, 3.6), layout="constrained")
    ax = fig.subplots()
    yerr = None
    if cis:
        bounds = np.array([cis.get(k, (v, v)) for k, v in zip(keys, y, strict=True)], dtype=float)
        yerr = np.nan_to_num(np.vstack([y - bounds[:, 0], bounds[:, 1] - y]).clip(min=0))
    ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=3)
    for k, xi, yi in zip(keys, x, y, strict=True):
        ax.annotate(k, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("true outcome")
    ax.set_ylabel("simulated outcome")
    return fig
