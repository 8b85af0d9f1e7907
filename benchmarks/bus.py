"""Bus throughput: typed publish -> consume -> validate -> ack, against a plain redis-py loop.

Both paths move the same payloads through the same Redis in the same run: a publisher
appends in pipelined chunks while one consumer reads batches and acknowledges them.
The paths take turns over `--rounds` rounds, in alternating order, and the ratio is of
their total times, so that load from other processes weighs on both alike.

Latency is measured apart, at a steady `--rate` well below capacity, through the consumer's
own loop (`Bus.consume`): publish to handler, without the backlog of a burst.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import redis.asyncio as aioredis
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.config import BusSettings, Settings
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.schemas import Envelope, Task
from tests.factories import task

CHUNK = 100


class Clock:
    """Wall time, and CPU time of this process plus the Redis server's, for one path.

    On a shared machine CPU time varies less than wall time: it shows the work done.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def _cpu(self) -> float:
        info = await self.client.info("cpu")
        return time.process_time() + float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), await self._cpu()

    async def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, await self._cpu() - self.cpu


async def sentinel_path(
    url: str, tasks: list[Task], tick: Callable[[int], None], name: str = "bench"
) -> tuple[float, float]:
    """Publish through the bus while one consumer polls; (wall s, CPU s)."""
    bus = await open_bus(url, BusSettings(prefix=name, batch_size=CHUNK, block_ms=200))
    handled = 0
    done = anyio.Event()

    async def handle(envelope: Envelope[Task]) -> None:
        nonlocal handled
        handled += 1
        if handled == len(tasks):
            done.set()

    async def publish() -> None:
        for start in range(0, len(tasks), CHUNK):
            await bus.publish_many("tasks", tasks[start : start + CHUNK])

    clock = Clock(bus.redis)
    await clock.start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        consumer = bus.consumer("tasks", "g", Task, handle, "bench")
        while not done.is_set():
            tick(await consumer.poll())
        tg.cancel_scope.cancel()
    elapsed, cpu = await clock.stop()
    await drop(bus)
    return elapsed, cpu


async def open_bus(url: str, settings: BusSettings) -> Bus:
    """A bus on `url` whose stream `tasks` has the group `g`."""
    bus = Bus(connect(url, Settings(redis_url=url, bus=settings)), settings)
    await bus.ensure_group("tasks", "g")
    return bus


async def drop(bus: Bus) -> None:
    """Delete everything under the bus's prefix, and close it."""
    keys = [key async for key in bus.redis.scan_iter(f"{bus.keys.prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await bus.redis.unlink(*keys[start : start + 1000])
    await bus.aclose()


async def paced_latencies(url: str, tasks: list[Task], rate: int) -> list[float]:
    """Publish `tasks` ten at a time at `rate` messages/s to a running consumer; latencies."""
    bus = await open_bus(url, BusSettings(prefix=f"paced-{os.urandom(3).hex()}"))
    latencies: list[float] = []
    stop = anyio.Event()

    async def handle(envelope: Envelope[Task]) -> None:
        latencies.append(time.time() - envelope.created_at.timestamp())
        if len(latencies) == len(tasks):
            stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: bus.consume("tasks", "g", "paced", Task, handle, stop=stop))
        started = time.perf_counter()
        for index, start in enumerate(range(0, len(tasks), 10)):
            await anyio.sleep(max(0.0, started + index * 10 / rate - time.perf_counter()))
            await bus.publish_many("tasks", tasks[start : start + 10])
    await drop(bus)
    return latencies


async def baseline_path(
    url: str, tasks: list[Task], tick: Callable[[int], None], name: str = "baseline"
) -> tuple[float, float]:
    """JSON-encode, XADD in pipelined chunks, XREADGROUP batches, json.loads, XACK per batch.

    Returns (wall s, CPU s).
    """
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    await client.xgroup_create(name, "g", id="0", mkstream=True)

    async def publish() -> None:
        for start in range(0, len(tasks), CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for t in tasks[start : start + CHUNK]:
                    pipe.xadd(name, {"data": t.model_dump_json()})
                await pipe.execute()

    clock = Clock(client)
    await clock.start()
    seen = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        while seen < len(tasks):
            reply = await client.xreadgroup("g", "c", {name: ">"}, count=CHUNK, block=200)
            for _, entries in reply or []:
                for _, fields in entries:
                    json.loads(fields["data"])
                await client.xack(name, "g", *(entry_id for entry_id, _ in entries))
                seen += len(entries)
                tick(len(entries))
    elapsed, cpu = await clock.stop()
    await client.delete(name)
    await client.aclose()
    return elapsed, cpu


async def measure(url: str, messages: int, rounds: int, rate: int) -> dict[str, float]:
    tasks = [task(i) for i in range(messages)]
    # The prebuilt payloads are a fixture, not bus work: keep the collector from rescanning
    # them (a full collection over ~1M fixture objects costs either path ~0.5 s).
    gc.collect()
    gc.freeze()
    with Progress(transient=True) as progress:

        def bar(label: str) -> Callable[[int], None]:
            job = progress.add_task(label, total=messages)
            return lambda n: progress.advance(job, n)

        run = os.urandom(3).hex()  # fresh names: an existing server may hold older runs
        baseline_s = sentinel_s = baseline_cpu = sentinel_cpu = 0.0
        for turn in range(rounds):
            for path in ("baseline", "sentinel") if turn % 2 == 0 else ("sentinel", "baseline"):
                name = f"bench-{run}-{path}-{turn}"
                if path == "baseline":
                    elapsed, cpu = await baseline_path(url, tasks, bar("plain redis-py"), name)
                    baseline_s, baseline_cpu = baseline_s + elapsed, baseline_cpu + cpu
                else:
                    elapsed, cpu = await sentinel_path(url, tasks, bar("sentinel"), name)
                    sentinel_s, sentinel_cpu = sentinel_s + elapsed, sentinel_cpu + cpu
    paced = tasks[: min(messages, rate * 5)]  # about five seconds
    quantiles = statistics.quantiles(await paced_latencies(url, paced, rate), n=100)
    total = messages * rounds
    return {
        "messages": messages,
        "rounds": rounds,
        "msgs_per_s": round(total / sentinel_s, 1),
        "baseline_msgs_per_s": round(total / baseline_s, 1),
        "overhead_ratio": round(sentinel_s / baseline_s, 3),
        "cpu_overhead_ratio": round(sentinel_cpu / baseline_cpu, 3),  # client + Redis CPU
        "latency_rate_msgs_per_s": rate,
        "p50_ms": round(quantiles[49] * 1000, 2),
        "p99_ms": round(quantiles[98] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2, help="turns per path, order alternating")
    parser.add_argument("--rate", type=int, default=1000, help="msgs/s when measuring latency")
    parser.add_argument("--redis-url", help="an existing server (default: embedded redis-server)")
    args = parser.parse_args()
    run: Callable[[str], Awaitable[dict[str, float]]] = lambda url: measure(  # noqa: E731
        url, args.messages, args.rounds, args.rate
    )
    if args.redis_url:
        figures = anyio.run(run, args.redis_url)
    else:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
            figures = anyio.run(run, server.url)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
