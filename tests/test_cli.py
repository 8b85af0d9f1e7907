from __future__ import annotations

from pathlib import Path

import pytest
import typer
from redis.exceptions import TimeoutError as RedisTimeoutError
from typer.main import get_command
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.config import Settings

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


def test_up_refuses_a_bad_mode_before_starting_anything(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["up", "--mode", "sideways"], env={"SENTINEL_RUN_DIR": str(tmp_path)}
    )
    assert result.exit_code == 2
    assert "bad option" in result.stderr
    assert not (tmp_path / "redis").exists()


def test_report_on_a_directory_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "artifacts/ directory: is it a run?" in result.stderr


@pytest.mark.anyio
async def test_up_outlives_a_redis_timeout_in_its_progress_bar(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starved Redis (seconds without an answer) once took the whole stack down through
    the progress bar's poll; the bar now waits for the next second, the run goes on."""
    from sentinel.cli import runs
    from sentinel.orchestrator import loop

    real, calls = loop.loop_progress, []

    async def starved(*args: object) -> loop.Progress:
        calls.append(1)
        if len(calls) <= 2:
            raise RedisTimeoutError("Timeout reading from 127.0.0.1")
        return await real(*args)  # type: ignore[arg-type]

    class Stack:
        """The supervisor's surface: its components stay up for four polls."""

        polls = 0
        stopped = False

        def start_all(self) -> None: ...

        def poll(self) -> bool:
            self.polls += 1
            return self.polls > 4

        def stop_all(self) -> None:
            self.stopped = True

    monkeypatch.setattr(loop, "loop_progress", starved)
    stack = Stack()
    await runs._supervise(settings, stack)  # type: ignore[arg-type]
    assert len(calls) >= 3  # failed twice, then read again
    assert stack.stopped
