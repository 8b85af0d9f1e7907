"""The orchestrator's loop: the one place that decides what runs next.

It keeps up to `loop.max_inflight` rollout groups on the Celery `rollout` queue, each on a
task the curriculum picks and under the newest policy version; it counts the groups that come
back (curriculum) and the ones the trainer reports (trained or dropped); it follows new
policy versions and evaluates them on the held-out test split every `loop.eval_every`
versions, and before and after a bounded run. It also dispatches proposals to validation and
records every stream to the run directory.

All of its state is in Redis (counters, in-flight requests, the current policy), so a
restarted orchestrator carries on where the last one stopped. A bounded run
(`loop.max_groups`) ends once every group is back and accounted for by the trainer, and the
final policy is evaluated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import anyio
import redis.asyncio as aioredis
from celery import Celery

from sentinel.agents.rollout import RolloutRunner
from sentinel.config import Settings
from sentinel.envs.tau2 import Tau2Domain
from sentinel.evaluation import evaluate
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, Entry
from sentinel.orchestrator.curriculum import Curriculum
from sentinel.orchestrator.dispatch import ValidationDispatcher
from sentinel.orchestrator.recorder import Recorder
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Envelope,
    ErrorPattern,
    FailureCategory,
    PolicyVersion,
    RolloutGroup,
    RolloutRequest,
    TrainStepReport,
)
from sentinel.workers.app import ROLLOUT_QUEUE

log = get_logger(__name__)

GROUP = "orchestrator"
POLL_S = 1.0


class LoopStopped(Exception):
    """The loop cannot go on (the endpoint keeps failing, every task is retired)."""


@dataclass
class Progress:
    dispatched: int
    returned: int
    accounted: int
    inflight: int
    dropped: int


async def loop_progress(redis: aioredis.Redis, prefix: str) -> Progress:
    """The loop's counters, as the orchestrator keeps them in Redis."""
    key = f"{prefix}:loop"
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(f"{key}:dispatched")
        pipe.scard(f"{key}:returned")
        pipe.scard(f"{key}:accounted")
        pipe.hlen(f"{key}:inflight")
        pipe.get(f"{key}:dropped")
        dispatched, returned, accounted, inflight, dropped = await pipe.execute()
    return Progress(int(dispatched or 0), returned, accounted, inflight, int(dropped or 0))


