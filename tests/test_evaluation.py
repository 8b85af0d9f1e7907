"""`sentinel eval` on the real server: pass^k over real rollouts (on tau2's mock domain: short
prompts), resumed from its JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.envs.registry import load, named
from sentinel.evaluation import TrialResult, evaluate, load_results, report
from sentinel.metrics import pass_table
from sentinel.schemas import Task, TerminationReason, Trajectory
from tests import factories
from tests.factories import trajectory


def test_eval_runs_every_trial_once_and_resumes(
    tmp_path: Path, policy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "SENTINEL_RUN_DIR": str(tmp_path),
        "SENTINEL_ENV__DOMAIN": "mock",
        "SENTINEL_LLM__POLICY__BASE_URL": policy_url,
        "SENTINEL_LLM__USER_SIM__BASE_URL": policy_url,
        "SENTINEL_ROLLOUT__MAX_AGENT_TURNS": "2",
        "SENTINEL_ROLLOUT__MAX_TOKENS": "64",
        "SENTINEL_ROLLOUT__USER_MAX_TOKENS": "32",
    }.items():
        monkeypatch.setenv(name, value)
    command = ["eval", "--split", "test", "--trials", "2", "--limit", "2"]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    out = tmp_path / "eval" / "mock-test-smol"
    results = load_results(out / "results.jsonl")
    tasks = sorted(t.id for t in load(named("mock")).tasks("test"))
    assert len(tasks) == 2
    assert sorted((r.task_id, r.trial) for r in results) == [(t, i) for t in tasks for i in (0, 1)]
    trajectories = [
        json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()
    ]
    assert {t["id"] for t in trajectories} == {r.trajectory_id for r in results}
    saved = json.loads((out / "report.json").read_text())
    assert saved["tasks"] == 2
    assert "pass^k" in first.stdout
    assert "pass@k" in first.stdout

    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert len(load_results(out / "results.jsonl")) == 4  # nothing ran twice


def test_report_uses_tau2_pass_hat_k() -> None:
    results = [
        TrialResult(task_id=t, trial=i, reward=r, termination=TerminationReason.USER_STOP,
                    trajectory_id=f"{t}{i}", policy="p")
        for t, rewards in {"a": [1.0, 0.0, 1.0], "b": [1.0, 1.0, 1.0], "c": [0.0, 0.0]}.items()
        for i, r in enumerate(rewards)
    ]  # fmt: skip
    result = report(results, "p", trials=3)
    assert result.tasks == 2  # c has too few trials to count
    assert result.pass_hat_k == pass_table({"a": [1, 0, 1], "b": [1, 1, 1]})["pass^k"]
    assert result.pass_hat_k[3] == pytest.approx(0.5)
    assert result.terminations == {"user_stop": 8}


def test_infrastructure_errors_are_left_out_of_pass_hat_k_and_counted_apart() -> None:
    def trial(task: str, i: int, reward: float, ending: TerminationReason) -> TrialResult:
        return TrialResult(task_id=task, trial=i, reward=reward, termination=ending,
                           trajectory_id=f"{task}{i}{ending}", policy="p")  # fmt: skip

    stop, infra = TerminationReason.USER_STOP, TerminationReason.INFRA_ERROR
    results = [
        trial("a", 0, 1.0, stop), trial("a", 1, 0.0, infra), trial("a", 1, 1.0, stop),  # retried
        trial("b", 0, 1.0, stop), trial("b", 1, 0.0, infra),  # never retried
        trial("c", 0, 0.0, stop), trial("c", 1, 1.0, stop),
    ]  # fmt: skip
    result = report(results, "p", trials=2, lost=2)
    assert result.tasks == 2  # b is short of a trial: left out, not failed
    assert result.pass_hat_k == {1: 0.75, 2: 0.5}
    assert result.mean_reward == 0.75
    assert result.infra_errors == 3  # b's, and two trials of a group that never ran
    assert result.terminations == {"user_stop": 5, "infra_error": 1}


@pytest.mark.anyio
async def test_eval_runs_a_trial_again_after_an_infrastructure_error(tmp_path: Path) -> None:
    """A unit test of error handling: a runner whose first rollout of each task fails."""

    class Runner:
        solver = SimpleNamespace(client=SimpleNamespace(model="p"))
        calls = 0

        async def run(self, task: Task) -> Trajectory:
            Runner.calls += 1
            ending = (
                TerminationReason.INFRA_ERROR if Runner.calls == 1 else TerminationReason.USER_STOP
            )
            return trajectory(Runner.calls, 1.0).model_copy(
                update={"task_id": task.id, "termination": ending, "policy_model": "p"}
            )

    first = await evaluate(Runner(), [factories.task(1)], 1, tmp_path)  # type: ignore[arg-type]
    assert (first.tasks, first.infra_errors) == (0, 1)
    again = await evaluate(Runner(), [factories.task(1)], 1, tmp_path)  # type: ignore[arg-type]
    assert (again.tasks, again.infra_errors, again.pass_hat_k) == (1, 0, {1: 1.0})
    assert Runner.calls == 2
