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

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TITLE = "AlignUSER evaluation report"
NOT_RUN = "not run"
NOT_RECORDED = "not recorded"

# (metrics key, section title, one-line protocol reminder); titles are what tests check.
_SECTION_SPECS: tuple[tuple[str, str, str], ...] = (
    ("answer", "Which recommender to ship",
     "The recommender with the most likes per page in simulation, with a 95% CI over agents, how "
     "often it stays first when agents are resampled, and its lead over the runner-up; beside "
     "what the offline metric and the held-out humans would choose."),
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
    ("sessions_by_recommender", "Sessions per recommender",
     "What the simulated sessions held on each recommender: watch ratio, likes per page, pages "
     "per session and the share of sessions that ended by exit."),
    ("selection", "Recommender selection",
     "Agreement between the recommender ordering from simulation and the true ordering "
     "(held-out or A/B), beside the ordering from an offline metric; CIs resample users."),
    ("paired", "Paired differences", "Per-user paired differences with bootstrap CIs."),
    ("paired_pages", "Paired differences on held-out pages",
     "Each agent's agreement with the humans' watched sets minus the simulating agent's, per "
     "user, with bootstrap CIs."),
)
SECTIONS: tuple[str, ...] = tuple(title for _, title, _ in _SECTION_SPECS)
SETUP_FIELDS = ("machine", "command", "wall_time_s", "dataset", "split", "seed", "checkpoints")
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


def _answer_blocks(answer: Any) -> list[Block]:
    """The opening verdict, in words first, then the numbers behind it."""
    if not isinstance(answer, Mapping) or not answer:
        return [("p", NOT_RUN)]
    words, rows = [], []
    for source, a in answer.items():
        line = (f"{source}: ship {a['recommender']} (mean {fmt(a['mean'])}, 95% CI "
                f"{fmt(a['ci'])}; first in {a['p_first']:.0%} of resamples")
        if a.get("runner_up"):
            line += f"; lead over {a['runner_up']} {fmt(a['lead'])}, CI {fmt(a['lead_ci'])}"
        words.append(("p", line + ")."))
        rows.append({"source": source, **{k: a.get(k) for k in (
            "recommender", "mean", "ci", "p_first", "runner_up", "lead", "lead_ci", "n_users")}})
    sim = next(iter(answer.values()))
    agree = [s for s, a in list(answer.items())[1:] if a["recommender"] == sim["recommender"]]
    if sim.get("runner_up") and not sim.get("lead"):
        verdict = (f"The simulation cannot choose: {sim['recommender']} and {sim['runner_up']} tie "
                   f"(mean {fmt(sim['mean'])}); more agents or pages are needed.")
    else:
        verdict = (f"The simulation would ship {sim['recommender']}"
                   + (f", as would the {' and the '.join(agree)}." if agree else
                      "; neither the offline metric nor the held-out humans agree."))
    return [("p", verdict), *words, _table(rows)]


def _setup_blocks(value: Any) -> list[Block]:
    if not isinstance(value, Mapping) or not value:
        return [("p", NOT_RUN)]
    keys = list(SETUP_FIELDS) + [k for k in value if k not in SETUP_FIELDS]
    rows = [[k, fmt(value[k]) if k in value else NOT_RECORDED] for k in keys]
    return [("table", (["field", "value"], rows))]


def png_bytes(fig: Any) -> bytes:
    """A figure as PNG bytes (already rendered bytes pass through): reports, section parts and
    simulate runs save their plots the same way."""
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
        data = png_bytes(fig)
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
        if key == "answer":
            blocks = _answer_blocks((metrics.get("selection") or {}).get("answer"))
        elif key == "setup":
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
    stored = {**metrics, "plots": {k: name for k, (_, name, _) in images.items()}}
    paths["metrics.json"].write_text(json.dumps(_jsonable(stored), indent=2, allow_nan=False))
    paths["report.md"] = out_dir / "report.md"
    paths["report.md"].write_text("\n\n".join(md_parts) + "\n", encoding="utf-8")
    paths["report.html"] = out_dir / "report.html"
    paths["report.html"].write_text(page, encoding="utf-8")
    return paths


def rerender(run_dir: Path) -> dict[str, Path]:
    """Write the report of a finished run again from its metrics.json and PNGs, computing
    nothing (e.g. after the report's layout changed)."""
    run_dir = Path(run_dir)
    source = run_dir / "metrics.json"
    if not source.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.json (is it an evaluate run folder?)")
    try:
        metrics = json.loads(source.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON ({exc})") from None
    names = metrics.pop("plots", {}) or {}
    missing = [n for n in names.values() if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: plot(s) {', '.join(missing)} are missing")
    return write_report(metrics, run_dir, {k: (run_dir / n).read_bytes()
                                           for k, n in names.items()})
