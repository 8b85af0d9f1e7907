"""Rollout requests sent and not yet back: recorded before they are sent, sent again after a
crash, and found again when their worker dies.

- **Recorded, then sent.** A request is written to its hash (`<prefix>:loop:<name>`, id →
  `InFlight` with the request itself) and to the hash's `unsent` set in the same transaction
  as whatever the caller counts, and leaves `unsent` once the broker has it. An orchestrator
  that dies in between sends it on restart (`send_unsent`); a copy sent twice is harmless,
  since the copy finds the group's lease held or the group over (`workers.lease`).
- **Reaped.** A group whose worker has started it (its attempt counter) but that nobody holds
  (its lease lapsed: the worker died) is sent again under the same id, up to
  `workers.max_attempts`, and then written off. A group no worker has started within
  `loop.inflight_timeout_s` is written off too. Writing off fences the group (no late copy
  starts it) and publishes a dropped `RolloutGroup` under its id to `rollout_groups`, so the
  orchestrator, the trainer and the record count it once, with its reason, like any group.
  Should the real group still arrive, the bus keeps whichever of the two came first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import anyio
from celery import Celery
from pydantic import BaseModel, ValidationError
from redis.asyncio.client import Pipeline

from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import RolloutGroup, RolloutRequest
from sentinel.workers.app import ROLLOUT_QUEUE
from sentinel.workers.lease import DONE, WRITTEN_OFF, attempts_key, is_held, lease_key, write_off

log = get_logger(__name__)

# KEYS: hash. ARGV: field, value. Update an entry only while it is still in flight.
_UPDATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class InFlight(BaseModel):
    task: str
    at: float  # when it was last sent (epoch seconds)
    request: str | None = None  # the RolloutRequest, to send again; None before issue 19
    resent_after: int = 0  # the worker's attempts when it was last sent again
    written_off: bool = False  # its dropped group is published

    def parsed(self) -> RolloutRequest | None:
        try:
            return RolloutRequest.model_validate_json(self.request) if self.request else None
        except ValidationError:
            return None


@dataclass(frozen=True)
class Seen:
    """What the reaper found of one entry: its lease and its worker's attempts."""

    entry: InFlight
    lease: str | None
    attempts: int


class Flights:
    """One hash of in-flight requests (`name`: `inflight` for training, `eval:inflight`)."""

    def __init__(self, bus: Bus, celery: Celery, settings: Settings, name: str) -> None:
        self.bus = bus
        self.redis = bus.redis
        self.celery = celery
        self.settings = settings
        self.prefix = settings.bus.prefix
        self.hash = f"{self.prefix}:loop:{name}"
        self.unsent = f"{self.hash}:unsent"
        self._update = self.redis.register_script(_UPDATE)

    def record(self, pipe: Pipeline, request: RolloutRequest) -> None:
        """Queue the writes that put `request` in flight (on the caller's transaction)."""
        entry = InFlight(task=request.task.id, at=time.time(), request=request.model_dump_json())
        pipe.hset(self.hash, request.id, entry.model_dump_json())
        pipe.sadd(self.unsent, request.id)

    def forget(self, pipe: Pipeline, group_id: str) -> None:
        pipe.hdel(self.hash, group_id)
        pipe.srem(self.unsent, group_id)

    async def send(self, request: RolloutRequest) -> None:
        await anyio.to_thread.run_sync(self._send, request)
        await self.redis.srem(self.unsent, request.id)

    def _send(self, request: RolloutRequest) -> None:
        self.celery.send_task(
            "sentinel.rollout", args=[request.model_dump_json()], task_id=request.id,
            queue=ROLLOUT_QUEUE,
        )  # fmt: skip

    async def send_unsent(self) -> int:
        """Send what a crash left recorded but unsent; how many."""
        sent = 0
        for group_id in await self.redis.smembers(self.unsent):
            raw = await self.redis.hget(self.hash, group_id)
            request = InFlight.model_validate_json(raw).parsed() if raw else None
            if request is None:  # back already, or nothing to send
                await self.redis.srem(self.unsent, group_id)
                continue
            await self.send(request)
            log.info("rollout sent after a restart", group=group_id, task=request.task.id)
            sent += 1
        return sent

    async def size(self) -> int:
        return int(await self.redis.hlen(self.hash))

    async def seen(self) -> dict[str, Seen]:
        entries = cast(dict[str, str], await self.redis.hgetall(self.hash))  # decoded
        ids = list(entries)
        async with self.redis.pipeline(transaction=False) as pipe:
            for group_id in ids:
                pipe.get(lease_key(self.prefix, group_id))
                pipe.get(attempts_key(self.prefix, group_id))
            found = await pipe.execute()
        return {
            group_id: Seen(
                InFlight.model_validate_json(entries[group_id]),
                found[2 * i],
                int(found[2 * i + 1] or 0),
            )
            for i, group_id in enumerate(ids)
        }

    async def reap(self) -> None:
        """Send again or write off every group that nobody runs and that will not come back."""
        workers, loop = self.settings.workers, self.settings.loop
        now = time.time()
        for group_id, seen in (await self.seen()).items():
            entry = seen.entry
            if is_held(seen.lease) or seen.lease == DONE or entry.written_off:
                continue  # running, waiting for its retry, or its group is on the stream
            if seen.lease == WRITTEN_OFF:  # fenced, but the dropped group was never published
                await self._publish_drop(group_id, entry, "written off before a restart")
            elif seen.attempts > entry.resent_after:  # started, and its worker is gone
                if seen.attempts >= workers.max_attempts or entry.parsed() is None:
                    reason = (
                        f"worker lost: its lease lapsed on attempt {seen.attempts} "
                        f"of {workers.max_attempts}"
                    )
                    await self._write_off(group_id, entry, reason)
                else:
                    await self._send_again(group_id, entry, seen.attempts)
            elif now - entry.at > loop.inflight_timeout_s:
                reason = f"no rollout worker started it within {loop.inflight_timeout_s:.0f} s"
                await self._write_off(group_id, entry, reason)

    async def _send_again(self, group_id: str, entry: InFlight, attempts: int) -> None:
        request = entry.parsed()
        assert request is not None
        update = entry.model_copy(update={"resent_after": attempts, "at": time.time()})
        if await self._update(keys=[self.hash], args=[group_id, update.model_dump_json()]):
            await self.send(request)
            log.warning(
                "rollout sent again: its worker died", group=group_id, task=entry.task,
                attempt=attempts, max_attempts=self.settings.workers.max_attempts,
            )  # fmt: skip

    async def _write_off(self, group_id: str, entry: InFlight, reason: str) -> None:
        if not await write_off(self.redis, self.prefix, group_id):
            return  # a copy took the lease just now: it runs
        await self._publish_drop(group_id, entry, reason)

    async def _publish_drop(self, group_id: str, entry: InFlight, reason: str) -> None:
        request = entry.parsed()
        group = RolloutGroup(
            id=group_id, task_id=entry.task, trajectories=[], dropped=reason,
            policy_version=request.policy_version if request else 0,
            purpose=request.purpose if request else "train",
        )  # fmt: skip
        await self.bus.publish(Stream.ROLLOUT_GROUPS, group)
        update = entry.model_copy(update={"written_off": True})
        await self._update(keys=[self.hash], args=[group_id, update.model_dump_json()])
        log.warning("rollout group written off", group=group_id, task=entry.task, reason=reason)
