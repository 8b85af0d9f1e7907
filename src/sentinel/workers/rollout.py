"""The `rollout` queue: rollout requests in, trajectories and rollout groups out on Redis Streams.

A request names the task, the group size and the policy to sample from; the group is rolled
out with G concurrent trajectories (and, when the request asks, LEAFE explores branches of
its failures: `agents.explorer`) and published to `trajectories` (for the Controller) and
`rollout_groups` (for the trainer and the curriculum). The group id is the request id, so a
redelivered request publishes under the same keys and is handled once downstream.

Every request ends in a group. When the policy endpoint is down (every trajectory ended by an
infrastructure error) the task is retried with backoff, counted in Redis; after
`workers.max_attempts`, or on the time limit, a group marked `dropped` with the reason and no
trajectories is published instead, so the orchestrator and the trainer account for it.

A group runs under its lease (`workers.lease`): a copy of a request that is running or over
skips, and a worker that dies leaves a lapsed lease for the orchestrator to find within
`workers.lease_s`. An `eval` request (held-out trials) publishes its group only: its
trajectories never reach the Controller, and it is not explored.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import anyio
import redis
from anyio.from_thread import BlockingPortal
from celery import Task as CeleryTask
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from sentinel.agents.explorer import Explorer
from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.reflector import Reflector
from sentinel.agents.rollout import RolloutRunner
from sentinel.config import Settings
from sentinel.envs.registry import load
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import RolloutGroup, RolloutRequest, TerminationReason
from sentinel.workers.lease import Lease, LeaseLost
from sentinel.workers.service import WorkerProcess, count_attempt

log = get_logger(__name__)

T = TypeVar("T")

RETRY_DELAY_S = 5
MAX_RETRY_DELAY_S = 120
KEPT_RUNNERS = 2  # idle runners kept: the current policy and the one before, while it drains
EXPLORE_MARGIN_S = 15  # LEAFE stops this long before the soft time limit: keep the group


class EndpointDown(Exception):
    """Every rollout of a group ended by an infrastructure error."""


class RolloutService:
    """What one rollout worker process keeps: Redis, the domain, and a runner per policy."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.stack = AsyncExitStack()
        self.runners: dict[tuple[str, int], RolloutRunner] = {}
        self.in_use: Counter[tuple[str, int]] = Counter()  # groups running on each runner

    async def start(self) -> None:
        self.bus = Bus(connect(self.redis_url, self.settings), self.settings.bus)
        self.stack.push_async_callback(self.bus.aclose)
        timeout = self.settings.redis_socket_timeout_s  # the lease's renewals, from the task
        self.renewals = redis.Redis.from_url(
            self.redis_url, decode_responses=True, socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )  # fmt: skip
        self.stack.callback(self.renewals.close)
        self.domain = await anyio.to_thread.run_sync(load, self.settings.env)
        client = None
        if self.settings.leafe.use_llm:
            client = OpenAIChatClient(self.settings.llm.reflector)
            self.stack.push_async_callback(client.aclose)
        self.reflector = Reflector(self.domain, self.settings.leafe, client)

    async def stop(self) -> None:
        for runner in self.runners.values():
            await runner.aclose()
        self.runners.clear()
        await self.stack.aclose()

    async def attempt(self, request_id: str) -> int:
        return await count_attempt(self.bus.redis, self.settings.bus.prefix, "rollout", request_id)

    @asynccontextmanager
    async def runner(self, request: RolloutRequest) -> AsyncIterator[RolloutRunner]:
        """The request's runner: one served name and cache salt for every turn of every
        rollout of the group (and its LEAFE branches), however many newer policies appear
        meanwhile; a runner in use is never closed."""
        key = (request.served_name, request.policy_version)
        if key not in self.runners:
            self.runners[key] = RolloutRunner.from_settings(
                self.settings, self.domain, request.served_name, request.policy_version
            )
        self.in_use[key] += 1
        try:
            await self._trim()
            yield self.runners[key]
        finally:
            self.in_use[key] -= 1

    async def _trim(self) -> None:
        """Close the oldest idle runners past KEPT_RUNNERS."""
        for key in list(self.runners):
            if len(self.runners) <= KEPT_RUNNERS:
                return
            if not self.in_use[key]:
                del self.in_use[key]
                await self.runners.pop(key).aclose()

    async def take(self, request: RolloutRequest) -> Lease | None:
        """The group's lease, or None (logged) when it runs elsewhere or is over."""
        lease = Lease(
            self.bus.redis, self.settings.bus.prefix, request.id, self.settings.workers.lease_s
        )
        if (held := await lease.acquire()) is not None:
            log.info("rollout skipped: running elsewhere or over", group=request.id, lease=held)
            return None
        return lease

    async def roll_out(self, request: RolloutRequest, lease: Lease) -> RolloutGroup:
        group = await self._roll_out(request)
        await lease.finish()
        return group

    async def _roll_out(self, request: RolloutRequest) -> RolloutGroup:
        async with self.runner(request) as runner:
            return await self._roll_out_on(runner, request)

    async def _roll_out_on(self, runner: RolloutRunner, request: RolloutRequest) -> RolloutGroup:
        started = time.monotonic()
        group = await runner.run_group(request.task, request.size, request.id)
        group.purpose = request.purpose
        terminations = {t.termination for t in group.trajectories}
        if terminations == {TerminationReason.INFRA_ERROR}:
            raise EndpointDown(f"every rollout of {request.task.id} hit an endpoint error")
        if request.explore and request.purpose == "train":
            left = self.settings.workers.soft_time_limit_s - EXPLORE_MARGIN_S
            explorer = Explorer(runner, self.reflector, self.settings.leafe)
            group.exploration = await explorer.explore(
                request.task, group, max(0.0, left - (time.monotonic() - started))
            )
        if request.purpose == "train":  # held-out trials never reach the Controller
            # tokens once: in the group (the trainer's), not again in each trajectory
            await self.bus.publish_many(
                Stream.TRAJECTORIES, [t.without_tokens() for t in group.trajectories]
            )
        await self.bus.publish(Stream.ROLLOUT_GROUPS, group)
        log.info(
            "rolled out", group=group.id, task=group.task_id, rewards=group.rewards,
            policy_version=group.policy_version, purpose=group.purpose,
            corrections=len(group.exploration.corrections) if group.exploration else None,
        )  # fmt: skip
        return group

    async def drop(self, request: RolloutRequest, lease: Lease, reason: str) -> None:
        if not await lease.owned():  # it lapsed: the group may run elsewhere now
            log.warning("rollout group not dropped: lease lost", group=request.id, reason=reason)
            return
        group = RolloutGroup(
            id=request.id, task_id=request.task.id, policy_version=request.policy_version,
            trajectories=[], dropped=reason, purpose=request.purpose,
        )  # fmt: skip
        await self.bus.publish(Stream.ROLLOUT_GROUPS, group)
        await lease.finish()
        log.warning("rollout group dropped", group=group.id, task=group.task_id, reason=reason)


