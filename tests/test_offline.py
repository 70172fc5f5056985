"""The offline default reaches no network, and secrets given by environment stay out of runs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from alignuser.config import DataConfig, SimulateConfig
from alignuser.simulate import simulate
from simulator.data import Dataset
from tests.test_cli_errors import write_folder

SECRET = "sk-test-SECRET-7f3a"


def _small(tiny: Path, memory: str = "chroma") -> SimulateConfig:
    return SimulateConfig(data=DataConfig(dataset=str(tiny)), recommenders=["pop"], agents=2,
                          pages=2, policy="popularity", memory=memory, seed=0)


def test_simulate_makes_no_network_call(tiny_dataset: Dataset, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way out (connect, connect_ex, create_connection) raises and is recorded; a
    simulation with the default episodic memory still completes and tried none."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1:] or kwargs)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(OSError, match="offline test"):  # the guard is in place
        socket.socket().connect(("127.0.0.1", 9))
    attempts.clear()
    tiny = write_folder(tiny_dataset, tmp_path / "tiny")
    out = simulate(_small(tiny), tmp_path / "run")
    assert (out / "sessions.jsonl").read_text().count("\n") == 2
    assert (out / "memory").is_dir() and attempts == []


def test_api_key_from_environment_is_never_written(tiny_dataset: Dataset, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    tiny = write_folder(tiny_dataset, tmp_path / "tiny")
    out = simulate(_small(tiny, memory="none"), tmp_path / "run")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "sessions.jsonl", "metrics.json"}
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()
              or b"SECRET" in p.read_bytes()]
    assert leaked == []
