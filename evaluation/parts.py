"""What an evaluate run has finished, committed as it finishes, so a killed run resumes.

Inside the (staged) run folder, ``parts/`` holds one ``outputs-<method>.pkl`` per method whose
answers are computed, a ``partial-<method>.pkl`` with the finished parts of a method cut short
(each list ratio, the held-out pages, ...), and one ``section-<name>.json`` (with its plots as
PNGs beside it) per section scored. Every file is written whole or not at all
(``simulator.runs.write_atomic``); a section's JSON is written after its plots, so its presence
means the section is complete.

Sections always reach the report through their JSON, in a run that is resumed and in one that
is not, so both write the same metrics.json and report.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluation.report import png_bytes
from evaluation.sections import Result
from simulator.runs import write_atomic


def _plain(obj: Any) -> Any:
    """numpy and pandas values as JSON; NaN stays NaN (Python's JSON reads it back)."""
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict(orient="records")
    if isinstance(obj, np.ndarray | pd.Series):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


class Parts:
    """The ``parts/`` folder of one run."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "parts"

    def __bool__(self) -> bool:
        return self.dir.is_dir() and any(self.dir.glob("*-*.*"))

    def _read(self, kind: str) -> dict[str, dict[str, Any]]:
        return {f.stem.removeprefix(f"{kind}-"): pickle.loads(f.read_bytes())
                for f in sorted(self.dir.glob(f"{kind}-*.pkl"))}

    def _write(self, kind: str, method: str, answers: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / f"{kind}-{method}.pkl", pickle.dumps(answers))

    def outputs(self) -> dict[str, dict[str, Any]]:
        """The answers of every method already finished."""
        return self._read("outputs")

    def save_outputs(self, method: str, outputs: dict[str, Any]) -> None:
        self._write("outputs", method, outputs)
        (self.dir / f"partial-{method}.pkl").unlink(missing_ok=True)

    def partial_outputs(self) -> dict[str, dict[str, Any]]:
        """The finished parts (list ratios, held-out pages, ...) of methods cut short."""
        return self._read("partial")

    def save_partial(self, method: str, outputs: dict[str, Any]) -> None:
        self._write("partial", method, outputs)

    def section(self, name: str) -> Result | None:
        """A finished section, or None when it has not been committed."""
        file = self.dir / f"section-{name}.json"
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        return Result(data["metrics"], {k: (self.dir / png).read_bytes()
                                        for k, png in data["plots"].items()})

    def save_section(self, name: str, result: Result) -> Result:
        """Commit ``result`` and return it as read back (plain JSON values, PNG bytes)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        names = {}
        for key, fig in result.plots.items():
            names[key] = f"section-{name}--{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.png"
            write_atomic(self.dir / names[key], png_bytes(fig))
        text = json.dumps({"metrics": result.metrics, "plots": names}, default=_plain, indent=1)
        write_atomic(self.dir / f"section-{name}.json", text)
        return Result(json.loads(text)["metrics"], {k: (self.dir / png).read_bytes()
                                                    for k, png in names.items()})
