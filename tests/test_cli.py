from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from sentinel.cli import app

runner = CliRunner()


def _command_paths(group: typer.Typer) -> list[list[str]]:
    root = get_command(group)
    paths: list[list[str]] = [[]]
    for name, command in getattr(root, "commands", {}).items():
        paths.append([name])
        paths.extend([name, sub] for sub in getattr(command, "commands", {}))
    return paths


@pytest.mark.parametrize("path", _command_paths(app), ids=lambda p: " ".join(p) or "sentinel")
def test_every_command_has_help(path: list[str]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_broken_config_exits_nonzero_with_one_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("bus: {max_deliveries: -1}\n")
    result = runner.invoke(app, ["--config", str(path), "config"])
    assert result.exit_code == 2
    assert "bus.max_deliveries: Input should be greater than or equal to 1" in result.stderr


def test_status_without_redis_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SENTINEL_REDIS_URL", raising=False)
    monkeypatch.setenv("SENTINEL_RUN_DIR", str(tmp_path))
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 3
    assert "set SENTINEL_REDIS_URL" in result.stderr


def test_up_starts_embedded_redis_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_")}
    env |= {"SENTINEL_RUN_DIR": str(tmp_path), "SENTINEL_MONITOR__INTERVAL_S": "0.2"}
    result = subprocess.run(
        [sys.executable, "-m", "sentinel", "--log-format", "json", "up", "--duration", "1"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"event": "redis started"' in result.stderr
    assert '"event": "queue"' in result.stderr
    assert '"event": "redis stopped"' in result.stderr
    assert "SENTINEL queues" in result.stdout
    assert (tmp_path / "redis" / "appendonly.aof").exists()
    assert not (tmp_path / "redis" / "server.json").exists()
