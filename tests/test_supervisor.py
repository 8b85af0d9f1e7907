"""The supervisor's reading of the orchestrator's exit, on real child processes: a crash is
restarted (a CI run once ended on one Redis read that timed out), a stop with a reason ends
the run, a clean exit finishes it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from sentinel.supervisor import (
    CRASHED,
    LOOP_STOPPED,
    ORCHESTRATOR,
    Component,
    RunFailed,
    Supervisor,
)


class Children(Supervisor):
    """Children that are Python one-liners, not `sentinel` subcommands."""

    def argv(self, component: Component) -> list[str]:
        return [sys.executable, "-c", component.args[0]]


def orchestrator_exiting(tmp_path: Path, code: int) -> Children:
    """An orchestrator that exits `code` the first time and 0 once restarted."""
    marker = tmp_path / "started-once"
    script = (
        f"import pathlib, sys; m = pathlib.Path({str(marker)!r})\n"
        f"if m.exists(): sys.exit(0)\n"
        f"m.touch(); sys.exit({code})"
    )
    return Children([Component(ORCHESTRATOR, [script])], tmp_path, tmp_path / "config.yaml")


def run(supervisor: Supervisor, timeout_s: float = 30.0) -> None:
    supervisor.start_all()
    deadline = time.monotonic() + timeout_s
    try:
        while not supervisor.poll():
            assert time.monotonic() < deadline, "the run never finished"
            time.sleep(0.1)
    finally:
        supervisor.stop_all()


def test_a_crashed_orchestrator_is_restarted_and_finishes_the_run(tmp_path: Path) -> None:
    supervisor = orchestrator_exiting(tmp_path, CRASHED)
    run(supervisor)
    [orchestrator] = supervisor.components
    assert orchestrator.history == [CRASHED, 0]
    assert orchestrator.restarts == 1


@pytest.mark.parametrize("code", [LOOP_STOPPED, 2, 3, 4])  # stopped, config, Redis, run dir
def test_an_orchestrator_stopping_with_a_reason_ends_the_run(tmp_path: Path, code: int) -> None:
    supervisor = orchestrator_exiting(tmp_path, code)
    with pytest.raises(RunFailed, match="the orchestrator stopped the run"):
        run(supervisor)
    assert supervisor.components[0].restarts == 0
