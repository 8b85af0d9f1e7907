"""The `validate` queue: proposals in, verdicts and accepted tasks out on Redis Streams.

Each worker process keeps one ValidationService (Redis client, warm sandbox children, the
validator) on its own event loop (sentinel.workers.service). Every path ends in a
verdict on the `validations` stream: an unparseable proposal, an infrastructure failure that
outlived its retries, a task over its time limit. Accepted tasks join the pool and the
`tasks` stream; both are keyed, so a redelivered task is harmless.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

from celery import Task as CeleryTask
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import RejectionCode, RejectionReason, TaskProposal, ValidationResult
from sentinel.validator import open_validator, reject_unparseable
from sentinel.workers.service import WorkerProcess, call_cancelling, count_attempt

log = get_logger(__name__)

RETRY_DELAY_S = 5


class ValidationService:
    """What one worker process keeps between tasks; runs on its own event loop."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.stack = AsyncExitStack()

    async def start(self) -> None:
        settings = self.settings
        self.bus = Bus(connect(self.redis_url, settings), settings.bus)
        self.stack.push_async_callback(self.bus.aclose)
        self.validator = await open_validator(settings, self.bus.redis, self.stack)
        self.pool = TaskPool(self.bus.redis, settings.bus.prefix)

    async def stop(self) -> None:
        await self.stack.aclose()

    async def attempt(self, proposal_id: str) -> int:
        return await count_attempt(
            self.bus.redis, self.settings.bus.prefix, "validate", proposal_id
        )

    async def validate(self, parsed: TaskProposal | ValidationResult) -> ValidationResult:
        """Judge a proposal (or publish the verdict on one that did not parse)."""
        if isinstance(parsed, ValidationResult):
            await self.publish(parsed)
            return parsed
        result = await self.validator.validate(parsed)
        if result.accepted:  # with the checks validation derived and proved
            task = parsed.task.model_copy(update={"checks": result.checks})
            await self.pool.add(task)
            await self.bus.publish(Stream.TASKS, task)
        await self.publish(result)
        return result

    async def publish(self, result: ValidationResult) -> None:
        await self.bus.publish(Stream.VALIDATIONS, result)
        log.info(
            "validated",
            proposal=result.proposal_id,
            accepted=result.accepted,
            reasons=[r.code.value for r in result.reasons],
            duration_s=round(result.duration_s, 3),
        )


PROCESS = WorkerProcess(ValidationService)


def _give_up(proposal_id: str, task_id: str, code: RejectionCode, detail: str) -> ValidationResult:
    return ValidationResult(
        proposal_id=proposal_id, task_id=task_id, accepted=False,
        reasons=[RejectionReason(code=code, detail=detail)],
    )  # fmt: skip


def _parse(raw: str) -> TaskProposal | ValidationResult:
    """The proposal, or the verdict on a payload that is not one (its ids salvaged)."""
    try:
        return TaskProposal.model_validate_json(raw)
    except ValidationError as error:
        return reject_unparseable(raw, error)


@shared_task(bind=True, name="sentinel.validate", max_retries=None)
def validate(self: CeleryTask[Any, Any], raw: str) -> None:
    """Validate one proposal (its JSON); the verdict goes to the `validations` stream."""
    portal, service = PROCESS.get(self)
    parsed = _parse(raw)
    if isinstance(parsed, TaskProposal):
        proposal_id, task_id = parsed.id, parsed.task.id
    else:
        proposal_id, task_id = parsed.proposal_id, parsed.task_id
    attempts = portal.call(service.attempt, proposal_id)
    limit = service.settings.workers.max_attempts
    if attempts > limit:
        detail = f"validation failed {limit} times (infrastructure); giving up"
        verdict = _give_up(proposal_id, task_id, RejectionCode.SANDBOX_CRASH, detail)
        portal.call(service.publish, verdict)
        return
    start = time.perf_counter()
    try:
        call_cancelling(portal, service.validate, parsed)
    except SoftTimeLimitExceeded:
        detail = f"validation exceeded {time.perf_counter() - start:.0f} s"
        verdict = _give_up(proposal_id, task_id, RejectionCode.SANDBOX_TIMEOUT, detail)
        portal.call(service.publish, verdict)
    except Exception as error:  # infrastructure (Redis, sandbox start): retry, counted
        log.warning(
            "validation failed; retrying", proposal=proposal_id, attempt=attempts, error=str(error)
        )
        raise self.retry(exc=error, countdown=RETRY_DELAY_S) from error
