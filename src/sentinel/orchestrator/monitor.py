"""Queue figures per stream and consumer group: logged every few seconds, shown by `status`.

Counters come from the bus's own stats hash (published, read, acked, dead...), so they work
on Redis 6.2, which has no `lag` in XINFO GROUPS; rates are deltas between two snapshots.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import cast

import anyio
from pydantic import BaseModel
from rich.table import Table

from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas.message import utc_now

log = get_logger(__name__)

COUNTERS = ("read", "acked", "claimed", "duplicates", "failed", "dead")


class GroupFigures(BaseModel):
    group: str
    consumers: int
    pending: int
    lag: int  # entries published that the group has not yet read
    oldest_pending_age_s: float | None
    totals: dict[str, int]  # COUNTERS, since the stream began
    rates: dict[str, float] | None = None  # per second, between two snapshots


class StreamFigures(BaseModel):
    stream: str
    length: int
    published: int
    dead_letters: int
    dead_letters_dropped: int  # by the `bus.dlq_maxlen` cap, since the stream began
    groups: list[GroupFigures]


QUEUES_FILE = "queues.jsonl"  # in the run directory: `up`'s snapshots, one per line


class QueueSnapshot(BaseModel):
    at: datetime
    monotonic: float = 0.0  # this process's clock: not recorded
    streams: list[StreamFigures]


async def take_snapshot(bus: Bus, streams: list[str] | None = None) -> QueueSnapshot:
    """Figures for `streams`, or for every known and every existing stream."""
    names = streams or sorted({*Stream, *await bus.streams()})
    return QueueSnapshot(
        at=utc_now(),
        monotonic=time.monotonic(),
        streams=[await _stream_figures(bus, name) for name in names],
    )


async def _stream_figures(bus: Bus, name: str) -> StreamFigures:
    key, redis = bus.keys.stream(name), bus.redis
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(key)
        pipe.xlen(bus.keys.dlq(name))
        pipe.hgetall(bus.keys.stats(name))
        pipe.exists(key)
        length, dead, raw_stats, exists = await pipe.execute()
    stats = {k: int(v) for k, v in cast(dict[str, str], raw_stats).items()}
    groups = await redis.xinfo_groups(key) if exists else []
    return StreamFigures(
        stream=name,
        length=length,
        published=stats.get("published", 0),
        dead_letters=dead,
        dead_letters_dropped=stats.get("dlq_dropped", 0),
        groups=[await _group_figures(bus, key, group, stats) for group in groups],
    )


async def _group_figures(
    bus: Bus, key: str, info: dict[str, object], stats: dict[str, int]
) -> GroupFigures:
    name = str(info["name"])
    pending = int(cast(int, info["pending"]))
    oldest = None
    if pending:  # XINFO and XPENDING are two reads: the entries may be acknowledged between
        summary = await bus.redis.xpending(key, name)
        if summary["min"] is not None:
            oldest_ms = int(str(summary["min"]).partition("-")[0])
            oldest = max(0.0, time.time() - oldest_ms / 1000)
    totals = {counter: stats.get(f"{name}:{counter}", 0) for counter in COUNTERS}
    return GroupFigures(
        group=name,
        consumers=int(cast(int, info["consumers"])),
        pending=pending,
        lag=max(0, stats.get("published", 0) - totals["read"]),
        oldest_pending_age_s=oldest,
        totals=totals,
    )


def with_rates(current: QueueSnapshot, previous: QueueSnapshot) -> QueueSnapshot:
    """`current` with per-second rates of every counter since `previous`."""
    elapsed = max(current.monotonic - previous.monotonic, 1e-9)
    before = {(s.stream, g.group): g.totals for s in previous.streams for g in s.groups}
    for stream in current.streams:
        for group in stream.groups:
            old = before.get((stream.stream, group.group), {})
            group.rates = {
                c: (group.totals[c] - old.get(c, 0)) / elapsed for c in ("read", "acked", "dead")
            }
    return current


def log_snapshot(snapshot: QueueSnapshot) -> None:
    """One `queue` line per stream and group: jq '.stream, .lag' reads them."""
    for stream in snapshot.streams:
        base = {
            "stream": stream.stream,
            "length": stream.length,
            "published": stream.published,
            "dead_letters": stream.dead_letters,
            "dead_letters_dropped": stream.dead_letters_dropped,
        }
        if not stream.groups:
            log.info("queue", group=None, **base)
        for group in stream.groups:
            log.info("queue", **base, **group.model_dump(exclude={"totals"}), **group.totals)


async def run_monitor(
    bus: Bus, interval_s: float, *, trim: bool = True, record: Path | None = None
) -> None:
    """Log queue figures every `interval_s` seconds, trimming fully acknowledged entries;
    with `record`, also append each snapshot to that JSONL file (the HTML report's lags).

    Declared groups are created first, so that their lag shows before their consumers start.
    """
    await bus.declare_all()
    previous = await take_snapshot(bus)
    while True:
        await anyio.sleep(interval_s)
        if trim:
            for stream in previous.streams:
                await bus.trim(stream.stream)
        current = with_rates(await take_snapshot(bus), previous)
        log_snapshot(current)
        if record is not None:
            with record.open("a") as file:
                file.write(current.model_dump_json(exclude={"monotonic"}) + "\n")
        previous = current


def render_table(snapshot: QueueSnapshot) -> Table:
    table = Table(title=f"SENTINEL queues at {snapshot.at:%Y-%m-%d %H:%M:%S} UTC")
    for column in ("stream", "length", "published", "dlq", "group", "consumers", "pending",
                   "lag", "oldest pending", "read/s", "acked/s", "acked", "dead"):  # fmt: skip
        table.add_column(column, justify="left" if column in {"stream", "group"} else "right")
    for stream in snapshot.streams:
        dlq = str(stream.dead_letters)
        if stream.dead_letters_dropped:
            dlq += f" (+{stream.dead_letters_dropped} dropped)"
        head = [stream.stream, str(stream.length), str(stream.published), dlq]
        if not stream.groups:
            table.add_row(*head, "-", *[""] * 8)
        for group in stream.groups:
            rates = group.rates or {}
            age = group.oldest_pending_age_s
            table.add_row(
                *head,
                group.group,
                str(group.consumers),
                str(group.pending),
                str(group.lag),
                "-" if age is None else f"{age:.1f}s",
                f"{rates['read']:.1f}" if rates else "-",
                f"{rates['acked']:.1f}" if rates else "-",
                str(group.totals["acked"]),
                str(group.totals["dead"]),
            )
    return table
