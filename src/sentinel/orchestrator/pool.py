"""The task pool: every task the Solver may train on, by id, persisted in Redis.

Seed tasks (the domain's train split) are always present without being stored; accepted
proposals are stored as they arrive. The test split never enters the pool. The tasks of a
retired pattern leave it (`remove_pattern`): no new group runs them, but they are kept aside,
so a trajectory of one still in flight is still diagnosed.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from sentinel.schemas import Task


class TaskPool:
    def __init__(self, redis: aioredis.Redis, prefix: str, seeds: Iterable[Task] = ()) -> None:
        self.redis = redis
        self.key = f"{prefix}:pool:tasks"
        self.removed_key = f"{prefix}:pool:removed"
        self.seeds = {task.id: task for task in seeds}
        if leaked := [t.id for t in self.seeds.values() if t.provenance.split == "test"]:
            raise ValueError(f"test-split tasks cannot seed the pool: {', '.join(leaked[:5])}")

    async def add(self, task: Task) -> bool:
        """Store an accepted task; False if its id was already there (a redelivery)."""
        if task.provenance.split == "test":
            raise ValueError(f"{task.id} is a test-split task; it cannot join the pool")
        return bool(await self.redis.hsetnx(self.key, task.id, task.model_dump_json()))

    async def get(self, task_id: str) -> Task | None:
        """A task in the pool, or removed from it (trajectories of it may still arrive)."""
        if task_id in self.seeds:
            return self.seeds[task_id]
        raw = await self.redis.hget(self.key, task_id) or await self.redis.hget(
            self.removed_key, task_id
        )
        return Task.model_validate_json(raw) if raw else None

    async def remove_pattern(self, pattern_id: str) -> int:
        """Move the tasks written for `pattern_id` out of the pool; how many moved."""
        moved = 0
        for task in await self.proposed():
            if task.provenance.pattern_id != pattern_id:
                continue
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.removed_key, task.id, task.model_dump_json())
                pipe.hdel(self.key, task.id)
                await pipe.execute()
            moved += 1
        return moved

    async def proposed(self) -> list[Task]:
        return [Task.model_validate_json(raw) for raw in await self.redis.hvals(self.key)]

    async def size(self) -> int:
        return len(self.seeds) + int(await self.redis.hlen(self.key))
