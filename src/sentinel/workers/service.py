"""What a Celery worker process keeps between tasks: one async service on its own event loop.

Celery tasks are synchronous, and SENTINEL's services are async (Redis, the LLM endpoints,
sandbox children). Each worker process therefore starts, on its first task, one event loop in
a thread (an anyio blocking portal) holding its service for the life of the process; a task
hands its work to that loop and waits. The service is closed when the process shuts down.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any, Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from celery import Task as CeleryTask
from celery.signals import worker_process_shutdown

from sentinel.config import Settings
from sentinel.workers.app import settings_of

ATTEMPTS_TTL_S = 7 * 24 * 3600


class Service(Protocol):
    settings: Settings

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)
T = TypeVar("T")


class WorkerProcess(Generic[S]):
    """The service of this worker process, started on first use (after Celery's fork)."""

    def __init__(self, factory: Callable[[Settings, str], S]) -> None:
        self.factory = factory
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.stack = ExitStack()
        worker_process_shutdown.connect(self._shutdown, weak=False)

    def get(self, task: CeleryTask[Any, Any]) -> tuple[BlockingPortal, S]:
        with self.lock:
            if self.pid != os.getpid():
                settings, url = settings_of(task.app)
                self.stack = ExitStack()
                self.portal = self.stack.enter_context(start_blocking_portal())
                self.service = self.factory(settings, url)
                self.portal.call(self.service.start)
                self.pid = os.getpid()
            return self.portal, self.service

    def _shutdown(self, **_: Any) -> None:
        with self.lock:
            if self.pid == os.getpid():
                self.portal.call(self.service.stop)
                self.stack.close()
                self.pid = None


def call_cancelling(portal: BlockingPortal, func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`portal.call`, except that when the wait is interrupted (Celery's soft time limit raises
    in this thread) the work on the loop is cancelled too: otherwise it would keep running,
    and keep calling the LLM endpoint, for a task that has already ended."""
    future = portal.start_task_soon(func, *args)
    try:
        return future.result()
    except BaseException:
        future.cancel()  # pending until the coroutine ends, so this cancels its scope
        raise


async def count_attempt(redis: aioredis.Redis, prefix: str, queue: str, task_id: str) -> int:
    """This delivery's number, kept in Redis so redeliveries after a crash count too."""
    key = f"{prefix}:attempts:{queue}:{task_id}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, ATTEMPTS_TTL_S)
        attempts, _ = await pipe.execute()
    return int(attempts)
