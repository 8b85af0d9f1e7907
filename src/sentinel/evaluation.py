"""Held-out evaluation: every task K times, pass^k and pass@k, resumable from its JSONL.

Results go to `<out>/results.jsonl` (one line per finished trial) and full trajectories to
`<out>/trajectories.jsonl`. A trajectory is written before its result line, so a result always
has its trajectory; re-running skips every (task, trial) that already has a result, except
one ended by an infrastructure error, which runs again.

A trial ended by an infrastructure error (the server or the environment failed, not the
agent) says nothing about the policy: as tau2 does, it is left out of pass^k, pass@k and the
mean reward, and counted apart (`EvalReport.infra_errors`). A task left with fewer than K
trials is left out whole, so every task in the figures has K.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from pydantic import BaseModel
from rich.table import Table

from sentinel import jsonl
from sentinel.metrics import pass_table
from sentinel.schemas import EvalReport, RolloutGroup, Task, TerminationReason, Trajectory

if TYPE_CHECKING:  # the orchestrator reports evaluations without running any
    from sentinel.agents.rollout import RolloutRunner

INFRA = TerminationReason.INFRA_ERROR


class TrialResult(BaseModel):
    task_id: str
    trial: int
    reward: float
    termination: TerminationReason
    trajectory_id: str
    policy: str

    @classmethod
    def of(cls, trajectory: Trajectory, trial: int) -> TrialResult:
        return cls(
            task_id=trajectory.task_id,
            trial=trial,
            reward=trajectory.reward.reward if trajectory.reward else 0.0,
            termination=trajectory.termination,
            trajectory_id=trajectory.id,
            policy=trajectory.policy_model,
        )


def load_results(path: Path) -> list[TrialResult]:
    return [TrialResult.model_validate_json(line) for line in jsonl.lines(path)]


def final_results(results: list[TrialResult]) -> list[TrialResult]:
    """One result per (task, trial): an infrastructure error gives way to its retry."""
    final: dict[tuple[str, int], TrialResult] = {}
    for result in results:
        key = (result.task_id, result.trial)
        if key not in final or final[key].termination == INFRA:
            final[key] = result
    return list(final.values())


def report(results: list[TrialResult], policy: str, trials: int, lost: int = 0) -> EvalReport:
    """pass^k and pass@k over `results`, infrastructure errors apart; `lost`: trials that
    never ran (a dropped group), counted with them."""
    final = final_results(results)
    rewards: dict[str, list[float]] = defaultdict(list)
    for result in final:
        if result.termination != INFRA:
            rewards[result.task_id].append(result.reward)
    complete = {task: r for task, r in rewards.items() if len(r) >= trials}
    table = pass_table(complete, max_k=trials)
    every = [r for rs in complete.values() for r in rs]
    return EvalReport(
        policy=policy, tasks=len(complete), trials=trials,
        pass_hat_k=table["pass^k"], pass_at_k=table["pass@k"],
        mean_reward=sum(every) / len(every) if every else 0.0,
        terminations=dict(Counter(r.termination.value for r in final)),
        infra_errors=sum(r.termination == INFRA for r in final) + lost,
    )  # fmt: skip


async def evaluate(
    runner: RolloutRunner,
    tasks: list[Task],
    trials: int,
    out: Path,
    on_trial: Callable[[TrialResult], None] = lambda _: None,
) -> EvalReport:
    """Run every missing (task, trial) concurrently and report over all results so far."""
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    results_path, trajectories_path = out / "results.jsonl", out / "trajectories.jsonl"
    results = load_results(results_path)
    done = {(r.task_id, r.trial) for r in results if r.termination != INFRA}
    todo = [(task, i) for task in tasks for i in range(trials) if (task.id, i) not in done]
    policy = runner.solver.client.model
    if results and {r.policy for r in results} != {policy}:
        raise ValueError(f"{out} holds results of another policy; use another run_dir")

    async def trial(task: Task, index: int) -> None:
        trajectory: Trajectory = await runner.run(task)
        result = TrialResult.of(trajectory, index)
        with trajectories_path.open("a") as f:
            f.write(trajectory.model_dump_json() + "\n")
        with results_path.open("a") as f:
            f.write(result.model_dump_json() + "\n")
        results.append(result)
        on_trial(result)

    async with anyio.create_task_group() as tg:
        for task, index in todo:
            tg.start_soon(trial, task, index)
    wanted = {t.id for t in tasks}
    return report([r for r in results if r.task_id in wanted], policy, trials)


def group_results(group: RolloutGroup) -> list[TrialResult]:
    """A held-out group's trajectories as its task's trials."""
    return [TrialResult.of(t, i) for i, t in enumerate(group.trajectories)]


def render_report(result: EvalReport) -> Table:
    table = Table(
        title=f"{result.policy}: {result.tasks} tasks x {result.trials} trials, "
        f"mean reward {result.mean_reward:.3f}"
    )
    table.add_column("k", justify="right")
    table.add_column("pass^k (all k succeed)", justify="right")
    table.add_column("pass@k (any of k succeeds)", justify="right")
    for k in result.pass_hat_k:
        table.add_row(str(k), f"{result.pass_hat_k[k]:.3f}", f"{result.pass_at_k[k]:.3f}")
    endings = ", ".join(f"{name} {count}" for name, count in sorted(result.terminations.items()))
    table.caption = f"terminations: {endings}"
    if result.infra_errors:
        table.caption += f"; {result.infra_errors} trials lost to infrastructure errors, left out"
    return table
