"""Steering the Proposer by each pattern's share of the failures: the verdicts alone, then
on a real Redis with the library and the pool."""

from __future__ import annotations

import pytest

from sentinel.config import SteeringSettings
from sentinel.envs.base import Environment
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.patterns import PatternLibrary
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.steering import Fate, Steering, judge
from sentinel.schemas import ErrorPattern, FailureCategory, FailureDiagnosis
from tests.factories import todo

pytestmark = pytest.mark.anyio
SETTINGS = SteeringSettings(min_failures=4, vanish_after=2, shrink_tolerance=0.2)


def pattern(frequency: dict[int, int]) -> ErrorPattern:
    return ErrorPattern(
        title="t", description="d", category=FailureCategory.WRONG_TOOL, frequency=frequency
    )


FAILURES = {0: 10, 1: 10, 2: 10, 3: 2}  # version 3 is still being rolled out


@pytest.mark.parametrize(
    ("frequency", "fate", "weight"),
    [
        ({0: 3, 1: 3, 2: 4}, Fate.PERSISTENT, 2.0),  # 0.3, 0.3, 0.4
        ({0: 5, 1: 4, 2: 1}, Fate.SHRINKING, 0.5),  # 0.5, 0.4, then 0.1
        ({0: 5, 1: 4, 2: 4}, Fate.PERSISTENT, 2.0),  # 0.4 against 0.45: within tolerance
        ({0: 5}, Fate.VANISHED, 0.0),  # none in the last two finished versions
        ({2: 5, 3: 2}, Fate.NEW, 1.0),  # one finished version: too soon to judge
        ({1: 2, 2: 0}, Fate.SHRINKING, 0.5),
    ],
)
def test_a_patterns_fate_follows_its_share_over_finished_versions(
    frequency: dict[int, int], fate: Fate, weight: float
) -> None:
    judged = judge(pattern(frequency), FAILURES, before=3, settings=SETTINGS)
    assert (judged.fate, judged.weight) == (fate, weight)
    assert 3 not in judged.shares  # the version still running is never read


def test_versions_with_too_few_failures_are_not_judged() -> None:
    sparse = {0: 10, 1: 3, 2: 3}  # 1 and 2 below min_failures: no share to read
    judged = judge(pattern({0: 5}), sparse, before=3, settings=SETTINGS)
    assert (judged.fate, list(judged.shares)) == (Fate.NEW, [0])


def diagnosis(i: int, version: int, tools: list[str]) -> FailureDiagnosis:
    return FailureDiagnosis(
        id=f"d-{i}", trajectory_id=f"t-{i}", task_id="mock-1", policy_version=version,
        category=FailureCategory.WRONG_ARGUMENTS, summary="wrong", tools=tools,
    )  # fmt: skip


async def test_steering_reweighs_retires_and_takes_a_vanished_patterns_tasks_out_of_the_pool(
    bus: Bus, mock: Environment
) -> None:
    library = PatternLibrary(bus.redis, bus.settings.prefix)
    pool = TaskPool(bus.redis, bus.settings.prefix, mock.tasks("train"))
    n = 0
    for version, (fading, staying) in enumerate([(3, 3), (2, 3), (0, 4), (0, 4)]):
        for tools, count in ((["create_task"], fading), (["update_task_status"], staying)):
            for _ in range(count):
                await library.add(diagnosis(n, version, tools))
                n += 1
        for _ in range(10 - fading - staying):  # the rest of the version's failures
            await library.add(diagnosis(n, version, ["get_users"]))
            n += 1
    by_tool = {p.tools[0]: p for p in await library.all()}
    fading_id, staying_id = by_tool["create_task"].id, by_tool["update_task_status"].id
    for name, pid in (("old", fading_id), ("kept", staying_id)):
        task = todo(mock, name)
        provenance = task.provenance.model_copy(update={"pattern_id": pid})
        await pool.add(task.model_copy(update={"provenance": provenance}))

    steering = Steering(library, pool, SETTINGS)
    verdicts = await steering.on_version(4)
    assert verdicts is not None
    assert verdicts[fading_id].fate is Fate.VANISHED
    assert verdicts[staying_id].fate is Fate.PERSISTENT
    assert await steering.on_version(4) is None  # judged once per version: in this process
    replica = Steering(library, pool, SETTINGS)
    assert await replica.on_version(4) is None  # and across replicas, by the claim in Redis

    active = {p.id: p for p in await library.all()}
    assert fading_id not in active
    assert [p.id for p in await library.retired()] == [fading_id]
    assert active[staying_id].weight == 2.0
    assert {t.provenance.pattern_id for t in await pool.proposed()} == {staying_id}
    assert await pool.get(todo(mock, "old").id) is not None  # in-flight trajectories still find it
    again = await library.add(diagnosis(n, 4, ["create_task"]))
    assert again.created  # the weakness came back: a new pattern, not the retired one
