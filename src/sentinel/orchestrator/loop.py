"""The orchestrator's loop: the one place that decides what runs next. It only schedules.

It keeps up to `loop.max_inflight` rollout groups on the Celery `rollout` queue, each on a
task the curriculum picks and under the newest policy version; it counts the groups that come
back (curriculum) and the ones the trainer reports (trained or dropped); it follows new
policy versions and has them evaluated on the held-out test split every `loop.eval_every`
versions, and before and after a bounded run. It also dispatches proposals to validation and
records every stream to the run directory.

Held-out evaluation is rollout work too: one `eval` request per test task, `eval_trials`
trials each, on the same queue and workers (a slow tool call or LLM there stalls a worker,
not the loop). Their groups come back on `rollout_groups`, which the trainer and curriculum
skip for them; once all of a version's are back, the loop publishes its `EvalReport`. The
test tasks are read from the domain's task files at start, as the train split that seeds the
pool is: the orchestrator runs no environment and calls no LLM.

All of its state is in Redis (counters, in-flight requests, evaluations, the current
policy), so a restarted orchestrator carries on where the last one stopped: a request is
recorded before it is sent and sent again if a crash came between (`inflight`), and each
group is counted once, by the one script that marks it returned. A group whose worker died is
sent again or written off (`inflight`); the write-off is a dropped group on the stream, so it
is counted, trained-or-dropped and recorded like any other. A bounded run
(`loop.max_groups`) ends once every group is back and accounted for by the trainer, and the
final policy is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import anyio
import redis.asyncio as aioredis
from celery import Celery
from pydantic import BaseModel

from sentinel.config import Settings
from sentinel.evaluation import TrialResult, group_results, report
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, Entry
from sentinel.orchestrator.curriculum import Curriculum
from sentinel.orchestrator.dispatch import ValidationDispatcher
from sentinel.orchestrator.inflight import Flights
from sentinel.orchestrator.patterns import general_patterns
from sentinel.orchestrator.policy import current_policy, policy_key
from sentinel.orchestrator.recorder import Recorder
from sentinel.orchestrator.streams import Stream
from sentinel.report import Artifacts
from sentinel.schemas import (
    Envelope,
    PolicyVersion,
    RolloutGroup,
    RolloutRequest,
    Task,
    TrainStepReport,
)
from sentinel.tracking import RunTracker, open_tracker

log = get_logger(__name__)

GROUP = "orchestrator"
POLL_S = 1.0

# KEYS: returned set, in-flight hash, its unsent set, dropped counter, dropped-in-row counter.
# ARGV: group id, 1 if dropped. Count a group back once, however often it is delivered and
# whichever of its copies (the real group, a write-off) comes first. Returns 1 if it was new.
_RETURNED = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then
  redis.call('INCR', KEYS[4])
  redis.call('INCR', KEYS[5])
else
  redis.call('SET', KEYS[5], 0)
end
return 1
"""


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


class EvalGroup(BaseModel):
    """What the loop keeps of one held-out group: its trials, and how many never ran."""

    results: list[TrialResult]
    lost: int = 0


