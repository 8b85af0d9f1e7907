"""Typed messages over Redis Streams: at least once, idempotent by key, nothing silently dropped.

A stream `name` lives at `<prefix>:stream:<name>`. Every consumer group reads it at its own
pace; within a group each entry goes to one consumer and stays pending until acknowledged.

- A handler that returns acknowledges its entry; one that raises leaves it pending, and a
  sweep (XAUTOCLAIM) hands it to a live consumer once it has been idle `claim_idle_ms`.
- Handlers that run long keep their entries: each is re-claimed by its own consumer
  (XCLAIM JUSTID) every `claim_idle_ms / 3`, so no other consumer takes it meanwhile.
- An entry delivered more than `max_deliveries` times, one whose payload does not validate
  (or comes from a newer schema), and one whose handler raises `Reject` go to
  `<prefix>:dlq:<name>` with the reason and the original fields, in the same script as their
  acknowledgement. A dead-letter stream keeps its newest `dlq_maxlen` entries; what the cap
  drops is counted (`dlq_dropped` in the stream's stats) and logged.
- Each stream declares the groups that read it (`streams.GROUPS`). The first publish to a
  stream and every consumer's start create them at id 0, and `trim` keeps every entry a
  declared group has not acknowledged, even while that group does not exist yet.
- Each message carries an idempotency key (its natural id by default). A group handles a key
  once: the first of its entries to be read owns it (a hash per `dedupe_ttl_s` period,
  `<prefix>:owners:<name>:<group>:<period>`, maps key to entry id); only the owner runs,
  and later copies are acknowledged unrun.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar, cast

import anyio
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sentinel.config import BusSettings, Settings
from sentinel.logs import get_logger
from sentinel.orchestrator.streams import GROUPS
from sentinel.schemas.envelope import WIRE_FIELD, Envelope, peek_key
from sentinel.schemas.message import Message, MessageError, utc_now

log = get_logger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Envelope[M]], Awaitable[None]]
Entry = tuple[str, dict[str, str] | None]

SWEEP_START = "0-0"
PUBLISH_CHUNK = 500  # messages appended per script call

# Append messages (ARGV: their envelopes' JSON) and count them, in one command: redis-py
# spends ~30 us per command of a pipeline, more than Redis spends on the script.
_PUBLISH = f"""
local ids = {{}}
for i, envelope in ipairs(ARGV) do
  ids[i] = redis.call('XADD', KEYS[1], '*', '{WIRE_FIELD}', envelope)
