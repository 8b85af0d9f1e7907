"""Did a run make its agent better? Its held-out trials before and after, with error bars.

A run's held-out trials are its `eval` rollout groups (`artifacts/rollout_groups.jsonl`): the
test split's tasks, `loop.eval_trials` times each, once per evaluated policy version. Before
is the first version evaluated (the base policy), after the last. Two figures each:
- pass^1: the share of trials that tau2 scores 1;
- the shaped reward: tau2's reward, or for a failure its progress (`RewardBreakdown.partial`:
  the share of gold actions done, or of the task's checks that hold), at full weight so that
  the figure does not depend on the training run's `trainer.partial_credit`.

`gain_interval` bootstraps the mean gain over (seed, task) cells, each the difference of a
task's mean shaped reward after and before within one seed's run: before and after are
paired on the same task and run, and both the seeds and the tasks vary.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import fmean

from pydantic import BaseModel

from sentinel import jsonl
from sentinel.schemas import RolloutGroup, Trajectory

BOOTSTRAP_DRAWS = 10_000


def shaped(trajectory: Trajectory) -> float:
    """tau2's reward, or the failure's progress toward it (0 when it was not scored)."""
    if trajectory.reward is None:
        return 0.0
    return max(trajectory.reward.reward, trajectory.reward.partial)


class HeldOut(BaseModel):
    """One policy version on the held-out tasks."""

    version: int
    trials: int
    pass1: float
    shaped: float
    per_task: dict[str, float]  # task id -> mean shaped reward over its trials


class RunCurve(BaseModel):
    """A run's held-out figures at its first and last evaluated versions."""

    before: HeldOut
    after: HeldOut

    def gains(self) -> dict[str, float]:
        """Per task evaluated at both ends: mean shaped reward after minus before."""
        common = self.before.per_task.keys() & self.after.per_task.keys()
        return {t: self.after.per_task[t] - self.before.per_task[t] for t in sorted(common)}


def held_out(trajectories: Sequence[Trajectory], version: int) -> HeldOut:
    by_task: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        by_task[t.task_id].append(shaped(t))
    return HeldOut(
        version=version,
        trials=len(trajectories),
        pass1=fmean(t.succeeded for t in trajectories),
        shaped=fmean(shaped(t) for t in trajectories),
        per_task={task: fmean(values) for task, values in sorted(by_task.items())},
    )


def run_curve(groups: Iterable[RolloutGroup]) -> RunCurve:
    """The first and last evaluated versions of a run's groups (the same one when the run
    never trained); ValueError when it evaluated nothing."""
    by_version: dict[int, list[Trajectory]] = defaultdict(list)
    for group in groups:
        if group.purpose == "eval" and not group.dropped:
            by_version[group.policy_version].extend(group.trajectories)
    evaluated = sorted(v for v, ts in by_version.items() if ts)
    if not evaluated:
        raise ValueError("the run has no held-out trials: was loop.eval_tasks 0?")
    first, last = evaluated[0], evaluated[-1]
    return RunCurve(
        before=held_out(by_version[first], first), after=held_out(by_version[last], last)
    )


def read_curve(run_dir: Path) -> RunCurve:
    path = run_dir / "artifacts" / "rollout_groups.jsonl"
    return run_curve(RolloutGroup.model_validate_json(line) for line in jsonl.lines(path))


def gain_interval(
    cells: Sequence[float], level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `cells` (one gain per seed and task);
    a single cell, or none, has no spread to resample: its interval is the point."""
    if not cells:
        return (0.0, 0.0)
    if len(cells) == 1:
        return (cells[0], cells[0])
    rng = random.Random(seed)
    means = sorted(fmean(rng.choices(cells, k=len(cells))) for _ in range(draws))
    tail = (1 - level) / 2
    low, high = means[int(tail * draws)], means[min(int((1 - tail) * draws), draws - 1)]
    return (round(low, 4), round(high, 4))


class ModeFigures(BaseModel):
    """One mode over its seeds: the benchmark's figures, named as issue 22 asks."""

    heldout_pass1_before: float
    heldout_pass1_after: float
    heldout_shaped_before: float
    heldout_shaped_after: float
    ci95_shaped_gain: tuple[float, float]
    groups: int  # rollout groups per seed: the equal budget
    seeds: int


def mode_figures(curves: Sequence[RunCurve], groups: int) -> ModeFigures:
    """Means over the seeds' runs, and the gain's interval over every (seed, task) cell."""
    cells = [gain for curve in curves for gain in curve.gains().values()]
    return ModeFigures(
        heldout_pass1_before=round(fmean(c.before.pass1 for c in curves), 4),
        heldout_pass1_after=round(fmean(c.after.pass1 for c in curves), 4),
        heldout_shaped_before=round(fmean(c.before.shaped for c in curves), 4),
        heldout_shaped_after=round(fmean(c.after.shaped for c in curves), 4),
        ci95_shaped_gain=gain_interval(cells),
        groups=groups,
        seeds=len(curves),
    )
