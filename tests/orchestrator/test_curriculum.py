"""The curriculum on a real Redis: learnability sampling, retirement, the seed/targeted mix."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sentinel.config import LoopSettings
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.curriculum import Curriculum, SolveRate
from sentinel.orchestrator.pool import TaskPool
from sentinel.schemas import Origin, Provenance, RolloutGroup
from tests.factories import group, task

pytestmark = pytest.mark.anyio


def curriculum(bus: Bus, seeds: int = 3, **loop: object) -> Curriculum:
    pool = TaskPool(bus.redis, bus.settings.prefix, [task(i) for i in range(seeds)])
    settings = LoopSettings.model_validate({"min_samples": 4, "solve_window": 8, **loop})
    return Curriculum(bus.redis, bus.settings.prefix, pool, settings, random.Random(0))


def test_learnability_peaks_at_one_half() -> None:
    assert SolveRate(0.5, 8).learnability == 1.0
    assert SolveRate(None, 0).learnability == 1.0  # unseen: tried first
    assert SolveRate(0.0, 8).learnability == 0.0
    assert SolveRate(0.25, 8).learnability == pytest.approx(0.75)


async def test_a_group_counts_once_and_solve_rates_use_the_window(bus: Bus) -> None:
    c = curriculum(bus)
    assert await c.record(group("retail-0", [1.0, 0.0]))
    assert not await c.record(group("retail-0", [1.0, 0.0]))  # redelivered
    for i in range(1, 6):
        await c.record(group("retail-0", [0.0, 0.0], i))
    rates = await c.solve_rates(["retail-0", "retail-1"])
    assert rates["retail-0"] == SolveRate(0.0, 8)  # the 1.0 fell out of the window of 8
    assert rates["retail-1"] == SolveRate(None, 0)


async def test_dropped_groups_do_not_count(bus: Bus) -> None:
    c = curriculum(bus)
    dropped = RolloutGroup(task_id="retail-0", policy_version=0, trajectories=[], dropped="down")
    assert not await c.record(dropped)
    assert (await c.solve_rates(["retail-0"]))["retail-0"].samples == 0


async def test_sampling_follows_learnability_and_mastered_tasks_retire(bus: Bus) -> None:
    c = curriculum(bus)
    await c.record(group("retail-0", [1.0, 1.0, 1.0, 1.0]))  # mastered: retired
    await c.record(group("retail-1", [0.0, 0.0, 0.0, 0.0]))  # never solved: weight floor
    await c.record(group("retail-2", [1.0, 0.0, 1.0, 0.0]))  # p = 0.5: learnable
    assert await c.retired() == {"retail-0"}
    picks = Counter([(await c.next_task() or task()).id for _ in range(200)])
    assert picks["retail-0"] == 0
    assert picks["retail-2"] > 10 * picks["retail-1"]


async def test_targeted_ratio_mixes_proposed_tasks_in_and_fixed_mode_ignores_them(
    bus: Bus,
) -> None:
    proposed = task(9).model_copy(update={"provenance": Provenance(origin=Origin.PROPOSED)})
    for mode, expected in (("failure_driven", (0.2, 0.4)), ("fixed", (0.0, 0.0))):
        c = curriculum(bus, mode=mode, targeted_ratio=0.3)
        await c.pool.add(proposed)
        picks = Counter([(await c.next_task() or task()).id for _ in range(300)])
        share = picks[proposed.id] / 300
        assert expected[0] <= share <= expected[1], (mode, share)


async def test_no_task_left_when_everything_is_retired(bus: Bus) -> None:
    c = curriculum(bus, seeds=1)
    await c.record(group("retail-0", [1.0, 1.0, 1.0, 1.0]))
    assert await c.next_task() is None
