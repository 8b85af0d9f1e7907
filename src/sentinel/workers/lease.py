"""A rollout group's lease in Redis: who runs it now, and whether it is over.

A Celery task whose worker dies (SIGKILL, an evicted pod) stays unacknowledged until the
broker's `visibility_timeout`; the orchestrator cannot tell a slow group from a dead one
without help. So the task that runs a group holds `<prefix>:lease:rollout:<group id>`:

- `acquire`: SET NX PX `workers.lease_s`, renewed every third of it while the group runs,
  from the Celery task's thread (`keeper`), so that only the process's death lets it lapse.
  A copy of the same request (a broker redelivery, the orchestrator's re-dispatch) finds the
  lease held, or the group over, and skips: a live group never runs twice.
- `retry:<token>`: a task that retries with backoff hands the lease over for the countdown,
  so its next delivery may take it and nobody else counts the group as lost.
- `done` (set only by the holder, after the group is published) and `written-off` (set by
  the orchestrator only while nobody holds the lease) end the group for a week.

When the holder dies its lease lapses within `lease_s`; the orchestrator's reaper then sees a
started group (its attempt counter) that nobody holds, and dispatches it again or writes it
off. A holder that finds its lease gone stops its work and publishes nothing, since the
group may already run elsewhere.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from sentinel.logs import get_logger

log = get_logger(__name__)

DONE = "done"
WRITTEN_OFF = "written-off"
RETRY = "retry:"
ENDED_TTL_S = 7 * 24 * 3600  # as long as the attempt counters and the bus's key memory

# KEYS: lease. ARGV: token, ttl ms. Take a free (or handed-over) lease; returns "" when taken,
# else what holds it.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 6) ~= 'retry:' then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""

# KEYS: lease. ARGV: token, new value, ttl ms. Replace the lease only while `token` holds it.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: lease. ARGV: ttl s. Mark a group nobody holds as written off; 0 if somebody holds it.
_WRITE_OFF = """
local held = redis.call('GET', KEYS[1])
if held and held ~= 'written-off' then return 0 end
redis.call('SET', KEYS[1], 'written-off', 'EX', ARGV[1])
return 1
"""


class LeaseLost(Exception):
    """The lease lapsed while the group ran; it may run elsewhere now."""


def lease_key(prefix: str, group_id: str) -> str:
    return f"{prefix}:lease:rollout:{group_id}"


def attempts_key(prefix: str, group_id: str) -> str:
    """The rollout task's delivery counter (`workers.service.count_attempt`)."""
    return f"{prefix}:attempts:rollout:{group_id}"


def is_held(value: str | None) -> bool:
    """Whether a lease value means a live holder (or a retry that will take it back)."""
    return value is not None and value not in (DONE, WRITTEN_OFF)


async def write_off(redis: aioredis.Redis, prefix: str, group_id: str) -> bool:
    """Fence a group nobody holds, so that no late copy starts it; False if it is held."""
    script = redis.register_script(_WRITE_OFF)
    return bool(await script(keys=[lease_key(prefix, group_id)], args=[ENDED_TTL_S]))


class Lease:
    def __init__(self, redis: aioredis.Redis, prefix: str, group_id: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = lease_key(prefix, group_id)
        self.group_id = group_id
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._acquire = redis.register_script(_ACQUIRE)
        self._swap = redis.register_script(_SWAP)

    async def acquire(self) -> str | None:
        """Take the lease; None on success, else what holds it (a token, done, written-off)."""
        held = await self._acquire(keys=[self.key], args=[self.token, self.ttl_ms])
        held = held.decode() if isinstance(held, bytes) else str(held)
        return held or None

    async def renew(self) -> bool:
        return await self._set(self.token, self.ttl_ms)

    async def finish(self) -> bool:
        """The group is published: no copy may run it again."""
        return await self._set(DONE, ENDED_TTL_S * 1000)

    async def hand_over(self, delay_s: float) -> bool:
        """A retry in `delay_s`: its delivery may take the lease; it lapses if nobody does."""
        return await self._set(f"{RETRY}{self.token}", int(delay_s * 1000) + self.ttl_ms)

    async def owned(self) -> bool:
        value = await self.redis.get(self.key)
        return (value.decode() if isinstance(value, bytes) else value) == self.token

    async def _set(self, value: str, ttl_ms: int) -> bool:
        return bool(await self._swap(keys=[self.key], args=[self.token, value, ttl_ms]))

    def keeper(self, client: redis.Redis) -> Callable[[], bool]:
        """A renewal for the Celery task's own thread (a blocking client): the lease then
        outlives an event loop stalled by its work, and lapses only with the process."""
        renewed = time.monotonic()

        def renew() -> bool:
            nonlocal renewed
            try:
                kept = bool(client.eval(_SWAP, 1, self.key, self.token, self.token, self.ttl_ms))
            except RedisError as error:  # try again until the lease would have lapsed
                log.warning("lease not renewed", group=self.group_id, error=str(error))
                return (time.monotonic() - renewed) * 1000 < self.ttl_ms
            renewed = time.monotonic() if kept else renewed
            return kept

        return renew

    @property
    def renew_every_s(self) -> float:
        return self.ttl_ms / 3000
