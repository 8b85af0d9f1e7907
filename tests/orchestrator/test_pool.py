"""The task pool on a real Redis: seeds, accepted tasks, and no test-split task ever."""

from __future__ import annotations

import pytest

from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.pool import TaskPool
from sentinel.schemas import Origin, Provenance
from tests.factories import task

pytestmark = pytest.mark.anyio


async def test_seeds_and_added_tasks_are_found_by_id(bus: Bus) -> None:
    seed = task(1)
    pool = TaskPool(bus.redis, bus.settings.prefix, [seed])
    proposed = task(2).model_copy(update={"provenance": Provenance(origin=Origin.PROPOSED)})
    assert await pool.add(proposed)
    assert not await pool.add(proposed)  # a redelivery
    assert await pool.get(seed.id) == seed
    assert await pool.get(proposed.id) == proposed
    assert await pool.get("nope") is None
    assert await pool.size() == 2


async def test_test_split_tasks_never_enter(bus: Bus) -> None:
    leaked = task(3).model_copy(update={"provenance": Provenance(origin=Origin.SEED, split="test")})
    with pytest.raises(ValueError, match="test-split"):
        TaskPool(bus.redis, bus.settings.prefix, [leaked])
    with pytest.raises(ValueError, match="test-split"):
        await TaskPool(bus.redis, bus.settings.prefix).add(leaked)
