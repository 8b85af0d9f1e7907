"""Held-out evaluation: every task K times, pass^k and pass@k, resumable from its JSONL.

Results go to `<out>/results.jsonl` (one line per finished trial) and full trajectories to
`<out>/trajectories.jsonl`. A trajectory is written before its result line, so a result always
has its trajectory; re-running skips every (task, trial) that already has a result.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import anyio
from pydantic import BaseModel
from rich.table import Table

from sentinel.agents.rollout import RolloutRunner
from sentinel.metrics import pass_table
from sentinel.schemas import EvalReport, RolloutGroup, Task, TerminationReason, Trajectory


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
    if not path.exists():
        return []
    results = []
    for line in path.read_text().splitlines():
        if line.strip():
            results.append(TrialResult.model_validate_json(line))
    return results


def report(results: list[TrialResult], policy: str, trials: int) -> EvalReport:
    rewards: dict[str, list[float]] = defaultdict(list)
    terminations: dict[str, int] = defaultdict(int)
    for result in results:
        rewards[result.task_id].append(result.reward)
        terminations[result.termination.value] += 1
    complete = {task: r for task, r in rewards.items() if len(r) >= trials}
    table = pass_table(complete, max_k=trials)
    every = [r for rs in complete.values() for r in rs]
    return EvalReport(
        policy=policy, tasks=len(complete), trials=trials,
        pass_hat_k=table["pass^k"], pass_at_k=table["pass@k"],
        mean_reward=sum(every) / len(every) if every else 0.0,
        terminations=dict(terminations),
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
    done = {(r.task_id, r.trial) for r in results}
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


def group_report(groups: list[RolloutGroup]) -> EvalReport:
    """The same figures over rollout groups: each group's trajectories are a task's trials."""
    results = [TrialResult.of(t, i) for g in groups for i, t in enumerate(g.trajectories)]
    size = min((len(g.trajectories) for g in groups), default=0)
    policy = results[0].policy if results else ""
    return report(results, policy, size)


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
    return table
