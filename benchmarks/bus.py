"""Bus throughput: typed publish -> consume -> validate -> ack, against a plain redis-py loop.

Both paths move the same payloads through the same Redis in the same run: a publisher
appends in pipelined chunks while one consumer reads batches and acknowledges them.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
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


async def sentinel_path(
    url: str, tasks: list[Task], tick: Callable[[int], None]
) -> tuple[float, list[float]]:
    settings = Settings(
        redis_url=url, bus=BusSettings(prefix="bench", batch_size=CHUNK, block_ms=200)
    )
    bus = Bus(connect(url, settings), settings.bus)
    await bus.ensure_group("tasks", "g")
    latencies: list[float] = []
    done = anyio.Event()

    async def handle(envelope: Envelope[Task]) -> None:
        latencies.append(time.time() - envelope.created_at.timestamp())
        if len(latencies) == len(tasks):
            done.set()

    async def publish() -> None:
        for start in range(0, len(tasks), CHUNK):
            await bus.publish_many("tasks", tasks[start : start + CHUNK])

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        consumer = bus.consumer("tasks", "g", Task, handle, "bench")
        while not done.is_set():
            tick(await consumer.poll())
        tg.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    await bus.aclose()
    return elapsed, latencies


async def baseline_path(url: str, tasks: list[Task], tick: Callable[[int], None]) -> float:
    """JSON-encode, XADD in pipelined chunks, XREADGROUP batches, json.loads, XACK per batch."""
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    await client.xgroup_create("baseline", "g", id="0", mkstream=True)

    async def publish() -> None:
        for start in range(0, len(tasks), CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for t in tasks[start : start + CHUNK]:
                    pipe.xadd("baseline", {"data": t.model_dump_json()})
                await pipe.execute()

    started = time.perf_counter()
    seen = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        while seen < len(tasks):
            reply = await client.xreadgroup("g", "c", {"baseline": ">"}, count=CHUNK, block=200)
            for _, entries in reply or []:
                for _, fields in entries:
                    json.loads(fields["data"])
                await client.xack("baseline", "g", *(entry_id for entry_id, _ in entries))
                seen += len(entries)
                tick(len(entries))
    elapsed = time.perf_counter() - started
    await client.aclose()
    return elapsed


async def measure(url: str, messages: int) -> dict[str, float]:
    tasks = [task(i) for i in range(messages)]
    with Progress(transient=True) as progress:

        def bar(label: str) -> Callable[[int], None]:
            job = progress.add_task(label, total=messages)
            return lambda n: progress.advance(job, n)

        baseline_s = await baseline_path(url, tasks, bar("plain redis-py"))
        sentinel_s, latencies = await sentinel_path(url, tasks, bar("sentinel bus"))
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "messages": messages,
        "msgs_per_s": round(messages / sentinel_s, 1),
        "baseline_msgs_per_s": round(messages / baseline_s, 1),
        "overhead_ratio": round(sentinel_s / baseline_s, 3),
        "p50_ms": round(quantiles[49] * 1000, 2),
        "p99_ms": round(quantiles[98] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--redis-url", help="an existing server (default: embedded redis-server)")
    args = parser.parse_args()
    run: Callable[[str], Awaitable[dict[str, float]]] = lambda url: measure(url, args.messages)  # noqa: E731
    if args.redis_url:
        figures = anyio.run(run, args.redis_url)
    else:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
            figures = anyio.run(run, server.url)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
