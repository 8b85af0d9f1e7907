"""`sentinel eval` on the real server: pass^k over real rollouts, resumed from its JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.evaluation import TrialResult, load_results, report
from sentinel.metrics import pass_table
from sentinel.schemas import TerminationReason


def test_eval_runs_every_trial_once_and_resumes(
    tmp_path: Path, policy_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "SENTINEL_RUN_DIR": str(tmp_path),
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
    out = tmp_path / "eval" / "retail-test-smol"
    results = load_results(out / "results.jsonl")
    assert sorted((r.task_id, r.trial) for r in results) == [
        ("retail-5", 0), ("retail-5", 1), ("retail-9", 0), ("retail-9", 1),
    ]  # fmt: skip
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
