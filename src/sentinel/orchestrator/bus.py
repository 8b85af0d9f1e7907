"""Typed messages over Redis Streams: at least once, idempotent by key, nothing silently dropped.

A stream `name` lives at `<prefix>:stream:<name>`. Every consumer group reads it at its own
pace; within a group each entry goes to one consumer and stays pending until acknowledged.

- A handler that returns acknowledges its entry; one that raises leaves it pending, and a
  sweep (XAUTOCLAIM) hands it to a live consumer once it has been idle `claim_idle_ms`.
- Handlers that run long keep their lease: the entry is re-claimed by its own consumer
  (XCLAIM JUSTID) every `claim_idle_ms / 3`, so no other consumer takes it meanwhile.
- An entry delivered more than `max_deliveries` times, one whose payload does not validate,
  and one whose handler raises `Reject` go to `<prefix>:dlq:<name>` with the reason and the
  original fields, in the same transaction as their acknowledgement.
- Each message carries an idempotency key (its natural id by default). A group handles a key
  once: a marker `<prefix>:done:<name>:<group>:<key>` is set with the acknowledgement, and a
  lease on the key keeps two copies of one message from running at once.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

import anyio
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ResponseError

from sentinel.config import BusSettings, Settings
from sentinel.logs import get_logger
from sentinel.schemas.envelope import Envelope, peek_key
from sentinel.schemas.message import Message, MessageError, utc_now

log = get_logger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Envelope[M]], Awaitable[None]]
Entry = tuple[str, dict[str, str] | None]

SWEEP_START = "0-0"

# Take a key's lease for one entry, or say the key is done or held by another copy.
_LEASE = """
local function lease(marker, mine, ms)
  if redis.call('SET', marker, mine, 'NX', 'PX', ms) then return 'claim' end
  local held = redis.call('GET', marker)
  if held == mine then
    redis.call('PEXPIRE', marker, ms)
    return 'claim'
  elseif held == 'done' then
    return 'dup'
  end
  return 'busy'
end
"""

# (after _LEASE) Lease each [key, entry id] of ARGV[3] (JSON) under the marker prefix ARGV[2].
_CLAIM_KEYS = """
local out = {}
for i, pair in ipairs(cjson.decode(ARGV[3])) do
  out[i] = lease(ARGV[2] .. pair[1], 'run:' .. pair[2], ARGV[1])
end
return out
"""

# Settle a batch (ARGV[4], JSON): mark keys done, acknowledge every settled entry and count
# what happened. ARGV[3] is the marker prefix.
_SETTLE = """
local group, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]
local batch = cjson.decode(ARGV[4])
for _, key in ipairs(batch.done) do
  redis.call('SET', prefix .. key, 'done', 'EX', ttl)
end
if #batch.ack > 0 then
  redis.call('XACK', KEYS[1], group, unpack(batch.ack))
end
for name, n in pairs(batch.counts) do
  if n ~= 0 then redis.call('HINCRBY', KEYS[2], group .. ':' .. name, n) end
