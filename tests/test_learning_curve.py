"""The learning benchmark's figures, on recorded groups: held-out before and after, paired
gains and their bootstrap interval."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

import pytest

from sentinel.learning_curve import (
    RunCurve,
    gain_interval,
    mode_figures,
    read_curve,
    run_curve,
)
from sentinel.schemas import RewardBreakdown, RolloutGroup
from tests import factories


def evaluated(task: str, version: int, scored: list[tuple[float, float]]) -> RolloutGroup:
    """An `eval` group of one trajectory per (reward, progress)."""
    group = factories.group(task, [r for r, _ in scored], i=version, version=version)
    for t, (reward, partial) in zip(group.trajectories, scored, strict=True):
        t.reward = RewardBreakdown(reward=reward, partial=partial)
    return group.model_copy(update={"purpose": "eval", "id": f"eval-v{version}-{task}"})


def test_before_is_the_first_evaluated_version_and_after_the_last() -> None:
    groups = [
        evaluated("a", 0, [(0.0, 0.5), (0.0, 0.0)]),
        evaluated("b", 0, [(1.0, 1.0), (0.0, 0.0)]),
        evaluated("a", 3, [(1.0, 1.0), (0.0, 0.5)]),
        evaluated("b", 3, [(1.0, 1.0), (1.0, 1.0)]),
        evaluated("a", 1, [(0.0, 0.0), (0.0, 0.0)]),  # a middle version: in neither end
        factories.group("a", [1.0, 1.0, 1.0], version=5),  # training, not held out
        evaluated("b", 9, []).model_copy(update={"dropped": "worker lost"}),
    ]
    curve = run_curve(groups)
    assert (curve.before.version, curve.after.version) == (0, 3)
    assert curve.before.pass1 == 0.25
    assert curve.before.shaped == fmean([0.5, 0.0, 1.0, 0.0])
    assert curve.before.per_task == {"a": 0.25, "b": 0.5}
    assert curve.after.pass1 == 0.75
    assert curve.after.per_task == {"a": 0.75, "b": 1.0}
    assert curve.gains() == {"a": 0.5, "b": 0.5}


def test_a_run_that_never_trained_is_its_own_before_and_after() -> None:
    curve = run_curve([evaluated("a", 0, [(0.0, 0.5)])])
    assert curve.before == curve.after
    assert curve.gains() == {"a": 0.0}


def test_a_run_without_held_out_trials_says_so() -> None:
    with pytest.raises(ValueError, match="no held-out trials"):
        run_curve([factories.group("a", [1.0, 0.0])])


def test_the_curve_is_read_from_the_runs_artifacts(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    groups = [evaluated("a", 0, [(0.0, 0.0)]), evaluated("a", 2, [(1.0, 1.0)])]
    lines = [g.model_dump_json() for g in groups]
    (artifacts / "rollout_groups.jsonl").write_text("\n".join(lines) + "\n")
    assert read_curve(tmp_path).gains() == {"a": 1.0}


def test_the_interval_brackets_the_mean_and_narrows_with_more_cells() -> None:
    few = [0.0, 0.5, -0.25, 0.75]
    low, high = gain_interval(few)
    assert low < fmean(few) < high
    many_low, many_high = gain_interval(few * 10)
    assert (low, high) != (many_low, many_high)
    assert low <= many_low <= many_high <= high
    assert many_high - many_low < high - low
    assert gain_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert gain_interval([0.2]) == (0.2, 0.2)
    assert gain_interval([]) == (0.0, 0.0)


def test_a_modes_figures_average_its_seeds_and_pool_their_task_gains() -> None:
    seed0 = RunCurve(
        before=run_curve([evaluated("a", 0, [(0.0, 0.0)])]).before,
        after=run_curve([evaluated("a", 1, [(1.0, 1.0)])]).after,
    )
    seed1 = run_curve([evaluated("a", 0, [(0.0, 0.5)])])  # did not train
    figures = mode_figures([seed0, seed1], groups=12)
    assert (figures.seeds, figures.groups) == (2, 12)
    assert (figures.heldout_pass1_before, figures.heldout_pass1_after) == (0.0, 0.5)
    assert (figures.heldout_shaped_before, figures.heldout_shaped_after) == (0.25, 0.75)
    assert figures.ci95_shaped_gain == (0.0, 1.0)  # the two cells, 1.0 and 0.0, resampled
