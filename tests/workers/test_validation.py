"""The `validate` queue end to end: a real Celery worker process on a real Redis, the
dispatcher, the sandbox, and verdicts on the validations stream."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from subprocess import Popen

import anyio
import pytest

from sentinel.config import Settings
from sentinel.envs.base import Environment
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.dispatch import ValidationDispatcher
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.process import start_child, stop_child
from sentinel.schemas import (
    Action,
    Envelope,
    RejectionCode,
    Task,
    TaskProposal,
    ValidationResult,
)
from sentinel.workers.app import make_app
from tests.factories import cancellation

pytestmark = pytest.mark.anyio


def proposal(task: Task) -> TaskProposal:
    return TaskProposal(
        id=f"proposal-{task.id}", task=task, prompt_version="v1", proposer_model="test"
    )


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "validation": settings.validation.model_copy(
                update={"cpu_s": 4, "wall_s": 10, "warm": 1, "memory_mb": 1024}
            )
        }
    )


@pytest.fixture
def worker(worker_settings: Settings, tmp_path: Path) -> Iterator[Popen[bytes]]:
    env = {
        **os.environ,
        "SENTINEL_REDIS_URL": worker_settings.redis_url or "",
        "SENTINEL_RUN_DIR": str(worker_settings.run_dir),
        "SENTINEL_BUS__PREFIX": worker_settings.bus.prefix,
        "SENTINEL_VALIDATION__CPU_S": "4",
        "SENTINEL_VALIDATION__WALL_S": "10",
        "SENTINEL_VALIDATION__WARM": "1",
        "SENTINEL_LOG__FORMAT": "json",
    }
    argv = [sys.executable, "-m", "sentinel", "worker", "validate", "--concurrency", "1"]
    process = start_child(argv, tmp_path / "worker.log", env)
    yield process
    stop_child(process)


async def verdicts(bus: Bus, count: int, timeout_s: float = 120) -> list[ValidationResult]:
    key = bus.keys.stream(Stream.VALIDATIONS)
    with anyio.fail_after(timeout_s):
        while await bus.redis.xlen(key) < count:
            await anyio.sleep(0.5)
    entries = await bus.redis.xrange(key)
    return [Envelope.from_wire(fields, ValidationResult).payload for _, fields in entries]


@pytest.fixture
async def dispatched(bus: Bus, worker_settings: Settings) -> AsyncIterator[anyio.Event]:
    stop = anyio.Event()
    celery = make_app(worker_settings, worker_settings.redis_url or "")
    async with anyio.create_task_group() as tg:
        tg.start_soon(ValidationDispatcher(bus, celery).run, stop)
        yield stop
        stop.set()


async def test_proposals_flow_through_celery_to_verdicts_and_the_pool(
    retail: Environment,
    bus: Bus,
    worker: Popen[bytes],
    dispatched: anyio.Event,
) -> None:
    good = cancellation(retail, "proposed-good")
    unknown = cancellation(retail, "proposed-unknown-tool")
    unknown.spec.evaluation_criteria.actions[2].name = "refund_everything"  # type: ignore[index, union-attr]
    hostile = cancellation(retail, "proposed-hostile")
    hostile.spec.evaluation_criteria.actions.insert(  # type: ignore[union-attr]
        0, Action(action_id="x", name="calculate", arguments={"expression": "9**9**9**9"})
    )
    after = cancellation(retail, "proposed-after")  # the same as good: a duplicate
    for task in (good, unknown, hostile, after):
        await bus.publish(Stream.PROPOSALS, proposal(task))
    results = {v.task_id: v for v in await verdicts(bus, 4)}
    codes = {t: [r.code for r in v.reasons] for t, v in results.items()}
    # good and after are the same task, dispatched concurrently: one gets in, once
    first, second = sorted(("proposed-good", "proposed-after"), key=lambda t: bool(codes[t]))
    assert results[first].accepted, results[first].reasons
    assert results[first].target_db_hash
    assert codes[second] == [RejectionCode.DUPLICATE]
    assert codes["proposed-unknown-tool"] == [RejectionCode.UNKNOWN_TOOL]
    assert codes["proposed-hostile"][0] in {
        RejectionCode.SANDBOX_TIMEOUT, RejectionCode.SANDBOX_CRASH
    }  # fmt: skip
    assert worker.poll() is None, "the worker survived the hostile proposal"
    pool = TaskPool(bus.redis, bus.settings.prefix)
    accepted = await pool.get(first)
    assert accepted is not None
    assert accepted.spec.evaluation_criteria == good.spec.evaluation_criteria
    assert accepted.checks == results[first].checks  # what validation derived, it carries
    assert any(c.path[-1] == "status" and c.value == "cancelled" for c in accepted.checks)
    assert await bus.redis.xlen(bus.keys.stream(Stream.TASKS)) == 1