class Loop:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        celery: Celery,
        domain: Tau2Domain,
        curriculum: Curriculum,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = bus.redis
        self.celery = celery
        self.domain = domain
        self.curriculum = curriculum
        self.key = f"{settings.bus.prefix}:loop"
        self.returned_event = anyio.Event()
        self.failure: LoopStopped | None = None
        self.evaluating: set[int] = set()

    # -- state in Redis ------------------------------------------------------------------

    async def policy(self) -> PolicyVersion:
        raw = await self.redis.get(f"{self.key}:policy")
        if raw:
            return PolicyVersion.model_validate_json(raw)
        base = self.settings.llm.policy.model
        return PolicyVersion(version=0, served_name=base, base_model=base)

    async def progress(self) -> Progress:
        return await loop_progress(self.redis, self.settings.bus.prefix)

    # -- handlers ------------------------------------------------------------------------

    async def on_group(self, envelope: Envelope[RolloutGroup]) -> None:
        group = envelope.payload
        await self.curriculum.record(group)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(f"{self.key}:returned", group.id)
            pipe.hdel(f"{self.key}:inflight", group.id)
            if group.dropped:
                pipe.incr(f"{self.key}:dropped_in_row")
                pipe.incr(f"{self.key}:dropped")
            else:
                pipe.set(f"{self.key}:dropped_in_row", 0)
            new, *_ = await pipe.execute()
        self.returned_event.set()
        if new and group.dropped:
            await self._check_drops(group.dropped)

    async def _check_drops(self, reason: str) -> None:
        in_row = int(await self.redis.get(f"{self.key}:dropped_in_row") or 0)
        if in_row >= self.settings.loop.max_dropped_in_row:
            self.failure = LoopStopped(
                f"{in_row} rollout groups in a row were dropped (last: {reason}); is the "
                f"policy endpoint {self.settings.llm.policy.base_url} up?"
            )

    async def on_report(self, envelope: Envelope[TrainStepReport]) -> None:
        report = envelope.payload
        ids = [*report.trained_groups, *report.dropped_groups]
        if ids:
            await self.redis.sadd(f"{self.key}:accounted", *ids)

    async def on_policy(self, envelope: Envelope[PolicyVersion]) -> None:
        version = envelope.payload
        if version.version <= (await self.policy()).version:
            return
        await self.redis.set(f"{self.key}:policy", version.model_dump_json())
        log.info("policy version", version=version.version, served_name=version.served_name)

    # -- the scheduler -------------------------------------------------------------------

    async def dispatch_one(self) -> bool:
        """Send one rollout group to the queue; False when there is nothing left to run."""
        task = await self.curriculum.next_task()
        if task is None:
            self.failure = LoopStopped("every task in the pool is retired (mastered)")
            return False
        policy = await self.policy()
        request = RolloutRequest(
            task=task, size=self.settings.loop.group_size,
            policy_version=policy.version, served_name=policy.served_name,
            explore=self.settings.loop.training != "grpo",
        )  # fmt: skip
        entry = json.dumps({"task": task.id, "at": time.time()})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self.key}:inflight", request.id, entry)
            pipe.incr(f"{self.key}:dispatched")
            await pipe.execute()
        await anyio.to_thread.run_sync(self._send, request)
        log.info("rollout dispatched", group=request.id, task=task.id, policy=policy.version)
        return True

    def _send(self, request: RolloutRequest) -> None:
        self.celery.send_task(
            "sentinel.rollout", args=[request.model_dump_json()], task_id=request.id,
            queue=ROLLOUT_QUEUE,
        )  # fmt: skip

    async def write_off_lost(self) -> None:
        """In-flight groups older than `inflight_timeout_s` count as returned and dropped."""
        cutoff = time.time() - self.settings.loop.inflight_timeout_s
        for group_id, raw in (await self.redis.hgetall(f"{self.key}:inflight")).items():
            entry = json.loads(raw)
            if entry["at"] < cutoff and await self.redis.hdel(f"{self.key}:inflight", group_id):
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.sadd(f"{self.key}:returned", group_id)
                    pipe.sadd(f"{self.key}:accounted", group_id)  # the trainer never sees it
                    pipe.incr(f"{self.key}:dropped")
                    await pipe.execute()
                log.warning(
                    "rollout group written off", group=group_id, task=entry["task"],
                    reason=f"not back after {self.settings.loop.inflight_timeout_s:.0f} s",
                )  # fmt: skip

    async def schedule(self, stop: anyio.Event) -> None:
        budget = self.settings.loop.max_groups
        while not stop.is_set() and self.failure is None:
            await self.write_off_lost()
            progress = await self.progress()
            if budget is not None and progress.dispatched >= budget:
                if await self.finished(progress):
                    stop.set()
                    return
            elif progress.inflight < self.settings.loop.max_inflight:
                if await self.dispatch_one():
                    continue
                return
            with anyio.move_on_after(POLL_S):
                await self.returned_event.wait()
            self.returned_event = anyio.Event()

    async def finished(self, progress: Progress) -> bool:
        """Every group back, accounted for by the trainer, and the final policy evaluated."""
        if progress.inflight or progress.returned < progress.dispatched:
            return False
        returned = await self.redis.smembers(f"{self.key}:returned")
        accounted = await self.redis.smismember(f"{self.key}:accounted", list(returned))
        if not all(accounted):
            return False
        await self.catch_up_policy()
        await self.evaluate(await self.policy())
        return True

    async def catch_up_policy(self) -> None:
        """Take the newest published policy now, not when its consumer gets to it."""
        key = self.bus.keys.stream(Stream.POLICY_VERSIONS)
        for _, fields in cast(list[Entry], await self.redis.xrevrange(key, count=1)):
            if fields:
                await self.on_policy(Envelope.from_wire(fields, PolicyVersion))

    # -- held-out evaluation -------------------------------------------------------------

    async def evaluate(self, policy: PolicyVersion) -> None:
        """pass^k of `policy` on the test split; once per version, resumed after a crash."""
        loop, version = self.settings.loop, policy.version
        done = await self.redis.sismember(f"{self.key}:evaluated", str(version))
        if done or version in self.evaluating:
            return
        self.evaluating.add(version)
        tasks = self.domain.tasks("test")[: loop.eval_tasks]
        runner = RolloutRunner.from_settings(
            self.settings, self.domain, policy.served_name, version
        )
        try:
            out = self.settings.run_dir / "evals" / f"v{version}"
            report = await evaluate(runner, tasks, loop.eval_trials, out)
        finally:
            await runner.aclose()
            self.evaluating.discard(version)
        report.policy_version = version
        await self.bus.publish(Stream.EVALUATIONS, report)
        await self.redis.sadd(f"{self.key}:evaluated", version)
        log.info("evaluated", version=version, pass_hat_k=report.pass_hat_k)

    async def evaluations(self, stop: anyio.Event) -> None:
        """Evaluate the base policy, then every `eval_every`-th version as it appears."""
        every = self.settings.loop.eval_every
        while not stop.is_set():
            policy = await self.policy()
            if policy.version == 0 or (every and policy.version % every == 0):
                await self.evaluate(policy)
            with anyio.move_on_after(POLL_S * 5):
                await stop.wait()

    # -- the baseline of synthetic tasks -------------------------------------------------

    async def publish_general_patterns(self) -> None:
        """`synthetic` mode: one pattern per write tool, not tied to any failure."""
        for tool in sorted(self.domain.write_tools):
            pattern = ErrorPattern(
                id=f"general-{tool}",
                title=f"Use {tool} correctly",
                description=f"A general task whose goal needs {tool}; not tied to a failure.",
                category=FailureCategory.OTHER,
                tools=[tool],
            )
            await self.bus.publish(Stream.PATTERNS, pattern)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Run until `stop` or the end of a bounded run; raises LoopStopped or RunDirError."""
        stop = stop or anyio.Event()
        if self.settings.loop.mode == "synthetic":
            await self.publish_general_patterns()
        recorder = Recorder(self.bus, self.settings.run_dir)
        dispatcher = ValidationDispatcher(self.bus, self.celery)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run, stop)
            tg.start_soon(dispatcher.run, stop)
            for stream, model, handler in (
                (Stream.ROLLOUT_GROUPS, RolloutGroup, self.on_group),
                (Stream.TRAIN_REPORTS, TrainStepReport, self.on_report),
                (Stream.POLICY_VERSIONS, PolicyVersion, self.on_policy),
            ):
                consumer = self.bus.consumer(stream, GROUP, model, handler)  # type: ignore[arg-type]
                tg.start_soon(consumer.run, stop)
            tg.start_soon(self.evaluations, stop)
            await self.schedule(stop)
            stop.set()
        if self.failure is not None:
            raise self.failure
