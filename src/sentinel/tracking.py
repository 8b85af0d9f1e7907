"""Experiment tracking: the run's curves in TensorBoard (always) and W&B (when configured).

A `Tracker` takes scalars on named axes: `train` by train step, `eval` and `patterns` by
policy version, `validation` by verdicts seen. The steps come from the data, never from a
counter of the process, and each component writes its own subdirectory (`<run_dir>/tb/
<component>`) or W&B run (an id kept in `<run_dir>/tracking/`), so a restarted component
continues its curves where they stopped. `scalars_of` turns one recorded message into points;
`RunTracker` is the orchestrator's subscriber, which adds what needs the run so far
(acceptance, pattern shares) and is seeded from the record on a restart.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sentinel.config import Settings, WandbSettings
from sentinel.logs import get_logger
from sentinel.schemas import (
    ErrorPattern,
    EvalReport,
    FailureDiagnosis,
    Message,
    RolloutGroup,
    TrainStepReport,
    ValidationResult,
)

if TYPE_CHECKING:
    from sentinel.report import Artifacts

log = get_logger(__name__)


@dataclass(frozen=True)
class Point:
    """Scalars at one step of one axis; their tags are `<axis>/<name>`."""

    axis: str
    step: int
    values: Mapping[str, float]


class Tracker(Protocol):
    def scalars(self, point: Point) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files via tensorboard's own writer (what torch's SummaryWriter wraps), without
    importing torch: the orchestrator has none."""

    def __init__(self, directory: Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(directory), flush_secs=2)  # a kill -9 loses 2 s

    def scalars(self, point: Point) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(
            value=[
                Summary.Value(tag=f"{point.axis}/{name}", simple_value=float(value))
                for name, value in point.values.items()
            ]
        )
        self.writer.add_event(Event(wall_time=time.time(), step=point.step, summary=summary))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per component, resumed by a stable id. Each axis has its own step metric
    (`step/<axis>`), so a resumed run may log steps below W&B's own counter."""

    def __init__(self, config: WandbSettings, run_dir: Path, component: str) -> None:
        import wandb

        if config.mode == "online" and (key := os.environ.get(config.api_key_env)):
            os.environ.setdefault("WANDB_API_KEY", key)  # read by wandb; never logged
        self.run = wandb.init(
            project=config.project, entity=config.entity, mode=config.mode,
            dir=str(config.dir or run_dir), id=f"{_run_id(run_dir)}-{component}",
            name=f"{run_dir.name}-{component}", group=_run_id(run_dir), job_type=component,
            resume="allow", settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip
        self.axes: set[str] = set()

    def scalars(self, point: Point) -> None:
        if point.axis not in self.axes:
            self.run.define_metric(f"step/{point.axis}")
            self.run.define_metric(f"{point.axis}/*", step_metric=f"step/{point.axis}")
            self.axes.add(point.axis)
        values = {f"{point.axis}/{k}": v for k, v in point.values.items()}
        self.run.log({f"step/{point.axis}": point.step, **values})

    def close(self) -> None:
        self.run.finish()


def _run_id(run_dir: Path) -> str:
    """The run's tracking id, made once and kept in the run directory."""
    path = run_dir / "tracking" / "run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class FanOut:
    """Every configured tracker; one that fails is logged and left out, the run goes on."""

    def __init__(self, trackers: Iterable[Tracker]) -> None:
        self.trackers = list(trackers)

    def scalars(self, point: Point) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.scalars(point)
            except Exception as error:
                log.error(
                    "tracker failed; dropped", tracker=type(tracker).__name__, error=repr(error)
                )
                self.trackers.remove(tracker)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as error:
                log.warning("tracker did not close", error=repr(error))


def open_tracker(settings: Settings, component: str) -> FanOut:
    """TensorBoard in `<run_dir>/tb/<component>`, plus W&B when `tracking.wandb` is set."""
    trackers: list[Tracker] = [TensorBoardTracker(settings.run_dir / "tb" / component)]
    if (config := settings.tracking.wandb) is not None:
        try:
            trackers.append(WandbTracker(config, settings.run_dir, component))
        except Exception as error:  # W&B down or misconfigured: TensorBoard still records
            log.error("W&B not started; TensorBoard only", error=repr(error))
    return FanOut(trackers)


# -- messages into scalars ---------------------------------------------------------------


def scalars_of(message: Message) -> list[Point]:
    """What a recorded message says as curves; [] for messages that need the run so far."""
    if isinstance(message, TrainStepReport):
        return [_train_point(message)]
    if isinstance(message, EvalReport):
        values = {f"pass^{k}": v for k, v in message.pass_hat_k.items()}
        values |= {f"pass@{k}": v for k, v in message.pass_at_k.items()}
        values |= {"mean_reward": message.mean_reward, "infra_errors": message.infra_errors}
        return [Point("eval", message.policy_version or 0, values)]
    return []


def _train_point(r: TrainStepReport) -> Point:
    values: dict[str, float] = {
        "loss": r.loss, "tokens_per_s": r.tokens_per_s, "duration_s": r.duration_s,
        "idle_s": r.wait_s, "peak_memory_mb": r.peak_memory_mb,
        "trained_groups": len(r.trained_groups), "dropped_groups": len(r.dropped_groups),
    }  # fmt: skip
    if r.mode == "sft":
        return Point("sft", r.step, values | {"examples": r.examples})
    values |= {
        "kl": r.approx_kl, "clip_fraction": r.clip_fraction,
        "informative_groups": r.groups - r.filtered_groups - r.stale_groups,
        "filtered_groups": r.filtered_groups, "stale_groups": r.stale_groups,
    }  # fmt: skip
    if r.mean_reward is not None:  # the batch's rewards, with partial credit
        values["shaped_reward"] = r.mean_reward
    return Point("train", r.step, values)


def batch_rewards(report: TrainStepReport, groups: Iterable[RolloutGroup]) -> Point | None:
    """tau2's reward (no partial credit) over the trajectories of the groups a step trained."""
    trained = set(report.trained_groups)
    rewards = [r for g in groups if g.id in trained for r in g.rewards]
    if report.mode != "grpo" or not rewards:
        return None
    return Point("train", report.step, {"task_reward": sum(rewards) / len(rewards)})


@dataclass
class RunTracker:
    """The orchestrator's subscriber: each recorded message, as curves. Train reports are the
    trainer's to log (it adds the batch's task reward); this logs the rest."""

    tracker: Tracker
    seen: set[str] = field(default_factory=set)  # keys already counted (redelivery)
    verdicts: Counter[str] = field(default_factory=Counter)  # accepted, rejected, codes
    failures: Counter[int] = field(default_factory=Counter)  # diagnoses per policy version

    def seed(self, artifacts: Artifacts) -> None:
        """The counts a restarted orchestrator continues from, without logging them again."""
        from sentinel.orchestrator.streams import Stream

        for message in [
            *artifacts.read(Stream.VALIDATIONS, ValidationResult),
            *artifacts.read(Stream.DIAGNOSES, FailureDiagnosis),
        ]:
            self._count(message)

    def observe(self, message: Message) -> None:
        if isinstance(message, TrainStepReport):
            return
        points = scalars_of(message)
        if self._count(message) and isinstance(message, ValidationResult):
            points.append(self._acceptance())
        if isinstance(message, ErrorPattern):
            points.extend(self._shares(message))
        for point in points:
            self.tracker.scalars(point)

    def _count(self, message: Message) -> bool:
        """Count a verdict or diagnosis once; False if seen before."""
        if not isinstance(message, ValidationResult | FailureDiagnosis):
            return False
        key = f"{type(message).__name__}:{message.key()}"
        if key in self.seen:
            return False
        self.seen.add(key)
        if isinstance(message, FailureDiagnosis):
            self.failures[message.policy_version] += 1
        else:
            self.verdicts["accepted" if message.accepted else "rejected"] += 1
            self.verdicts.update(f"rejected_{r.code.value}" for r in message.reasons)
        return True

    def _acceptance(self) -> Point:
        seen = self.verdicts["accepted"] + self.verdicts["rejected"]
        values = {"acceptance": self.verdicts["accepted"] / seen, **self.verdicts}
        return Point("validation", seen, values)

    def _shares(self, pattern: ErrorPattern) -> list[Point]:
        """The pattern's share of each version's failures (its copy carries every count)."""
        return [
            Point("patterns", version, {pattern.id: n / max(self.failures[version], 1)})
            for version, n in sorted(pattern.frequency.items())
        ]