end
redis.call('HINCRBY', KEYS[2], 'published', #ids)
return ids
"""

# Decide who runs each [key, entry id] of ARGV[2] (JSON): 1 for the key's owner, 0 for a
# duplicate. A key's owner is the first entry of the group to claim it; only the owner runs
# (again, if retried). While the owner is pending the group's PEL keeps it alive, so no lease
# is needed. Owners live in one hash per period of `dedupe_ttl_s` (ARGV[1]): KEYS[1] this
# period's, KEYS[2] the last one's. A hash expires two periods after its last write, so a key
# is remembered at least `dedupe_ttl_s`, at most twice that.
_CLAIM = """
local ttl, pairs = ARGV[1], cjson.decode(ARGV[2])
local keys, seen, new, verdicts = {}, {}, {}, {}
for i, pair in ipairs(pairs) do keys[i] = pair[1] end
local now = redis.call('HMGET', KEYS[1], unpack(keys))
local before = redis.call('HMGET', KEYS[2], unpack(keys))
for i, pair in ipairs(pairs) do
  local key, id = pair[1], pair[2]
  local owner = seen[key] or now[i] or before[i]
  if not owner then
    owner, seen[key] = id, id
    new[#new + 1], new[#new + 2] = key, id
  end
  verdicts[i] = owner == id and 1 or 0
end
if #new > 0 then
  redis.call('HSET', KEYS[1], unpack(new))
  redis.call('EXPIRE', KEYS[1], 2 * ttl)
end
return verdicts
"""

# KEYS: the stream, its stats, the owner hashes, the dead-letter stream. ARGV: group, the
# batch as JSON, dlq_maxlen. Dead-letter, acknowledge the batch's entries, give up the keys
# its dead letters own (so that a replay runs) and count what happened. Past dlq_maxlen the
# oldest dead letters go; returns their original entry ids, for the log.
_SETTLE = """
local batch, dropped = cjson.decode(ARGV[2]), {}
if #batch.dead > 0 then
  for _, letter in ipairs(batch.dead) do redis.call('XADD', KEYS[5], '*', unpack(letter)) end
  local over = redis.call('XLEN', KEYS[5]) - tonumber(ARGV[3])
  if over > 0 then
    for _, entry in ipairs(redis.call('XRANGE', KEYS[5], '-', '+', 'COUNT', over)) do
      local f = entry[2]
      for i = 1, #f, 2 do
        if f[i] == 'dlq.id' then dropped[#dropped + 1] = f[i + 1] end
      end
    end
    redis.call('XTRIM', KEYS[5], 'MAXLEN', ARGV[3])
    redis.call('HINCRBY', KEYS[2], 'dlq_dropped', over)
  end
end
if #batch.ack > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(batch.ack))
end
for _, pair in ipairs(batch.release) do
  for h = 3, 4 do
    if redis.call('HGET', KEYS[h], pair[1]) == pair[2] then redis.call('HDEL', KEYS[h], pair[1]) end
  end
end
for name, n in pairs(batch.counts) do
  if n ~= 0 then redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':' .. name, n) end
end
return dropped
"""

# Create each group of ARGV at id 0 (and the stream KEYS[1]); one that exists is left as is.
_CREATE_GROUPS = """
for _, group in ipairs(ARGV) do
  local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
  if type(ok) == 'table' and ok.err and not string.find(ok.err, '^BUSYGROUP') then
    return redis.error_reply(ok.err)
  end
end
"""

# Reset the idle time of each entry (ARGV[4..]) still pending with this consumer.
_RENEW = """
local lost = 0
for i = 4, #ARGV do
  local p = redis.call('XPENDING', ARGV[1], ARGV[2], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[3] then
    redis.call('XCLAIM', ARGV[1], ARGV[2], ARGV[3], 0, ARGV[i], 'JUSTID')
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

    def owners(self, name: str, group: str, period: int) -> str:
        """The hash of the keys a group's entries own, for one `dedupe_ttl_s` period."""
        return f"{self.prefix}:owners:{name}:{group}:{period}"

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
    def __init__(
        self,
        client: aioredis.Redis,
        settings: BusSettings | None = None,
        groups: Mapping[str, Sequence[str]] = GROUPS,
    ) -> None:
        """`groups`: the consumer groups each stream must keep its entries for."""
        self.redis = client
        self.settings = settings or BusSettings()
        self.keys = StreamKeys(self.settings.prefix)
        self.groups = groups
        self._declared: set[str] = set()  # streams whose groups this bus has created
        self.create_groups_script = client.register_script(_CREATE_GROUPS)
        self.publish_script = client.register_script(_PUBLISH)
        self.claim_script = client.register_script(_CLAIM)
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
        """Append messages in one round trip per `PUBLISH_CHUNK`; returns their entry ids."""
        if stream not in self._declared:  # before the first entry: no group misses it
            await self.ensure_groups(stream)
        script_keys = [self.keys.stream(stream), self.keys.stats(stream)]
        wires = Envelope.encode_many(messages, keys)
        ids: list[str] = []
        for start in range(0, len(wires), PUBLISH_CHUNK):
            args = [wire[WIRE_FIELD] for wire in wires[start : start + PUBLISH_CHUNK]]
            ids += await self.publish_script(keys=script_keys, args=args)
        return ids

    def owner_keys(self, stream: str, group: str) -> list[str]:
        """The owner hashes a script consults now: this period's, then the last one's."""
        period = int(time.time()) // self.settings.dedupe_ttl_s
        return [self.keys.owners(stream, group, p) for p in (period, period - 1)]

    async def owner(self, stream: str, group: str, key: str) -> str | None:
        """The id of the entry that owns `key` in `group`, if any."""
        for hash_key in self.owner_keys(stream, group):
            if (entry_id := await self.redis.hget(hash_key, key)) is not None:
                return cast("str", entry_id)
        return None

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group at the stream's start (and the stream), tolerating BUSYGROUP."""
        await self.ensure_groups(stream, group)

    async def ensure_groups(self, stream: str, *extra: str) -> None:
        """Create the stream's declared groups and `extra` ones, at id 0, in one call."""
        groups = list(dict.fromkeys([*self.groups.get(stream, ()), *extra]))
        if groups:
            await self.create_groups_script(keys=[self.keys.stream(stream)], args=groups)
        self._declared.add(stream)

    async def declare_all(self) -> None:
        """Create every declared group of every stream (a process's start, the monitor's)."""
        for stream in self.groups:
            await self.ensure_groups(stream)

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
        nothing pending, the last entry it was given. A stream without groups is not trimmed,
        nor one missing a declared group: that group's consumer has not started yet.
        """
        key = self.keys.stream(stream)
        if not await self.redis.exists(key):
            return 0
        groups = await self.redis.xinfo_groups(key)
        if not groups:
            return 0
        present = {str(group["name"]) for group in groups}
        if missing := [g for g in self.groups.get(stream, ()) if g not in present]:
            log.debug("not trimming: declared groups missing", stream=stream, missing=missing)
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
            new_id, *_ = await pipe.execute()
        return cast("str", new_id)


def _flat(fields: dict[str, str]) -> list[str]:
    """A stream entry's fields as XADD takes them: name, value, name, value..."""
    return [item for pair in fields.items() for item in pair]


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
    """One batch of entries, from its fetch to its settlement in one transaction."""

    entries: list[Entry]
    swept: bool = False  # claimed from idle consumers, not read new
    attempts: dict[str, int] = field(default_factory=dict)  # deliveries of swept entries
    done: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dead: list[tuple[str, dict[str, str], str, int]] = field(default_factory=list)
    failed: int = 0

    @property
    def size(self) -> int:
        return len(self.entries)


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
        self._cursor = SWEEP_START
        self._next_sweep = 0.0  # sweep at once: a replacement picks up a dead one's work
        self._in_flight: set[str] = set()  # entry ids whose handlers run
        self._room = _Room(max(self.settings.concurrency, self.settings.batch_size))
        self.log = log.bind(stream=stream, group=group, consumer=name)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Read while handlers run, up to `concurrency` entries in flight, until `stop`.

        Each read batch is handled and settled on its own, so one slow handler holds back
        only its own batch. On stop, reading ends and running handlers finish.
        """
        await self.bus.ensure_groups(self.stream, self.group)
        declared = self.bus.groups.get(self.stream)
        if declared is not None and self.group not in declared:
            self.log.warning(
                "consumer group not declared in streams.GROUPS: trimming may drop entries "
                "before this group reads them", declared=list(declared),
            )  # fmt: skip
        self.log.info("consumer started", model=self.model.type_name())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_leases)
            async with anyio.create_task_group() as handlers:
                while stop is None or not stop.is_set():
                    await self._room.wait()
                    try:
                        batch = await self._fetch(self._room.free)
                    except (RedisTimeoutError, RedisConnectionError) as error:
                        # a starved or restarting Redis: unacknowledged entries wait in the
                        # group, so reading again later loses nothing
                        self.log.warning("redis did not answer; reading again", error=repr(error))
                        await anyio.sleep(self.settings.block_ms / 1000)
                        continue
                    if batch is not None:
                        self._room.take(batch.size)
                        handlers.start_soon(self._handle_batch, batch)
            tg.cancel_scope.cancel()
        self.log.info("consumer stopped")

    async def poll(self) -> int:
        """Fetch and handle one batch, then return its size (for tests and benchmarks)."""
        batch = await self._fetch(self.settings.batch_size)
        if batch is None:
            return 0
        self._room.take(batch.size)
        await self._handle_batch(batch)
        return batch.size

    async def _fetch(self, room: int) -> _Batch | None:
        """Abandoned entries first (when a sweep is due), else new ones; None if nothing."""
        count = max(1, min(room, self.settings.batch_size))
        if time.monotonic() >= self._next_sweep and (swept := await self._sweep(count)):
            return swept
        return await self._read(count)

    async def _read(self, count: int) -> _Batch | None:
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
            await self.bus.ensure_groups(self.stream, self.group)
            return None
        return _Batch(reply[0][1]) if reply else None

    async def _sweep(self, count: int) -> _Batch | None:
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
            await self.bus.ensure_groups(self.stream, self.group)
            return None
        self._cursor = str(cursor)
        if self._cursor == SWEEP_START:
            jitter = random.uniform(0.75, 1.25)
            self._next_sweep = time.monotonic() + jitter * self.settings.claim_idle_ms / 4000
        # Our own running entries, idle because their renewals starved (a loaded CPU): the
        # claim just renewed them, and their handlers are still on them.
        claimed = [entry for entry in claimed if entry[0] not in self._in_flight]
        if not claimed:
            return None
        ids = [entry_id for entry_id, _ in claimed]
        pending = await self.bus.redis.xpending_range(
            self.key,
            self.group,
            min=ids[0],
            max=ids[-1],
            count=len(ids) * 2,
            consumername=self.name,
        )
        self.log.info("reclaimed abandoned entries", count=len(ids))
        attempts = {str(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return _Batch(cast("list[Entry]", claimed), swept=True, attempts=attempts)

    async def _handle_batch(self, batch: _Batch) -> None:
        try:
            await self._decode_own_run_settle(batch)
        finally:
            self._room.give(batch.size)

    async def _decode_own_run_settle(self, batch: _Batch) -> None:
        ready: list[tuple[str, Envelope[M]]] = []
        for entry_id, fields in batch.entries:
            envelope = self._decode(batch, entry_id, fields, batch.attempts.get(entry_id, 1))
            if envelope is not None:
                ready.append((entry_id, envelope))
        runnable = await self._own(batch, ready)
        await self._run_handlers(batch, runnable)
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

    async def _own(
        self, batch: _Batch, ready: list[tuple[str, Envelope[M]]]
    ) -> list[tuple[str, Envelope[M]]]:
        """The entries that own their keys, and so run; the others are duplicates."""
        if not ready:
            return []
        pairs = json.dumps([[e.key, entry_id] for entry_id, e in ready], ensure_ascii=False)
        owners = self.bus.owner_keys(self.stream, self.group)
        args: list[str | int] = [self.settings.dedupe_ttl_s, pairs]
        owned = await self.bus.claim_script(keys=owners, args=args)
        runnable = []
        for (entry_id, envelope), verdict in zip(ready, owned, strict=True):
            if verdict:
                self._in_flight.add(entry_id)
                runnable.append((entry_id, envelope))
            else:
                batch.duplicates.append(entry_id)
        return runnable

    async def _run_handlers(self, batch: _Batch, runnable: list[tuple[str, Envelope[M]]]) -> None:
        """Run the batch on up to `concurrency` workers, spawned only once a handler waits.

        This task is the first worker. The others start when it first yields, that is when
        a handler suspends; handlers that never do run in turn without spawning a task
        (a task costs ~20-40 us, more than a small handler).
        """
        queue = deque(runnable)

        async def worker() -> None:
            while queue:
                await self._run_one(batch, *queue.popleft())

        async def more_workers() -> None:  # runs once the first worker waits, if ever
            for _ in range(min(self.settings.concurrency - 1, len(queue))):
                tg.start_soon(worker)

        async with anyio.create_task_group() as tg:
            if self.settings.concurrency > 1 and len(runnable) > 1:
                tg.start_soon(more_workers)
            await worker()

    async def _run_one(self, batch: _Batch, entry_id: str, envelope: Envelope[M]) -> None:
        try:
            await self.handler(envelope)
        except Reject as error:
            batch.dead.append(
                (entry_id, envelope.to_wire(), f"rejected: {error}", envelope.attempt)
            )
        except Exception as error:
            batch.failed += 1
            self._in_flight.discard(entry_id)  # left idle, so that a sweep retries it
            self.log.exception(
                "handler failed; will retry", entry_id=entry_id, key=envelope.key,
                attempt=envelope.attempt, error=repr(error),
            )  # fmt: skip
        else:
            batch.done.append(entry_id)

    async def _settle(self, batch: _Batch) -> None:
        """Dead-letter and acknowledge the whole batch in one script call.

        The batch goes to Redis as one JSON argument: encoding a few hundred separate
        arguments costs redis-py more than the script takes to run.
        """
        keys = self.bus.keys
        dead_ids = [entry_id for entry_id, *_ in batch.dead]
        counts = {"read": 0 if batch.swept else batch.size,
                  "claimed": batch.size if batch.swept else 0,
                  "acked": len(batch.done) + len(batch.duplicates),
                  "duplicates": len(batch.duplicates), "dead": len(dead_ids),
                  "failed": batch.failed}  # fmt: skip
        acked = [*batch.done, *batch.duplicates, *dead_ids]
        release = [[key, entry_id] for entry_id, fields, *_ in batch.dead
                   if (key := peek_key(fields)) is not None]  # fmt: skip
        letters = [_flat({**fields, **self._dlq_meta(entry_id, reason, attempt)})
                   for entry_id, fields, reason, attempt in batch.dead]  # fmt: skip
        settled = {"ack": acked, "release": release, "counts": counts, "dead": letters}
        owners = self.bus.owner_keys(self.stream, self.group)
        script_keys = [self.key, keys.stats(self.stream), *owners, keys.dlq(self.stream)]
        settled_json = json.dumps(settled, ensure_ascii=False)
        script_args: list[str | int] = [self.group, settled_json, self.settings.dlq_maxlen]
        dropped = await self.bus.settle_script(keys=script_keys, args=script_args)
        self._in_flight.difference_update(acked)
        for entry_id, _, reason, attempt in batch.dead:
            self.log.warning("dead-lettered", entry_id=entry_id, reason=reason, attempts=attempt)
        if dropped:
            self.log.warning(
                "dead letters dropped: dlq_maxlen reached", count=len(dropped),
                dlq_maxlen=self.settings.dlq_maxlen, original_ids=dropped[:20],
            )  # fmt: skip

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
            args = [self.key, self.group, self.name, *self._in_flight]
            try:
                lost = await self.bus.renew_script(keys=[], args=args)
            except (RedisTimeoutError, RedisConnectionError) as error:  # renewed next time
                self.log.warning("redis did not answer a lease renewal", error=repr(error))
                continue
            if lost:
                self.log.warning("lost leases to another consumer", count=lost)
