"""The trainer worker: rollout groups in, GRPO steps, checkpoints and new policies out.

Each RolloutGroup handler waits until a step that used its group has been checkpointed, and
only then returns, so the bus acknowledges it; meanwhile the bus keeps its lease. A trainer
killed mid-step therefore loses nothing: its groups are still pending and are swept to the
restarted trainer, which resumes from the last checkpoint. The checkpoint lists the groups
it trained, so a group trained but not yet acknowledged before a crash is acknowledged on
redelivery without being trained twice.
"""

from __future__ import annotations

import shutil
from collections import deque
from pathlib import Path

import anyio

from sentinel.config import Settings
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import Envelope, RolloutGroup
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
        self._pending: list[tuple[RolloutGroup, anyio.Event]] = []
        self._unreleased: list[anyio.Event] = []
        self._dirty = False  # weights changed since the last checkpoint
        self._arrived = anyio.Event()

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any."""
        checkpoints = sorted(self.directory.glob("step-*[0-9]"), key=_step_of)
        if not checkpoints:
            return
        state = self.policy.restore(checkpoints[-1])
        self.trained.extend(str(g) for g in state.get("trained_groups", []))  # type: ignore[attr-defined]
        log.info("trainer resumed", checkpoint=str(checkpoints[-1]), step=self.policy.step)

    async def handle(self, envelope: Envelope[RolloutGroup]) -> None:
        group = envelope.payload
        if group.id in self.trained:
            log.info("group already trained; acknowledging", group=group.id)
            return
        done = anyio.Event()
        self._pending.append((group, done))
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
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run, stop)
            while stop is None or not stop.is_set():
                with anyio.move_on_after(1.0):
                    await self._arrived.wait()
                self._arrived = anyio.Event()
                if len(self._pending) >= per_step:
                    await self.step(self._pending[:per_step])
                    del self._pending[:per_step]
            tg.cancel_scope.cancel()

    async def step(self, batch: list[tuple[RolloutGroup, anyio.Event]]) -> None:
        """Train, checkpoint when due, publish when due; release groups once checkpointed."""
        groups = [group for group, _ in batch]
        report = await anyio.to_thread.run_sync(self.policy.grpo_step, groups)
        self.trained.extend(g.id for g in groups)
        self._unreleased.extend(done for _, done in batch)
        self._dirty |= report.tokens > 0
        due = self.policy.step % self.settings.trainer.checkpoint_every == 0
        if self._dirty and due:
            await anyio.to_thread.run_sync(self._checkpoint)
            self._dirty = False
        log.info("train step", **report.model_dump(mode="json", exclude={"created_at"}))
        await self.bus.publish(Stream.TRAIN_REPORTS, report)
        if report.tokens and self.policy.step % self.settings.trainer.publish_every == 0:
            await self._publish()
        if not self._dirty:  # every group so far is in a checkpoint: let the bus ack them
            for done in self._unreleased:
                done.set()
            self._unreleased.clear()

    async def _publish(self) -> None:
        try:
            version = await self.publisher.publish(self.policy, self.policy.step)
        except PublishError as error:  # reported; the next step publishes a newer version
            log.error("policy not published", version=self.policy.version, error=str(error))
            return
        await self.bus.publish(Stream.POLICY_VERSIONS, version)

    def _checkpoint(self) -> None:
        path = self.directory / f"step-{self.policy.step}"
        self.policy.checkpoint(path, {"trained_groups": list(self.trained)})
        keep = self.settings.trainer.keep_checkpoints
        for old in sorted(self.directory.glob("step-*[0-9]"), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))