end
"""

# Per entry still owned by this consumer: reset its idle time and extend its key's lease.
_RENEW = """
local lost = 0
for i, key in ipairs(KEYS) do
  local id = ARGV[i + 3]
  local p = redis.call('XPENDING', ARGV[1], ARGV[2], id, id, 1)
  if p[1] and p[1][2] == ARGV[3] then
    redis.call('XCLAIM', ARGV[1], ARGV[2], ARGV[3], 0, id, 'JUSTID')
    redis.call('PEXPIRE', key, ARGV[4 + #KEYS])
  else
    lost = lost + 1
  end
end
return lost
"""


class Reject(Exception):
    """Raised by a handler: dead-letter this message now, do not retry it."""


class DeadLetter(BaseModel):
    entry_id: str  # the entry's id in the dead-letter stream
    stream: str
    group: str
    consumer: str
    original_id: str  # the entry's id in its own stream
    reason: str
    attempts: int
    dead_at: datetime
    fields: dict[str, str]  # the original entry, as it was on the wire


class StreamKeys:
    """The Redis key of everything the bus stores, from one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, name: str) -> str:
        return f"{self.prefix}:stream:{name}"

    def dlq(self, name: str) -> str:
        return f"{self.prefix}:dlq:{name}"

    def stats(self, name: str) -> str:
        return f"{self.prefix}:stats:{name}"

    def done(self, name: str, group: str, key: str = "") -> str:
        """A key's lease and done marker; with no key, the prefix the Lua scripts extend."""
        return f"{self.prefix}:done:{name}:{group}:{key}"

    def name_of(self, stream_key: str) -> str:
        return stream_key.removeprefix(f"{self.prefix}:stream:")


def connect(url: str, settings: Settings) -> aioredis.Redis:
    """A client whose socket timeout outlasts the longest blocking read."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
    )


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"


def _nogroup(error: ResponseError) -> bool:
    return str(error).startswith("NOGROUP")


class Bus:
    def __init__(self, client: aioredis.Redis, settings: BusSettings | None = None) -> None:
        self.redis = client
        self.settings = settings or BusSettings()
        self.keys = StreamKeys(self.settings.prefix)
        self.claim_script = client.register_script(_LEASE + _CLAIM_KEYS)
        self.renew_script = client.register_script(_RENEW)
        self.settle_script = client.register_script(_SETTLE)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def publish(self, stream: str, message: Message, key: str | None = None) -> str:
        """Append one message; returns its entry id."""
        return (await self.publish_many(stream, [message], [key]))[0]

    async def publish_many(
        self,
        stream: str,
        messages: Sequence[Message],
        keys: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Append messages in one round trip; returns their entry ids."""
        stream_key = self.keys.stream(stream)
        async with self.redis.pipeline(transaction=False) as pipe:
            for wire in Envelope.encode_many(messages, keys):
                pipe.xadd(stream_key, wire)  # type: ignore[arg-type]
            pipe.hincrby(self.keys.stats(stream), "published", len(messages))
            results = await pipe.execute()
        return cast("list[str]", results[:-1])

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group at the stream's start (and the stream), tolerating BUSYGROUP."""
        try:
            await self.redis.xgroup_create(self.keys.stream(stream), group, id="0", mkstream=True)
        except ResponseError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise

    def consumer(
        self,
        stream: str,
        group: str,
        model: type[M],
        handler: Handler[M],
        name: str | None = None,
    ) -> Consumer[M]:
        return Consumer(self, stream, group, name or default_consumer_name(), model, handler)

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str | None,
        model: type[M],
        handler: Handler[M],
        *,
        stop: anyio.Event | None = None,
    ) -> None:
        """Handle `model` messages from `stream` as `consumer` of `group` until `stop` is set."""
        await self.consumer(stream, group, model, handler, consumer).run(stop)

    async def streams(self) -> list[str]:
        """Names of the streams under this prefix."""
        pattern = self.keys.stream("*")
        found = [self.keys.name_of(key) async for key in self.redis.scan_iter(pattern, count=500)]
        return sorted(found)

    async def trim(self, stream: str) -> int:
        """Drop entries that every group has acknowledged; returns how many went.

        The floor is the oldest entry any group still has pending, or, for a group with
        nothing pending, the last entry it was given. A stream without groups is not trimmed.
        """
        key = self.keys.stream(stream)
        if not await self.redis.exists(key):
            return 0
        groups = await self.redis.xinfo_groups(key)
        if not groups:
            return 0
        floors = []
        for group in groups:
            floor = _successor(str(group["last-delivered-id"]))
            if group["pending"]:  # may be acknowledged meanwhile: then min is None
                summary = await self.redis.xpending(key, group["name"])
                if summary["min"] is not None:
                    floor = min(floor, str(summary["min"]), key=_entry_order)
            floors.append(floor)
        return await self.redis.xtrim(key, minid=min(floors, key=_entry_order), approximate=False)

    async def dead_letters(self, stream: str, count: int = 100) -> list[DeadLetter]:
        entries = cast(list[Entry], await self.redis.xrange(self.keys.dlq(stream), count=count))
        return [_dead_letter(entry_id, fields or {}) for entry_id, fields in entries]

    async def replay_dead_letter(self, stream: str, entry_id: str) -> str:
        """Put a dead letter back on its stream, unchanged, and remove it from the DLQ."""
        entries = cast(
            list[Entry], await self.redis.xrange(self.keys.dlq(stream), entry_id, entry_id)
        )
        if not entries:
            raise KeyError(f"no dead letter {entry_id} on {stream}")
        letter = _dead_letter(entries[0][0], entries[0][1] or {})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.stream(stream), letter.fields)  # type: ignore[arg-type]
            pipe.xdel(self.keys.dlq(stream), entry_id)
            if (key := peek_key(letter.fields)) is not None:
                pipe.delete(self.keys.done(stream, letter.group, key))
            new_id, *_ = await pipe.execute()
        return cast("str", new_id)


