from __future__ import annotations

import json
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


def test_up_rolls_out_on_real_services_and_stops_cleanly(tmp_path: Path, policy_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_")}
    env |= {
        "SENTINEL_RUN_DIR": str(tmp_path),
        "SENTINEL_MONITOR__INTERVAL_S": "0.5",
        "SENTINEL_LLM__POLICY__BASE_URL": policy_url,
        "SENTINEL_LLM__USER_SIM__BASE_URL": policy_url,
        "SENTINEL_ROLLOUT__MAX_AGENT_TURNS": "2",
        "SENTINEL_ROLLOUT__MAX_TOKENS": "64",
        "SENTINEL_ROLLOUT__USER_MAX_TOKENS": "32",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sentinel", "--log-format", "json", "up", "--tasks", "1",
         "--group-size", "2"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("redis started") < names.index("rollout group")
    assert names[-1] == "redis stopped"
    assert "pass^k" in result.stdout
    trajectories = next(
        line for line in result.stdout.splitlines() if line.strip().startswith("│ trajectories")
    )
    assert trajectories.split("│")[2].strip() == "2"  # both rollouts were published
    assert (tmp_path / "redis" / "appendonly.aof").exists()
    assert not (tmp_path / "redis" / "server.json").exists()