class Loop:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        celery: Celery,
        curriculum: Curriculum,
        test_tasks: Sequence[Task] = (),
        write_tools: Iterable[str] = (),
    ) -> None:
        """`test_tasks`: the held-out split; `write_tools`: the domain's, for `synthetic`."""
        self.settings = settings
        self.bus = bus
        self.redis = bus.redis
        self.celery = celery
        self.curriculum = curriculum
        self.test_tasks = list(test_tasks)[: settings.loop.eval_tasks]
        if leaked := [t.id for t in self.test_tasks if t.provenance.split != "test"]:
            raise ValueError(f"held-out tasks must be test-split tasks: {', '.join(leaked[:5])}")
        self.write_tools = sorted(write_tools)
        self.key = f"{settings.bus.prefix}:loop"
        self.flights = Flights(bus, celery, settings, "inflight")
        self.eval_flights = Flights(bus, celery, settings, "eval:inflight")
        self.returned_event = anyio.Event()
        self.failure: LoopStopped | None = None
        self._returned = self.redis.register_script(_RETURNED)

    # -- state in Redis ------------------------------------------------------------------

    async def policy(self) -> PolicyVersion:
        prefix, base = self.settings.bus.prefix, self.settings.llm.policy.model
        return await current_policy(self.redis, prefix, base)

    async def progress(self) -> Progress:
        return await loop_progress(self.redis, self.settings.bus.prefix)

    # -- handlers ------------------------------------------------------------------------

    async def on_group(self, envelope: Envelope[RolloutGroup]) -> None:
        group = envelope.payload
        if group.purpose == "eval":
            await self.on_eval_group(group)
            return
        await self.curriculum.record(group)
        keys = [
            f"{self.key}:returned", self.flights.hash, self.flights.unsent,
            f"{self.key}:dropped", f"{self.key}:dropped_in_row",
        ]  # fmt: skip
        new = await self._returned(keys=keys, args=[group.id, int(group.dropped is not None)])
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
        await self.redis.set(policy_key(self.settings.bus.prefix), version.model_dump_json())
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
        async with self.redis.pipeline(transaction=True) as pipe:  # counted with its record
            self.flights.record(pipe, request)
            pipe.incr(f"{self.key}:dispatched")
            await pipe.execute()
        await self.flights.send(request)
        log.info("rollout dispatched", group=request.id, task=task.id, policy=policy.version)
        return True

    async def reap(self) -> None:
        """Send again, or write off, the groups whose workers died (`inflight`)."""
        await self.flights.reap()
        await self.eval_flights.reap()

    async def schedule(self, stop: anyio.Event) -> None:
        budget = self.settings.loop.max_groups
        while not stop.is_set() and self.failure is None:
            await self.reap()
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
        """Every group back, accounted for by the trainer, and every evaluation done, the
        final policy's included."""
        if progress.inflight or progress.returned < progress.dispatched:
            return False
        returned = await self.redis.smembers(f"{self.key}:returned")
        accounted = await self.redis.smismember(f"{self.key}:accounted", list(returned))
        if not all(accounted):
            return False
        await self.catch_up_policy()
        final = await self.policy()
        await self.evaluate(final)
        return await self.evaluated(final.version) and not await self.eval_flights.size()

    async def catch_up_policy(self) -> None:
        """Take the newest published policy now, not when its consumer gets to it."""
        key = self.bus.keys.stream(Stream.POLICY_VERSIONS)
        for _, fields in cast(list[Entry], await self.redis.xrevrange(key, count=1)):
            if fields:
                await self.on_policy(Envelope.from_wire(fields, PolicyVersion))

    # -- held-out evaluation -------------------------------------------------------------

    def _eval_key(self, version: int, what: str) -> str:
        return f"{self.key}:eval:v{version}:{what}"

    async def evaluated(self, version: int) -> bool:
        return bool(await self.redis.sismember(f"{self.key}:evaluated", str(version)))

    async def evaluate(self, policy: PolicyVersion) -> None:
        """Have `policy` evaluated on the test split: one `eval` request per task, once per
        version; its report is published when every group is back (`on_eval_group`)."""
        version = policy.version
        if await self.evaluated(version) or await self.redis.exists(
            self._eval_key(version, "expected")
        ):
            return
        if not self.test_tasks:
            if self.settings.loop.eval_tasks != 0:  # 0 asks for none
                log.warning("no held-out tasks to evaluate on", version=version)
            await self.redis.sadd(f"{self.key}:evaluated", version)
            return
        requests = [
            RolloutRequest(
                id=f"eval-v{version}-{task.id}",
                task=task,
                size=self.settings.loop.eval_trials,
                policy_version=version,
                served_name=policy.served_name,
                purpose="eval",
            )
            for task in self.test_tasks
        ]
        async with self.redis.pipeline(transaction=True) as pipe:
            for request in requests:
                self.eval_flights.record(pipe, request)
            pipe.sadd(self._eval_key(version, "expected"), *[r.id for r in requests])
            pipe.set(self._eval_key(version, "policy"), policy.served_name)
            pipe.sadd(f"{self.key}:evaluating", version)
            await pipe.execute()
        for request in requests:
            await self.eval_flights.send(request)
        log.info("evaluation dispatched", version=version, tasks=len(requests))

    async def on_eval_group(self, group: RolloutGroup) -> None:
        version, size = group.policy_version, self.settings.loop.eval_trials
        kept = EvalGroup(results=group_results(group), lost=max(size - len(group.trajectories), 0))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self._eval_key(version, "results"), group.id, kept.model_dump_json())
            self.eval_flights.forget(pipe, group.id)
            await pipe.execute()
        await self.complete_evaluation(version)

    async def complete_evaluation(self, version: int) -> None:
        """Publish a version's report once all of its held-out groups are back."""
        expected = await self.redis.smembers(self._eval_key(version, "expected"))
        results = await self.redis.hgetall(self._eval_key(version, "results"))
        if not expected or not expected <= results.keys() or await self.evaluated(version):
            return
        groups = [EvalGroup.model_validate_json(results[g]) for g in sorted(expected)]
        served = str(await self.redis.get(self._eval_key(version, "policy")) or "")
        result = report(
            [r for g in groups for r in g.results], served, self.settings.loop.eval_trials,
            lost=sum(g.lost for g in groups),
        )  # fmt: skip
        result.policy_version = version
        await self.bus.publish(Stream.EVALUATIONS, result)  # keyed: a second copy is a no-op
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(f"{self.key}:evaluated", version)
            pipe.srem(f"{self.key}:evaluating", version)
            await pipe.execute()
        self.returned_event.set()
        log.info(
            "evaluated", version=version, pass_hat_k=result.pass_hat_k,
            infra_errors=result.infra_errors,
        )  # fmt: skip

    async def evaluations(self, stop: anyio.Event) -> None:
        """Evaluate the base policy, then every `eval_every`-th version as it appears, and
        finish what a restart interrupted."""
        every = self.settings.loop.eval_every
        while not stop.is_set():
            policy = await self.policy()
            if policy.version == 0 or (every and policy.version % every == 0):
                await self.evaluate(policy)
            for version in await self.redis.smembers(f"{self.key}:evaluating"):
                await self.complete_evaluation(int(version))
            with anyio.move_on_after(POLL_S * 5):
                await stop.wait()

    # -- the baseline of synthetic tasks -------------------------------------------------

    async def publish_general_patterns(self) -> None:
        """`synthetic` mode: one pattern per write tool, not tied to any failure."""
        for pattern in general_patterns(self.write_tools):
            await self.bus.publish(Stream.PATTERNS, pattern)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Run until `stop` or the end of a bounded run; raises LoopStopped or RunDirError."""
        stop = stop or anyio.Event()
        if self.settings.loop.mode == "synthetic":
            await self.publish_general_patterns()
        for flights in (self.flights, self.eval_flights):  # what a crash left unsent
            await flights.send_unsent()
        tracker = RunTracker(open_tracker(self.settings, "orchestrator"))
        try:
            await self._run_all(stop, tracker)
        finally:
            tracker.tracker.close()
        if self.failure is not None:
            raise self.failure

    async def _run_all(self, stop: anyio.Event, tracker: RunTracker) -> None:
        if (self.settings.run_dir / "artifacts").is_dir():  # a restart: continue the counts
            tracker.seed(Artifacts(self.settings.run_dir))
        recorder = Recorder(self.bus, self.settings.run_dir, tracker.observe)
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