def _successor(entry_id: str) -> str:
    ms, seq = _entry_order(entry_id)
    return f"{ms}-{seq + 1}"


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _dead_letter(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    meta = {k.removeprefix("dlq."): v for k, v in fields.items() if k.startswith("dlq.")}
    original = {k: v for k, v in fields.items() if not k.startswith("dlq.")}
    return DeadLetter(
        entry_id=entry_id,
        stream=meta.get("stream", ""),
        group=meta.get("group", ""),
        consumer=meta.get("consumer", ""),
        original_id=meta.get("id", ""),
        reason=meta.get("reason", ""),
        attempts=int(meta.get("attempts", "0")),
        dead_at=datetime.fromisoformat(meta["at"]) if "at" in meta else utc_now(),
        fields=original,
    )


@dataclass
class _Batch:
    """What became of one batch of entries, settled in one transaction."""

    read: int = 0  # entries new to the group (not swept)
    claimed: int = 0

    @property
    def size(self) -> int:
        return self.read + self.claimed

    done: list[tuple[str, str]] = field(default_factory=list)  # (entry id, key)
    duplicates: list[str] = field(default_factory=list)
    dead: list[tuple[str, dict[str, str], str, int]] = field(default_factory=list)
    failed: int = 0


class _Room:
    """Free handler slots, taken and given back a batch at a time (not one by one)."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._freed = anyio.Event()

    async def wait(self) -> None:
        while self.free <= 0:
            self._freed = anyio.Event()
            await self._freed.wait()

    def take(self, n: int) -> None:
        self.free -= n

    def give(self, n: int) -> None:
        self.free += n
        self._freed.set()


class Consumer(Generic[M]):
    """One consumer of one group: reads, sweeps abandoned entries, handles, settles."""

    def __init__(
        self,
        bus: Bus,
        stream: str,
        group: str,
        name: str,
        model: type[M],
        handler: Handler[M],
    ) -> None:
        self.bus, self.stream, self.group, self.name = bus, stream, group, name
        self.model, self.handler = model, handler
        self.settings = bus.settings
        self.key = bus.keys.stream(stream)
        self.markers = bus.keys.done(stream, group)  # + a message key: its lease / done marker
        self._cursor = SWEEP_START
        self._next_sweep = 0.0  # sweep at once: a replacement picks up a dead one's work
        self._in_flight: dict[str, str] = {}  # entry id -> done-marker key
        self._room = _Room(max(self.settings.concurrency, self.settings.batch_size))
        self.log = log.bind(stream=stream, group=group, consumer=name)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Read while handlers run, up to `concurrency` entries in flight, until `stop`.

        Each read batch is handled and settled on its own, so one slow handler holds back
        only its own batch. On stop, reading ends and running handlers finish.
        """
        await self.bus.ensure_group(self.stream, self.group)
        self.log.info("consumer started", model=self.model.type_name())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_leases)
            async with anyio.create_task_group() as handlers:
                while stop is None or not stop.is_set():
                    await self._room.wait()
                    fetched = await self._fetch(self._room.free)
                    if fetched is not None:
                        self._room.take(fetched[0].size)
                        handlers.start_soon(self._handle_batch, *fetched)
            tg.cancel_scope.cancel()
        self.log.info("consumer stopped")

    async def poll(self) -> int:
        """Fetch and handle one batch, then return its size (for tests and benchmarks)."""
        fetched = await self._fetch(self.settings.batch_size)
        if fetched is None:
            return 0
        self._room.take(fetched[0].size)
        await self._handle_batch(*fetched)
        return fetched[0].size

    async def _fetch(self, room: int) -> tuple[_Batch, list[Entry], dict[str, int]] | None:
        """Abandoned entries first (when a sweep is due), else new ones; None if nothing."""
        count = max(1, min(room, self.settings.batch_size))
        attempts: dict[str, int] = {}
        entries: list[Entry] = []
        if time.monotonic() >= self._next_sweep:
            entries, attempts = await self._sweep(count)
        batch = _Batch(claimed=len(entries))
        if not entries:
            entries = await self._read(count)
            batch.read = len(entries)
        return (batch, entries, attempts) if entries else None

    async def _read(self, count: int) -> list[Entry]:
        try:
            reply: list[tuple[str, list[Entry]]] = await self.bus.redis.xreadgroup(  # type: ignore[assignment]
                self.group,
                self.name,
                {self.key: ">"},
                count=count,
                block=self.settings.block_ms,
            )
        except ResponseError as error:
            if not _nogroup(error):
                raise
            self.log.warning("group missing; recreating")
            await self.bus.ensure_group(self.stream, self.group)
            return []
        return reply[0][1] if reply else []

    async def _sweep(self, count: int) -> tuple[list[Entry], dict[str, int]]:
        """Claim entries idle past `claim_idle_ms` (from dead or failed handlers)."""
        try:
            cursor, claimed, *_ = await self.bus.redis.xautoclaim(
                self.key,
                self.group,
                self.name,
                min_idle_time=self.settings.claim_idle_ms,
                start_id=self._cursor,
                count=count,
            )
        except ResponseError as error:
            if not _nogroup(error):
                raise
            await self.bus.ensure_group(self.stream, self.group)
            return [], {}
        self._cursor = str(cursor)
        if self._cursor == SWEEP_START:
            jitter = random.uniform(0.75, 1.25)
            self._next_sweep = time.monotonic() + jitter * self.settings.claim_idle_ms / 4000
        if not claimed:
            return [], {}
        ids = [entry_id for entry_id, _ in claimed]
        pending = await self.bus.redis.xpending_range(
            self.key,
            self.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) * 2,
            consumername=self.name,
        )
        attempts = {str(p["message_id"]): int(p["times_delivered"]) for p in pending}
        self.log.info("reclaimed abandoned entries", count=len(ids))
        return cast("list[Entry]", claimed), attempts

    async def _handle_batch(
        self, batch: _Batch, entries: list[Entry], attempts: dict[str, int]
    ) -> None:
        try:
            await self._decode_claim_run_settle(batch, entries, attempts)
        finally:
            self._room.give(batch.size)

    async def _decode_claim_run_settle(
        self, batch: _Batch, entries: list[Entry], attempts: dict[str, int]
    ) -> None:
        ready: list[Envelope[M]] = []
        ids: dict[str, str] = {}  # message key -> entry id
        for entry_id, fields in entries:
            attempt = attempts.get(entry_id, 1)
            envelope = self._decode(batch, entry_id, fields, attempt)
            if envelope is None:
                continue
            if envelope.key in ids:  # a second copy in this very batch
                batch.duplicates.append(entry_id)
                continue
            ids[envelope.key] = entry_id
            ready.append(envelope)
        runnable = await self._claim(batch, ready, ids)
        await self._run_handlers(batch, runnable, ids)
        await self._settle(batch)

    def _decode(
        self, batch: _Batch, entry_id: str, fields: dict[str, str] | None, attempt: int
    ) -> Envelope[M] | None:
        if not fields:
            batch.dead.append((entry_id, {}, "entry was deleted before it was handled", attempt))
            return None
        if attempt > self.settings.max_deliveries:
            reason = f"delivered {attempt} times (max_deliveries {self.settings.max_deliveries})"
            batch.dead.append((entry_id, fields, reason, attempt))
            return None
        try:
            return Envelope.from_wire(fields, self.model, attempt)
        except MessageError as error:
            batch.dead.append((entry_id, fields, str(error), attempt))
            return None

    async def _claim(
        self, batch: _Batch, ready: list[Envelope[M]], ids: dict[str, str]
    ) -> list[Envelope[M]]:
        """Take each key's lease; drop keys already done, leave keys another copy holds."""
        if not ready:
            return []
        pairs = json.dumps([[e.key, ids[e.key]] for e in ready], ensure_ascii=False)
        verdicts = await self.bus.claim_script(
            keys=[], args=[self.settings.claim_idle_ms, self.markers, pairs]
        )
        runnable = []
        for envelope, verdict in zip(ready, verdicts, strict=True):
            entry_id = ids[envelope.key]
            if verdict == "claim":
                self._in_flight[entry_id] = self.markers + envelope.key
                runnable.append(envelope)
            elif verdict == "dup":
                batch.duplicates.append(entry_id)
            # "busy": another copy runs now; this one stays pending and is swept later
        return runnable

    async def _run_handlers(
        self, batch: _Batch, envelopes: list[Envelope[M]], ids: dict[str, str]
    ) -> None:
        """Run the batch on up to `concurrency` workers, spawned only once a handler waits.

        This task is the first worker. The others start when it first yields, that is when
        a handler suspends; handlers that never do run in turn without spawning a task
        (a task costs ~20-40 us, more than a small handler).
        """
        queue = deque(envelopes)

        async def worker() -> None:
            while queue:
                envelope = queue.popleft()
                await self._run_one(batch, envelope, ids[envelope.key])

        async def more_workers() -> None:  # runs once the first worker waits, if ever
            for _ in range(min(self.settings.concurrency - 1, len(queue))):
                tg.start_soon(worker)

        async with anyio.create_task_group() as tg:
            if self.settings.concurrency > 1 and len(envelopes) > 1:
                tg.start_soon(more_workers)
            await worker()

    async def _run_one(self, batch: _Batch, envelope: Envelope[M], entry_id: str) -> None:
        try:
            await self.handler(envelope)
        except Reject as error:
            batch.dead.append(
                (entry_id, envelope.to_wire(), f"rejected: {error}", envelope.attempt)
            )
        except Exception as error:
            batch.failed += 1
            self._in_flight.pop(entry_id, None)  # its key lease lapses; a sweep retries it
            self.log.exception(
                "handler failed; will retry", entry_id=entry_id, key=envelope.key,
                attempt=envelope.attempt, error=repr(error),
            )  # fmt: skip
        else:
            batch.done.append((entry_id, envelope.key))

    async def _settle(self, batch: _Batch) -> None:
        """Acknowledge, mark done and dead-letter the whole batch in one transaction.

        The batch goes to Redis as one JSON argument: encoding a few hundred separate
        arguments costs redis-py more than the script takes to run.
        """
        keys = self.bus.keys
        done_ids = [entry_id for entry_id, _ in batch.done]
        dead_ids = [entry_id for entry_id, *_ in batch.dead]
        counts = {"read": batch.read, "claimed": batch.claimed,
                  "acked": len(done_ids) + len(batch.duplicates),
                  "duplicates": len(batch.duplicates), "dead": len(dead_ids),
                  "failed": batch.failed}  # fmt: skip
        acked = [*done_ids, *batch.duplicates, *dead_ids]
        done_keys = [key for _, key in batch.done]
        settled = {"ack": acked, "done": done_keys, "counts": counts}
        script_keys = [self.key, keys.stats(self.stream)]
        script_args: list[str | int] = [self.group, self.settings.dedupe_ttl_s, self.markers]
        script_args.append(json.dumps(settled, ensure_ascii=False))
        if not batch.dead:
            await self.bus.settle_script(keys=script_keys, args=script_args)
        else:
            async with self.bus.redis.pipeline(transaction=True) as pipe:
                for entry_id, fields, reason, attempt in batch.dead:
                    letter: dict[Any, Any] = {**fields, **self._dlq_meta(entry_id, reason, attempt)}
                    pipe.xadd(keys.dlq(self.stream), letter)
                await self.bus.settle_script(keys=script_keys, args=script_args, client=pipe)
                await pipe.execute()
        for entry_id in acked:
            self._in_flight.pop(entry_id, None)
        for entry_id, _, reason, attempt in batch.dead:
            self.log.warning("dead-lettered", entry_id=entry_id, reason=reason, attempts=attempt)

    def _dlq_meta(self, entry_id: str, reason: str, attempt: int) -> dict[str, str]:
        return {
            "dlq.stream": self.stream,
            "dlq.group": self.group,
            "dlq.consumer": self.name,
            "dlq.id": entry_id,
            "dlq.reason": reason,
            "dlq.attempts": str(attempt),
            "dlq.at": utc_now().isoformat(),
        }

    async def _keep_leases(self) -> None:
        """Re-claim in-flight entries well before anyone may sweep them."""
        while True:
            await anyio.sleep(self.settings.lease_renew_s)
            if not self._in_flight:
                continue
            ids, markers = list(self._in_flight), list(self._in_flight.values())
            lost = await self.bus.renew_script(
                keys=markers,
                args=[self.key, self.group, self.name, *ids, self.settings.claim_idle_ms],
            )
            if lost:
                self.log.warning("lost leases to another consumer", count=lost)
