"""Render a metrics dict as metrics.json, report.md and a self-contained report.html.

Every number shown comes from the metrics dict; a section without data says "not run", so a
report can never look more complete than the run that produced it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TITLE = "AlignUSER evaluation report"
NOT_RUN = "not run"
NOT_RECORDED = "not recorded"

# (metrics key, section title, one-line protocol reminder); titles are what tests check.
_SECTION_SPECS: tuple[tuple[str, str, str], ...] = (
    ("setup", "Setup", "Where and how these numbers were produced."),
    ("discrimination", "Preference discrimination",
     "Agent4Rec 1:m protocol: per user, held-out rated items (any rating) against never-rated "
     "items; the simulator answers watch yes/no per item; scores averaged over users."),
    ("rating", "Rating",
     "RMSE/MAE on raw held-out 1-5 ratings beside matrix factorisation on the same split; the "
     "paper's rating protocol is unpublished, so its figures are not directly comparable."),
    ("next_action", "Next action",
     "Per page: which items were watched (exact set, Jaccard) and whether the user went on or "
     "exited, against held-out human steps."),
    ("world_model", "World model",
     "Next-state F1 over state fields on held-out transitions, beside a trivial baseline; below "
     "0.70 the model has not learned the dynamics."),
    ("distributions", "Session distributions",
     "Human vs simulated session statistics: Wasserstein-1 distance and two-sample KS test."),
    ("discriminator", "Discriminator AUC",
     "Cross-validated ROC AUC of a classifier telling human sessions from simulated ones: "
     "0.5 = indistinguishable, 1.0 = trivially told apart."),
    ("judge", "Judge human-likeness",
     "An LLM judge scores each trajectory 1-5 for human-likeness."),
    ("explain", "What the decisions depend on",
     "R² of a linear model of the agent's decisions on cue groups: alone, and the drop when the "
     "group is removed. A single group explaining over 90% means the policy is mostly one cue."),
    ("selection", "Recommender selection",
     "Agreement between the recommender ordering from simulation and the true ordering "
     "(held-out or A/B), beside the ordering from an offline metric; CIs resample users."),
    ("paired", "Paired differences", "Per-user paired differences with bootstrap CIs."),
)
SECTIONS: tuple[str, ...] = tuple(title for _, title, _ in _SECTION_SPECS)
SETUP_FIELDS = ("machine", "command", "wall_time_s", "dataset", "split", "seed", "checkpoint")
_SMALL_JUDGE_B = 30.0  # judges below this many billion parameters get the caveat

Block = tuple[str, Any]  # ("p"|"warn"|"table"|"img", payload)


def fmt(value: Any) -> str:
    """One cell as text; NaN shows as n/a rather than a misleading number."""
    if value is None:
        return "-"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return "n/a"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3f}"
    if isinstance(value, list | tuple | np.ndarray) and len(value) == 2:
        return f"[{fmt(value[0])}, {fmt(value[1])}]"
    return str(value)


def _records(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, pd.DataFrame):
        return value.to_dict(orient="records")
    return [dict(r) for r in value]


def _table(rows: list[dict[str, Any]]) -> Block:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return ("table", (cols, [[fmt(r.get(c)) for c in cols] for r in rows]))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[list[str]]:
    out: list[list[str]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append([f"{prefix}{k}", fmt(v)])
    return out


def _generic(value: Any) -> list[Block]:
    if isinstance(value, pd.DataFrame) or (isinstance(value, Sequence)
                                           and not isinstance(value, str)):
        rows = _records(value)
        return [_table(rows)] if rows else [("p", NOT_RUN)]
    if not isinstance(value, Mapping):
        return [("p", fmt(value))]
    blocks: list[Block] = []
    scalars = {k: v for k, v in value.items() if k not in ("rows", "note", "notes")}
    if scalars:
        blocks.append(("table", (["quantity", "value"], _flatten(scalars))))
    if value.get("rows") is not None and len(value["rows"]):
        blocks.append(_table(_records(value["rows"])))
    notes = list(value.get("notes") or []) + ([value["note"]] if value.get("note") else [])
    blocks.extend(("p", str(n)) for n in notes)
    return blocks or [("p", NOT_RUN)]


def _rows_of(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, Mapping):
        value = value.get("rows")
    if value is None or isinstance(value, str):
        return []
    return _records(value)


def _checks(key: str, value: Any) -> list[Block]:
    """Section-specific warnings derived only from what the metrics dict contains."""
    rows = _rows_of(value)
    if key == "rating" and not any(re.search(r"\bmf\b|matrix", str(r.get("method", "")).lower())
                                   for r in rows):
        return [("warn", f"MF baseline: {NOT_RUN}.")]
    if key == "judge" and isinstance(value, Mapping):
        size = value.get("judge_params_b")
        small = bool(value.get("local")) or (size is not None and float(size) < _SMALL_JUDGE_B)
        if small:
            name = value.get("judge_model", "the judge")
            return [("warn", f"Caveat: {name} is a small local model; its scores are not "
                             "comparable to the paper's GPT-4o judge and may reward surface "
                             "style.")]
    if key == "explain" and rows:
        dom = [r for r in rows if r.get("dominant")]
        if dom:
            return [("warn", f"One cue explains >90% of the decisions: {r['group']} "
                             f"(R² alone {fmt(r.get('r2_alone'))}).") for r in dom]
        return [("p", "No single cue group explains more than 90% of the decisions.")]
    return []


def _setup_blocks(value: Any) -> list[Block]:
    if not isinstance(value, Mapping) or not value:
        return [("p", NOT_RUN)]
    keys = list(SETUP_FIELDS) + [k for k in value if k not in SETUP_FIELDS]
    rows = [[k, fmt(value[k]) if k in value else NOT_RECORDED] for k in keys]
    return [("table", (["field", "value"], rows))]


def _png(fig: Any) -> bytes:
    if isinstance(fig, bytes | bytearray):
        return bytes(fig)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, pd.DataFrame):
        return _jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray | pd.Series):
        return [_jsonable(v) for v in list(obj)]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(float(obj)) else None  # strict JSON has no NaN
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _md(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, payload in blocks:
        if kind == "table":
            cols, rows = payload
            esc = [[c.replace("|", "\\|") for c in row] for row in [cols, *rows]]
            out.append("\n".join(["| " + " | ".join(esc[0]) + " |",
                                  "|" + "---|" * len(cols)]
                                 + ["| " + " | ".join(r) + " |" for r in esc[1:]]))
        elif kind == "img":
            out.append(f"![{payload[0]}]({payload[1]})")
        else:
            out.append(f"**{payload}**" if kind == "warn" else payload)
    return "\n\n".join(out)


def _html(blocks: list[Block]) -> str:
    out: list[str] = []
    for kind, payload in blocks:
        if kind == "table":
            cols, rows = payload
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                           for r in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(payload[2]).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(payload[0])}" '
                       f'src="data:image/png;base64,{data}"></figure>')
        else:
            cls = ' class="warn"' if kind == "warn" else ""
            out.append(f"<p{cls}>{html.escape(payload)}</p>")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "color:#222}table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;"
        "padding:.2rem .5rem;text-align:left}th{background:#f3f3f3}.warn{color:#a40000;"
        "font-weight:bold}.intro{color:#555}img{max-width:100%}")


def write_report(metrics: Mapping[str, Any], out_dir: Path,
                 plots: Mapping[str, Figure | bytes] | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and one PNG per plot; return their paths.

    A plot keyed by a section key, alone or before a slash (``distributions``,
    ``selection/ranking``), sits in that section; others go under a closing Figures heading.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: dict[str, tuple[str, str, bytes]] = {}
    for key, fig in (plots or {}).items():
        name = re.sub(r"[^A-Za-z0-9_-]", "_", key) + ".png"
        data = _png(fig)
        (out_dir / name).write_bytes(data)
        paths[name] = out_dir / name
        images[key] = (key, name, data)
    dataset = (metrics.get("setup") or {}).get("dataset")
    title = f"{TITLE}: {dataset}" if dataset else TITLE
    md_parts, html_parts = [f"# {title}"], []
    sections = [(key, sec, intro) for key, sec, intro in _SECTION_SPECS]
    placed = {key: [k for k in images if k.split("/")[0] == key] for key, _, _ in sections}
    extra = [k for k in images if k.split("/")[0] not in placed]
    if extra:
        sections.append(("figures", "Figures", ""))
        placed["figures"] = extra
    for key, sec, intro in sections:
        value = metrics.get(key)
        if key == "setup":
            blocks = _setup_blocks(value)
        elif value is None:
            blocks = [("p", NOT_RUN)] if key != "figures" else []
        else:
            blocks = _generic(value) + _checks(key, value)
        blocks += [("img", images[k]) for k in placed[key]]
        md_parts.append(f"## {sec}\n\n" + (f"_{intro}_\n\n" if intro else "") + _md(blocks))
        intro_html = f'<p class="intro">{html.escape(intro)}</p>\n' if intro else ""
        html_parts.append(f'<section id="{key}">\n<h2>{html.escape(sec)}</h2>\n'
                          f"{intro_html}{_html(blocks)}\n</section>")
    toc = "".join(f'<li><a href="#{k}">{html.escape(s)}</a></li>' for k, s, _ in sections)
    page = ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<main>\n<h1>{html.escape(title)}</h1>\n<nav><ul>{toc}</ul></nav>\n"
            + "\n".join(html_parts) + "\n</main>\n</body>\n</html>\n")
    paths["metrics.json"] = out_dir / "metrics.json"
    paths["metrics.json"].write_text(json.dumps(_jsonable(metrics), indent=2, allow_nan=False))
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n\n".join(md_parts) + "\n", encoding="utf-8")
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(page, encoding="utf-8")
    return paths


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
