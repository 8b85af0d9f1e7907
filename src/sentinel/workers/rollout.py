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
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
from celery import Task as CeleryTask
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from sentinel.agents.explorer import Explorer
from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.reflector import Reflector
from sentinel.agents.rollout import RolloutRunner
from sentinel.config import Settings
from sentinel.envs.tau2 import Tau2Domain
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import RolloutGroup, RolloutRequest, TerminationReason
from sentinel.workers.service import WorkerProcess, call_cancelling, count_attempt

log = get_logger(__name__)

RETRY_DELAY_S = 5
MAX_RETRY_DELAY_S = 120
KEPT_RUNNERS = 2  # the current policy and the one before, while its requests drain
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

    async def start(self) -> None:
        self.bus = Bus(connect(self.redis_url, self.settings), self.settings.bus)
        self.stack.push_async_callback(self.bus.aclose)
        self.domain = await anyio.to_thread.run_sync(Tau2Domain, self.settings.domain)
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

    async def runner(self, request: RolloutRequest) -> RolloutRunner:
        key = (request.served_name, request.policy_version)
        if key not in self.runners:
            self.runners[key] = RolloutRunner.from_settings(
                self.settings, self.domain, request.served_name, request.policy_version
            )
            while len(self.runners) > KEPT_RUNNERS:
                await self.runners.pop(next(iter(self.runners))).aclose()
        return self.runners[key]

    async def roll_out(self, request: RolloutRequest) -> RolloutGroup:
        started = time.monotonic()
        runner = await self.runner(request)
        group = await runner.run_group(request.task, request.size, request.id)
        terminations = {t.termination for t in group.trajectories}
        if terminations == {TerminationReason.INFRA_ERROR}:
            raise EndpointDown(f"every rollout of {request.task.id} hit an endpoint error")
        if request.explore:
            left = self.settings.workers.soft_time_limit_s - EXPLORE_MARGIN_S
            explorer = Explorer(runner, self.reflector, self.settings.leafe)
            group.exploration = await explorer.explore(
                request.task, group, max(0.0, left - (time.monotonic() - started))
            )
        await self.bus.publish_many(Stream.TRAJECTORIES, group.trajectories)
        await self.bus.publish(Stream.ROLLOUT_GROUPS, group)
        log.info(
            "rolled out", group=group.id, task=group.task_id, rewards=group.rewards,
            policy_version=group.policy_version,
            corrections=len(group.exploration.corrections) if group.exploration else None,
        )  # fmt: skip
        return group

    async def drop(self, request: RolloutRequest, reason: str) -> None:
        group = RolloutGroup(
            id=request.id, task_id=request.task.id, policy_version=request.policy_version,
            trajectories=[], dropped=reason,
        )  # fmt: skip
        await self.bus.publish(Stream.ROLLOUT_GROUPS, group)
        log.warning("rollout group dropped", group=group.id, task=group.task_id, reason=reason)


PROCESS = WorkerProcess(RolloutService)


@shared_task(bind=True, name="sentinel.rollout", max_retries=None)
def rollout(self: CeleryTask[Any, Any], raw: str) -> None:
    """Roll out one group (a RolloutRequest's JSON); the group goes to `rollout_groups`."""
    portal, service = PROCESS.get(self)
    try:
        request = RolloutRequest.model_validate_json(raw)
    except ValidationError as error:  # nobody to tell but the log: keep the payload there
        log.error("rollout request invalid; skipped", error=str(error), payload=raw[:2000])
        return
    attempts = portal.call(service.attempt, request.id)
    limit = service.settings.workers.max_attempts
    if attempts > limit:  # earlier deliveries died with their worker
        portal.call(service.drop, request, f"worker lost {limit} times")
        return
    try:
        call_cancelling(portal, service.roll_out, request)
    except SoftTimeLimitExceeded:
        portal.call(service.drop, request, "time limit exceeded")
    except Exception as error:  # the endpoint or Redis: retry with backoff, then give up
        if attempts >= limit:
            portal.call(service.drop, request, f"failed {attempts} times: {error}")
            return
        delay = min(RETRY_DELAY_S * 2 ** (attempts - 1), MAX_RETRY_DELAY_S)
        log.warning(
            "rollout failed; retrying", group=request.id, attempt=attempts, error=str(error)
        )
        raise self.retry(exc=error, countdown=delay) from error
