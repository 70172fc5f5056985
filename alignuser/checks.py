"""Checks of the files a command is given, made before any data or model loads.

A broken adapter otherwise surfaces minutes later as a library error (safetensors, PEFT) that
names neither the flag nor the file; here it is one line naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A PEFT adapter folder whose config parses and whose weights file has a readable header."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file; pass the adapter folder (the one "
                                 "holding adapter_config.json and adapter_model.safetensors)")
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{flag} {path} has no adapter_config.json: not an adapter "
                                "folder")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag} {path}: adapter_config.json is not valid JSON ({exc})") from None
    weights = [folder / name for name in ADAPTER_FILES if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{flag} {path} has no adapter_model.safetensors")
    if weights[0].suffix == ".safetensors":
        _check_safetensors(weights[0], flag)
    return folder


def int_list(flag: str, text: str) -> list[int]:
    """A comma-separated list of whole numbers, e.g. ``--ms 1,3,9``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated whole numbers, "
                         "e.g. 1,3,9") from None


def _check_safetensors(file: Path, flag: str) -> None:
    """Read the header only (the tensors stay on disk): a truncated or foreign file fails here."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as fh:
            names = list(fh.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError subtypes
        raise ValueError(f"{flag}: {file} is not a readable safetensors file "
                         f"({str(exc).strip() or type(exc).__name__})") from None
    if not names:
        raise ValueError(f"{flag}: {file} holds no tensors")
