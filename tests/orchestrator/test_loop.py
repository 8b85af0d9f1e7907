"""The orchestrator's loop on a real Redis and a real Celery broker (no worker needed: the
requests wait on the queue): dispatch within the in-flight cap, counting groups back once,
the end of a bounded run, and the reasons it stops early; crashes between its steps, groups
whose workers died, and held-out evaluation as requests for the workers."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from typing import TypeVar

import anyio
import pytest

from sentinel.config import Settings
from sentinel.envs.base import Environment
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.curriculum import Curriculum
from sentinel.orchestrator.loop import GROUP, Loop, LoopStopped
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Envelope,
    EvalReport,
    Message,
    PolicyVersion,
    RolloutGroup,
    RolloutRequest,
    TrainStepReport,
)
from sentinel.workers.app import ROLLOUT_QUEUE, make_app
from sentinel.workers.lease import WRITTEN_OFF, Lease
from sentinel.workers.service import count_attempt
from tests.factories import examples, group, task

pytestmark = pytest.mark.anyio


def make_loop(
    settings: Settings,
    bus: Bus,
    mock: Environment,
    workers: dict[str, object] | None = None,
    **loop: object,
) -> Loop:
    settings = settings.model_copy(
        update={
            "loop": settings.loop.model_copy(update={"group_size": 2, **loop}),
            "workers": settings.workers.model_copy(update=workers or {}),
        }
    )  # fmt: skip
    pool = TaskPool(bus.redis, bus.settings.prefix, [task(i) for i in range(3)])
    curriculum = Curriculum(bus.redis, bus.settings.prefix, pool, settings.loop, random.Random(0))
    celery = make_app(settings, settings.redis_url or "")
    return Loop(settings, bus, celery, curriculum, mock.tasks("test"))


async def queued(bus: Bus) -> list[RolloutRequest]:
    """The requests waiting on Celery's `rollout` list (its key carries the bus prefix), oldest
    first (Celery pushes on the left)."""
    raw = await bus.redis.lrange(f"{bus.settings.prefix}:celery:{ROLLOUT_QUEUE}", 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(r)["body"])) for r in reversed(raw)]
    return [RolloutRequest.model_validate_json(args[0]) for args, _, _ in bodies]


M = TypeVar("M", bound=Message)


async def on_stream(bus: Bus, stream: Stream, model: type[M]) -> list[M]:
    entries = await bus.redis.xrange(bus.keys.stream(stream))
    return [Envelope.from_wire(fields, model).payload for _, fields in entries]


def envelope(message: object) -> Envelope:
    return Envelope.wrap(message)  # type: ignore[arg-type]


async def test_dispatch_uses_the_newest_policy_and_counts_each_group_back_once(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock)
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


async def test_a_bounded_run_ends_when_every_group_is_back_accounted_and_evaluated(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, max_groups=2, max_inflight=2, eval_tasks=1, eval_trials=2)
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
        with anyio.fail_after(10):  # the final policy, read from its stream, goes to the workers
            while len(queue := await queued(bus)) < 3:
                await anyio.sleep(0.1)
        evaluation = queue[-1]
        await anyio.sleep(1.5)
        assert not stop.is_set()  # its evaluation is not back yet
        trials = group(evaluation.task.id, [1.0, 0.0], version=2)
        await loop.on_group(
            envelope(trials.model_copy(update={"id": evaluation.id, "purpose": "eval"}))
        )
        with anyio.fail_after(10):
            await stop.wait()
    assert len(await queued(bus)) == 3  # the budget, never more, and one held-out task
    assert (evaluation.purpose, evaluation.policy_version, evaluation.served_name) == (
        "eval", 2, "policy-v2",
    )  # fmt: skip
    [published] = await on_stream(bus, Stream.EVALUATIONS, EvalReport)
    assert (published.policy_version, published.pass_hat_k) == (2, {1: 0.5, 2: 0.0})


async def test_groups_dropped_in_a_row_stop_the_loop_with_the_reason(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, max_dropped_in_row=2)
    for i in range(2):
        dropped = RolloutGroup(
            id=f"d{i}", task_id="retail-0", policy_version=0, trajectories=[],
            dropped="failed 3 times: connection refused",
        )  # fmt: skip
        await loop.on_group(envelope(dropped))
    with pytest.raises(LoopStopped, match=r"2 rollout groups in a row.*connection refused"):
        await loop.run()


async def test_a_crash_between_counting_and_sending_a_request_loses_nothing(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock)

    def crash(request: RolloutRequest) -> None:
        raise ConnectionError("the orchestrator dies before the broker has the request")

    loop.flights._send = crash  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await loop.dispatch_one()
    assert await queued(bus) == []
    restarted = make_loop(settings, bus, mock)
    assert await restarted.flights.send_unsent() == 1
    assert await restarted.flights.send_unsent() == 0  # sent once
    [request] = await queued(bus)
    progress = await restarted.progress()
    assert (progress.dispatched, progress.inflight) == (1, 1)
    back = group(request.task.id, [1.0, 0.0]).model_copy(update={"id": request.id})
    await restarted.on_group(envelope(back))
    progress = await restarted.progress()
    assert (progress.dispatched, progress.returned, progress.inflight) == (1, 1, 0)


async def test_a_written_off_group_is_counted_once_whichever_copy_comes_first(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, inflight_timeout_s=0.01)
    await loop.dispatch_one()
    [request] = await queued(bus)
    await anyio.sleep(0.05)
    await loop.reap()  # no worker started it in time
    await loop.reap()
    real = group(request.task.id, [1.0, 0.0]).model_copy(update={"id": request.id})
    await bus.publish(Stream.ROLLOUT_GROUPS, real)  # the real group, late
    handled: list[RolloutGroup] = []

    async def on_group(received: Envelope[RolloutGroup]) -> None:
        handled.append(received.payload)
        await loop.on_group(received)

    written_off, late = await on_stream(bus, Stream.ROLLOUT_GROUPS, RolloutGroup)
    assert (written_off.id, late.id) == (request.id, request.id)
    assert written_off.dropped == "no rollout worker started it within 0 s"
    stop = anyio.Event()
    consumer = bus.consumer(Stream.ROLLOUT_GROUPS, GROUP, RolloutGroup, on_group)
    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer.run, stop)
        with anyio.fail_after(10):
            while (
                await bus.redis.xpending(bus.keys.stream(Stream.ROLLOUT_GROUPS), GROUP)
                != {"pending": 0, "min": None, "max": None, "consumers": []}
                or not handled
            ):
                await anyio.sleep(0.1)
        await anyio.sleep(0.5)
        stop.set()
    assert [g.dropped for g in handled] == [written_off.dropped]  # the late copy: a duplicate
    await loop.on_group(envelope(written_off))  # redelivered after a crash before its ack
    progress = await loop.progress()
    assert (progress.returned, progress.inflight, progress.dropped) == (1, 0, 1)
    assert (await loop.curriculum.solve_rates([request.task.id]))[request.task.id].samples == 0
    assert await Lease(bus.redis, bus.settings.prefix, request.id, 1).acquire() == WRITTEN_OFF


async def test_a_group_whose_worker_died_is_sent_again_then_written_off(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, workers={"max_attempts": 2})
    prefix = bus.settings.prefix
    await loop.dispatch_one()
    [request] = await queued(bus)

    async def start_and_die() -> None:  # what workers.rollout does, then SIGKILL
        assert await Lease(bus.redis, prefix, request.id, 0.2).acquire() is None
        await count_attempt(bus.redis, prefix, "rollout", request.id)

    await start_and_die()
    await loop.reap()
    assert len(await queued(bus)) == 1  # its lease is held: it runs
    await anyio.sleep(0.3)  # the lease lapses
    await loop.reap()
    await loop.reap()
    assert [r.id for r in await queued(bus)] == [request.id, request.id]  # sent again, once
    await start_and_die()  # the second attempt, the last, dies too
    await loop.reap()
    assert len(await queued(bus)) == 2
    await anyio.sleep(0.3)
    await loop.reap()
    [dropped] = await on_stream(bus, Stream.ROLLOUT_GROUPS, RolloutGroup)
    assert dropped.id == request.id
    assert dropped.dropped == "worker lost: its lease lapsed on attempt 2 of 2"
    assert len(await queued(bus)) == 2  # not sent a third time
    assert await Lease(bus.redis, prefix, request.id, 1).acquire() == WRITTEN_OFF  # fenced


async def test_evaluation_is_requests_for_the_workers_and_a_report_once_all_are_back(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, eval_tasks=2, eval_trials=2)
    policy = PolicyVersion(version=3, served_name="policy-v3", base_model="smol")
    await loop.evaluate(policy)
    await loop.evaluate(policy)  # once per version
    first, second = await queued(bus)
    assert [first.task.id, second.task.id] == [t.id for t in mock.tasks("test")[:2]]
    assert {(r.purpose, r.size, r.policy_version, r.served_name) for r in (first, second)} == {
        ("eval", 2, 3, "policy-v3")
    }
    trials = group(first.task.id, [1.0, 0.0], version=3)
    await loop.on_group(envelope(trials.model_copy(update={"id": first.id, "purpose": "eval"})))
    assert await on_stream(bus, Stream.EVALUATIONS, EvalReport) == []  # one still out
    restarted = make_loop(settings, bus, mock, eval_tasks=2, eval_trials=2)
    lost = RolloutGroup(
        id=second.id, task_id=second.task.id, policy_version=3, trajectories=[],
        dropped="worker lost", purpose="eval",
    )  # fmt: skip
    await restarted.on_group(envelope(lost))
    [report] = await on_stream(bus, Stream.EVALUATIONS, EvalReport)
    assert (report.policy, report.policy_version, report.tasks) == ("policy-v3", 3, 1)
    assert (report.pass_hat_k, report.infra_errors) == ({1: 0.5, 2: 0.0}, 2)
    assert await restarted.evaluated(3)
    progress = await restarted.progress()
    assert (progress.dispatched, progress.returned, progress.dropped) == (0, 0, 0)  # not training


async def test_eval_tasks_0_evaluates_nothing_and_counts_each_version_done(
    settings: Settings, bus: Bus, mock: Environment
) -> None:
    loop = make_loop(settings, bus, mock, eval_tasks=0)
    await loop.evaluate(PolicyVersion(version=0, served_name="smol", base_model="smol"))
    assert await queued(bus) == []
    assert await loop.evaluated(0)  # a bounded run's end does not wait for it


def test_the_orchestrator_runs_no_environment_and_no_llm() -> None:
    """The loop module pulls in neither an environment nor the agents: it only schedules.
    (The registry comes with the configuration: it names environments, it builds none.)"""
    light = ("sentinel.envs", "sentinel.envs.registry")
    code = (
        "import sys, sentinel.orchestrator.loop; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tau2', 'litellm', "
        f"'openai') or m.startswith(('sentinel.agents', 'sentinel.envs')) and m not in {light}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
