"""The trainer worker: rollout groups in, policy-gradient steps, checkpoints and policies out.

Each RolloutGroup handler waits until a step that used its group has been checkpointed, and
only then returns, so the bus acknowledges it; meanwhile the bus keeps its lease. A trainer
killed mid-step therefore loses nothing: its groups are still pending and are swept to the
restarted trainer, which resumes from the last checkpoint. The checkpoint lists the groups
it trained, so a group trained but not yet acknowledged before a crash is acknowledged on
redelivery without being trained twice.

`loop.training` picks the objectives of a batch of groups: RL on the groups, SFT on the
corrections LEAFE found in their failures, or both (an RL step, then an SFT step). Which RL
algorithm (`trainer.algorithm`: grpo, rloo, dr_grpo) is the Policy's business, not this
worker's: it holds no branch on it. Every
batch ends in a report that accounts for each group, trained or dropped.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from pathlib import Path

import anyio

from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import Envelope, RolloutGroup, TrainStepReport
from sentinel.tracking import Tracker, batch_rewards, open_tracker, scalars_of
from sentinel.training.policy import Policy
from sentinel.training.publisher import PublishError, WeightPublisher

log = get_logger(__name__)

GROUP = "trainer"
REMEMBERED_GROUPS = 100_000


class TrainerWorker:
    def __init__(
        self, settings: Settings, bus: Bus, policy: Policy, publisher: WeightPublisher
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.policy = policy
        self.publisher = publisher
        self.directory = settings.run_dir / "trainer" / "checkpoints"
        self.trained: deque[str] = deque(maxlen=REMEMBERED_GROUPS)
        self._pending: list[tuple[RolloutGroup, anyio.Event, float]] = []  # + arrival time
        self._last_reports: list[TrainStepReport] = []
        self._idle_since = time.monotonic()
        self._unreleased: list[anyio.Event] = []
        self._dirty = False  # weights changed since the last checkpoint
        self._arrived = anyio.Event()
        self.tracker: Tracker | None = None  # opened by `run`: the curves of the steps

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any."""
        checkpoints = sorted(self.directory.glob("step-*[0-9]"), key=_step_of)
        if not checkpoints:
            return
        state = self.policy.restore(checkpoints[-1])
        self.trained.extend(str(g) for g in state.get("trained_groups", []))  # type: ignore[attr-defined]
        last = state.get("last_reports", [])  # republished on start: they may have been lost
        self._last_reports = [TrainStepReport.model_validate(r) for r in last]  # type: ignore[attr-defined]
        log.info("trainer resumed", checkpoint=str(checkpoints[-1]), step=self.policy.step)

    async def handle(self, envelope: Envelope[RolloutGroup]) -> None:
        group = envelope.payload
        if group.purpose == "eval":  # held-out trials: the orchestrator's, never trained on
            return
        if group.id in self.trained:
            log.info("group already trained; acknowledging", group=group.id)
            return
        for waiting, done, _ in self._pending:  # delivered again while it waits or trains
            if waiting.id == group.id:
                log.info("group already pending; acknowledged with it", group=group.id)
                await done.wait()
                return
        done = anyio.Event()
        self._pending.append((group, done, time.monotonic()))
        self._arrived.set()
        await done.wait()

    async def run(self, stop: anyio.Event | None = None) -> None:
        per_step = self.settings.trainer.groups_per_step
        consumer_settings = self.bus.settings.model_copy(
            update={"concurrency": per_step * 2, "batch_size": per_step * 2}
        )
        consumer = Bus(self.bus.redis, consumer_settings).consumer(
            Stream.ROLLOUT_GROUPS, GROUP, RolloutGroup, self.handle
        )
        for report in self._last_reports:  # keyed: harmless if published already
            await self.bus.publish(Stream.TRAIN_REPORTS, report)
        self._idle_since = time.monotonic()
        self.tracker = open_tracker(self.settings, "trainer")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.run, stop)
                while stop is None or not stop.is_set():
                    with anyio.move_on_after(1.0):
                        await self._arrived.wait()
                    self._arrived = anyio.Event()
                    if self._due(per_step):
                        await self.step(self._pending[:per_step])
                        del self._pending[:per_step]
                tg.cancel_scope.cancel()
        finally:
            self.tracker.close()

    def _due(self, per_step: int) -> bool:
        """A full batch, or a partial one that waited `flush_after_s` (the run's tail)."""
        if len(self._pending) >= per_step:
            return True
        waited = time.monotonic() - self._pending[0][2] if self._pending else 0.0
        return bool(self._pending) and waited >= self.settings.trainer.flush_after_s

    async def step(self, batch: list[tuple[RolloutGroup, anyio.Event, float]]) -> None:
        """Train, checkpoint when due, publish when due; release groups once checkpointed."""
        groups = [group for group, _, _ in batch]
        before = self.policy.step
        reports = await self._train(groups)
        reports[0].wait_s = time.monotonic() - self._idle_since
        self._last_reports = reports
        self.trained.extend(g.id for g in groups)
        self._unreleased.extend(done for _, done, _ in batch)
        self._dirty |= any(r.tokens for r in reports)
        if self._dirty and self._crossed(before, self.settings.trainer.checkpoint_every):
            await anyio.to_thread.run_sync(self._checkpoint)
            self._dirty = False
        for report in reports:
            log.info("train step", **report.model_dump(mode="json", exclude={"created_at"}))
            self._track(report, groups)
        if self._crossed(before, self.settings.trainer.publish_every):
            await self._publish()  # before the reports: whoever reads them can find the policy
        for report in reports:
            await self.bus.publish(Stream.TRAIN_REPORTS, report)
        if not self._dirty:  # every group so far is in a checkpoint: let the bus ack them
            for done in self._unreleased:
                done.set()
            self._unreleased.clear()
        self._idle_since = time.monotonic()

    async def _train(self, groups: list[RolloutGroup]) -> list[TrainStepReport]:
        """The batch's steps by `loop.training`; the first report accounts for every group."""
        training = self.settings.loop.training
        if training == "leafe":
            reports = [self._unused(groups, "leafe: the groups' corrections train, not GRPO")]
        else:
            reports = [await anyio.to_thread.run_sync(self.policy.grpo_step, groups)]
        corrections = [
            c.example for g in groups if g.exploration for c in g.exploration.corrections
        ]
        if training != "grpo" and corrections:
            reports.append(await anyio.to_thread.run_sync(self.policy.sft_step, corrections))
        return reports

    def _track(self, report: TrainStepReport, groups: list[RolloutGroup]) -> None:
        if self.tracker is not None:
            for point in [*scalars_of(report), batch_rewards(report, groups)]:
                if point is not None:
                    self.tracker.scalars(point)

    def _unused(self, groups: list[RolloutGroup], reason: str) -> TrainStepReport:
        return TrainStepReport(
            step=self.policy.step, policy_version=self.policy.version, loss=0.0,
            groups=len(groups), tokens=0, tokens_per_s=0.0, peak_memory_mb=0.0, duration_s=0.0,
            dropped_groups={g.id: f"rollout: {g.dropped}" if g.dropped else reason for g in groups},
        )  # fmt: skip

    def _crossed(self, before: int, every: int) -> bool:
        """Whether the steps since `before` reached a multiple of `every`."""
        return self.policy.step // every > before // every

    async def _publish(self) -> None:
        try:
            version = await self.publisher.publish(self.policy, self.policy.step)
        except PublishError as error:  # reported; the next step publishes a newer version
            log.error("policy not published", version=self.policy.version, error=str(error))
            return
        await self.bus.publish(Stream.POLICY_VERSIONS, version)

    def _checkpoint(self) -> None:
        path = self.directory / f"step-{self.policy.step}"
        last = [r.model_dump(mode="json") for r in self._last_reports]
        self.policy.checkpoint(path, {"trained_groups": list(self.trained), "last_reports": last})
        keep = self.settings.trainer.keep_checkpoints
        for old in sorted(self.directory.glob("step-*[0-9]"), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))
