"""The curriculum: which task the next rollout group runs, from recent solve rates.

A task's solve rate p is the mean of its last `solve_window` rewards. Its weight is the
learnability 4p(1-p) (verifiers' proposer-solver): 1 at p = 0.5, 0 for tasks always or never
solved, whose groups teach GRPO nothing. Unseen tasks weigh 1, so each is tried. A task solved
at least `mastered` of the time over `min_samples` rollouts is retired. A share
`targeted_ratio` of groups goes to proposed tasks (when there are any), the rest to seeds.

State lives in Redis, so a restarted orchestrator resumes it; recording a group is one Lua
call that counts each group id once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from sentinel.config import LoopSettings
from sentinel.orchestrator.pool import TaskPool
from sentinel.schemas import RolloutGroup, Task

MIN_WEIGHT = 0.05  # a task with p at 0 or 1 (not yet retired) keeps a small chance

# KEYS: seen set, rewards list, retired set. ARGV: group id, window, mastered, min samples,
# task id, then the rewards. Returns 1 if the group was new.
_RECORD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 6, #ARGV do redis.call('LPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
local rewards = redis.call('LRANGE', KEYS[2], 0, -1)
if #rewards >= tonumber(ARGV[4]) then
  local sum = 0
  for _, r in ipairs(rewards) do sum = sum + tonumber(r) end
  if sum / #rewards >= tonumber(ARGV[3]) then redis.call('SADD', KEYS[3], ARGV[5]) end
end
return 1
"""


@dataclass(frozen=True)
class SolveRate:
    rate: float | None  # None: never rolled out
    samples: int

    @property
    def learnability(self) -> float:
        return 1.0 if self.rate is None else 4 * self.rate * (1 - self.rate)


class Curriculum:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        pool: TaskPool,
        settings: LoopSettings,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = f"{prefix}:curriculum"
        self.pool = pool
        self.settings = settings
        self.rng = rng or random.Random()
        self._record = redis.register_script(_RECORD)

    def _rewards_key(self, task_id: str) -> str:
        return f"{self.prefix}:rewards:{task_id}"

    async def record(self, group: RolloutGroup) -> bool:
        """Count a finished group's rewards toward its task; False if already counted."""
        if group.dropped:
            return False
        s = self.settings
        keys = [f"{self.prefix}:seen", self._rewards_key(group.task_id), f"{self.prefix}:retired"]
        args: list[str | float] = [group.id, s.solve_window, s.mastered, s.min_samples]
        args += [group.task_id, *group.rewards]
        return bool(await self._record(keys=keys, args=args))

    async def solve_rates(self, task_ids: Sequence[str]) -> dict[str, SolveRate]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.lrange(self._rewards_key(task_id), 0, -1)
            lists = await pipe.execute()
        rates = {}
        for task_id, raw in zip(task_ids, lists, strict=True):
            rewards = [float(r) for r in raw]
            rate = sum(rewards) / len(rewards) if rewards else None
            rates[task_id] = SolveRate(rate, len(rewards))
        return rates

    async def retired(self) -> set[str]:
        members = await self.redis.smembers(f"{self.prefix}:retired")
        return {m.decode() if isinstance(m, bytes) else m for m in members}

    async def candidates(self, targeted: bool) -> list[Task]:
        retired = await self.retired()
        tasks = await self.pool.proposed() if targeted else list(self.pool.seeds.values())
        return [t for t in tasks if t.id not in retired]

    async def next_task(self) -> Task | None:
        """A task for the next group, or None when every task is retired."""
        proposed = [] if self.settings.mode == "fixed" else await self.candidates(targeted=True)
        seeds = await self.candidates(targeted=False)
        wants_proposed = bool(proposed) and self.rng.random() < self.settings.targeted_ratio
        tasks = proposed if wants_proposed or not seeds else seeds
        if not tasks:
            return None
        rates = await self.solve_rates([t.id for t in tasks])
        weights = [max(rates[t.id].learnability, MIN_WEIGHT) for t in tasks]
        return self.rng.choices(tasks, weights=weights)[0]
