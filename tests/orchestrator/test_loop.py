"""The orchestrator's loop on a real Redis and a real Celery broker (no worker needed: the
requests wait on the queue): dispatch within the in-flight cap, counting groups back once,
the end of a bounded run, and the reasons it stops early."""

from __future__ import annotations

import base64
import json
import random

import anyio
import pytest

from sentinel.config import Settings
from sentinel.envs.tau2 import Tau2Domain
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.curriculum import Curriculum
from sentinel.orchestrator.loop import Loop, LoopStopped
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import Envelope, PolicyVersion, RolloutGroup, RolloutRequest, TrainStepReport
from sentinel.workers.app import ROLLOUT_QUEUE, make_app
from tests.factories import examples, group, task

pytestmark = pytest.mark.anyio


def make_loop(settings: Settings, bus: Bus, retail: Tau2Domain, **loop: object) -> Loop:
    settings = settings.model_copy(
        update={"loop": settings.loop.model_copy(update={"group_size": 2, **loop})}
    )
    pool = TaskPool(bus.redis, bus.settings.prefix, [task(i) for i in range(3)])
    curriculum = Curriculum(bus.redis, bus.settings.prefix, pool, settings.loop, random.Random(0))
    return Loop(settings, bus, make_app(settings, settings.redis_url or ""), retail, curriculum)


async def queued(bus: Bus) -> list[RolloutRequest]:
    """The requests waiting on Celery's `rollout` list (its key carries the bus prefix), oldest
    first (Celery pushes on the left)."""
    raw = await bus.redis.lrange(f"{bus.settings.prefix}:celery:{ROLLOUT_QUEUE}", 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(r)["body"])) for r in reversed(raw)]
    return [RolloutRequest.model_validate_json(args[0]) for args, _, _ in bodies]


def envelope(message: object) -> Envelope:
    return Envelope.wrap(message)  # type: ignore[arg-type]


async def test_dispatch_uses_the_newest_policy_and_counts_each_group_back_once(
    settings: Settings, bus: Bus, retail: Tau2Domain
) -> None:
    loop = make_loop(settings, bus, retail)
    assert await loop.dispatch_one()
    newer = PolicyVersion(version=3, served_name="policy-v3", base_model="smol")
    await loop.on_policy(envelope(newer))
    await loop.on_policy(envelope(newer.model_copy(update={"version": 2})))  # older: ignored
    assert await loop.dispatch_one()
    first, second = await queued(bus)
    assert (first.policy_version, first.served_name) == (0, "smol")
    assert (second.policy_version, second.served_name) == (3, "policy-v3")
    assert first.size == 2
    assert first.task.id.startswith("retail-")
    back = group(first.task.id, [1.0, 0.0]).model_copy(update={"id": first.id})
    await loop.on_group(envelope(back))
    await loop.on_group(envelope(back))  # redelivered
    progress = await loop.progress()
    assert (progress.dispatched, progress.returned, progress.inflight) == (2, 1, 1)


async def test_a_bounded_run_ends_when_every_group_is_back_and_accounted(
    settings: Settings, bus: Bus, retail: Tau2Domain
) -> None:
    loop = make_loop(settings, bus, retail, max_groups=2, max_inflight=2, eval_tasks=1)
    evaluated: list[int] = []

    async def evaluate(policy: PolicyVersion) -> None:  # evaluation has its own tests
        evaluated.append(policy.version)

    loop.evaluate = evaluate  # type: ignore[method-assign]
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop.schedule, stop)
        with anyio.fail_after(10):
            while len(requests := await queued(bus)) < 2:
                await anyio.sleep(0.1)
        for request in requests:
            back = group(request.task.id, [0.0, 0.0]).model_copy(update={"id": request.id})
            await loop.on_group(envelope(back))
        await anyio.sleep(1.5)
        assert not stop.is_set()  # back, but the trainer has not reported on them yet
        report = examples()[-3]
        assert isinstance(report, TrainStepReport)
        ids = [r.id for r in requests]
        final = PolicyVersion(version=2, served_name="policy-v2", base_model="smol")
        await bus.publish(Stream.POLICY_VERSIONS, final)  # not yet seen by its consumer
        await loop.on_report(envelope(report.model_copy(update={"trained_groups": ids})))
        with anyio.fail_after(10):
            await stop.wait()
    assert len(await queued(bus)) == 2  # the budget, never more
    assert evaluated == [2]  # the final policy, read from its stream


async def test_groups_dropped_in_a_row_stop_the_loop_with_the_reason(
    settings: Settings, bus: Bus, retail: Tau2Domain
) -> None:
    loop = make_loop(settings, bus, retail, max_dropped_in_row=2)
    for i in range(2):
        dropped = RolloutGroup(
            id=f"d{i}", task_id="retail-0", policy_version=0, trajectories=[],
            dropped="failed 3 times: connection refused",
        )  # fmt: skip
        await loop.on_group(envelope(dropped))
    with pytest.raises(LoopStopped, match=r"2 rollout groups in a row.*connection refused"):
        await loop.run()


async def test_groups_not_back_in_time_are_written_off(
    settings: Settings, bus: Bus, retail: Tau2Domain
) -> None:
    loop = make_loop(settings, bus, retail, inflight_timeout_s=0.01)
    await loop.dispatch_one()
    await anyio.sleep(0.05)
    await loop.write_off_lost()
    progress = await loop.progress()
    assert (progress.inflight, progress.returned, progress.accounted, progress.dropped) == (
        0, 1, 1, 1,
    )  # fmt: skip