PROCESS = WorkerProcess(RolloutService)


def call_leased(
    portal: BlockingPortal,
    lease: Lease,
    client: redis.Redis,
    func: Callable[..., Awaitable[T]],
    *args: Any,
) -> T:
    """`call_cancelling`, renewing the lease from this thread while `func` runs on the loop;
    LeaseLost (and `func` cancelled, so it publishes nothing) once the lease is gone."""
    renew = lease.keeper(client)
    future = portal.start_task_soon(func, *args)
    try:
        while True:
            try:
                return future.result(timeout=lease.renew_every_s)
            except TimeoutError:
                if future.done():  # `func` itself timed out
                    raise
                if not renew():
                    raise LeaseLost(f"the lease of group {lease.group_id} lapsed") from None
    except BaseException:
        future.cancel()  # as call_cancelling: Celery's soft time limit raises here too
        raise


@shared_task(bind=True, name="sentinel.rollout", max_retries=None)
def rollout(self: CeleryTask[Any, Any], raw: str) -> None:
    """Roll out one group (a RolloutRequest's JSON); the group goes to `rollout_groups`."""
    portal, service = PROCESS.get(self)
    try:
        request = RolloutRequest.model_validate_json(raw)
    except ValidationError as error:  # nobody to tell but the log: keep the payload there
        log.error("rollout request invalid; skipped", error=str(error), payload=raw[:2000])
        return
    try:
        lease = portal.call(service.take, request)
        if lease is None:
            return
        attempts = portal.call(service.attempt, request.id)
    except Exception as error:  # Redis: nothing started yet, try again
        log.warning("rollout not started; retrying", group=request.id, error=str(error))
        raise self.retry(exc=error, countdown=RETRY_DELAY_S) from error
    limit = service.settings.workers.max_attempts
    if attempts > limit:  # earlier deliveries died with their worker
        portal.call(service.drop, request, lease, f"worker lost {limit} times")
        return
    try:
        call_leased(portal, lease, service.renewals, service.roll_out, request, lease)
    except SoftTimeLimitExceeded:
        portal.call(service.drop, request, lease, "time limit exceeded")
    except LeaseLost as error:  # another copy may run it now; this one publishes nothing
        log.warning("rollout abandoned", group=request.id, error=str(error))
    except Exception as error:  # the endpoint or Redis: retry with backoff, then give up
        if attempts >= limit:
            portal.call(service.drop, request, lease, f"failed {attempts} times: {error}")
            return
        delay = min(RETRY_DELAY_S * 2 ** (attempts - 1), MAX_RETRY_DELAY_S)
        log.warning(
            "rollout failed; retrying", group=request.id, attempt=attempts, error=str(error)
        )
        portal.call(lease.hand_over, delay)  # the retry takes the lease back
        raise self.retry(exc=error, countdown=delay) from error
