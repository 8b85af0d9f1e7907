"""Proof that the event loop was never held: a task ticks beside the work under test."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

PERIOD_S = 0.05
T = TypeVar("T")


@dataclass
class Ticks:
    count: int = 0
    elapsed_s: float = 0.0

    def kept_up(self, busy_s: float = 0.0) -> bool:
        """At least half the ticks of the time not spent in `busy_s` (e.g. real LLM calls)."""
        return self.count >= 0.5 * (self.elapsed_s - busy_s) / PERIOD_S


async def ticking(work: Callable[[], Awaitable[T]]) -> tuple[T, Ticks]:
    """Run `work` beside a ticker; its result, and the ticks seen while it ran."""
    ticks = Ticks()
    result: list[T] = []

    async def tick() -> None:
        while True:
            await anyio.sleep(PERIOD_S)
            ticks.count += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        started = time.monotonic()
        result.append(await work())
        ticks.elapsed_s = time.monotonic() - started
        tg.cancel_scope.cancel()
    return result[0], ticks
