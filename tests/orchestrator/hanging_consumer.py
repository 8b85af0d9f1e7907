"""A consumer that takes messages and never finishes them, to be killed with SIGKILL.

Run as: python -m tests.orchestrator.hanging_consumer URL PREFIX STREAM GROUP
"""

from __future__ import annotations

import sys

import anyio

from sentinel.config import BusSettings, Settings
from sentinel.orchestrator.bus import Bus, connect
from sentinel.schemas import Envelope, Task


async def main(url: str, prefix: str, stream: str, group: str) -> None:
    settings = Settings(
        redis_url=url, bus=BusSettings(prefix=prefix, block_ms=100, claim_idle_ms=600)
    )
    bus = Bus(connect(url, settings), settings.bus)

    async def hang(envelope: Envelope[Task]) -> None:
        await bus.redis.rpush(f"{prefix}:started", envelope.key)
        await anyio.sleep_forever()

    await bus.consume(stream, group, "doomed", Task, hang)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
