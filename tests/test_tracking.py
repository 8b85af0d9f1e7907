"""The tracker seam: messages into scalars, read back with TensorBoard's own reader, and a
W&B offline run directory; a restarted component continues its curves."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb as wandb_sdk
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sentinel.config import Settings, TrackingSettings, WandbSettings
from sentinel.schemas import (
    EvalReport,
    RejectionCode,
    RejectionReason,
    TrainStepReport,
    ValidationResult,
)
from sentinel.tracking import Point, RunTracker, batch_rewards, open_tracker, scalars_of
from tests.factories import examples, group


def train_report(step: int, trained: list[str]) -> TrainStepReport:
    template = next(m for m in examples() if isinstance(m, TrainStepReport))
    return template.model_copy(
        update={"step": step, "trained_groups": trained, "mean_reward": 0.25 * step, "wait_s": 2.0}
    )


def eval_report(version: int) -> EvalReport:
    template = next(m for m in examples() if isinstance(m, EvalReport))
    return template.model_copy(
        update={"policy_version": version, "pass_hat_k": {1: 0.5, 2: 0.25 * version}}
    )


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_scalars_of_a_train_report_and_an_evaluation() -> None:
    [train] = scalars_of(train_report(3, ["g-a-1"]))
    assert (train.axis, train.step) == ("train", 3)
    assert {"loss", "kl", "clip_fraction", "tokens_per_s", "idle_s", "shaped_reward"} <= set(
        train.values
    )
    assert train.values["shaped_reward"] == 0.75
    [evaluation] = scalars_of(eval_report(2))
    assert (evaluation.axis, evaluation.step, evaluation.values["pass^2"]) == ("eval", 2, 0.5)
    rewards = batch_rewards(train_report(3, ["g-a-1"]), [group("a", [1.0, 0.0], 1)])
    assert rewards == Point("train", 3, {"task_reward": 0.5})


def test_tensorboard_reads_back_every_tag_at_each_step_across_a_restart(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path)
    for steps in ([1, 2], [3]):  # the second process: a restarted trainer
        tracker = open_tracker(settings, "trainer")
        for step in steps:
            for point in scalars_of(train_report(step, [])):
                tracker.scalars(point)
        tracker.close()
    found = read_scalars(tmp_path / "tb" / "trainer")
    assert [s for s, _ in found["train/loss"]] == [1, 2, 3]
    assert found["train/shaped_reward"] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert {"train/kl", "train/clip_fraction", "train/tokens_per_s", "train/idle_s"} <= set(found)


def test_the_orchestrators_subscriber_logs_evals_and_acceptance_once(tmp_path: Path) -> None:
    tracker = open_tracker(Settings(run_dir=tmp_path), "orchestrator")
    subscriber = RunTracker(tracker)
    rejected = RejectionReason(code=RejectionCode.TOO_EASY, detail="solved")
    verdicts = [
        ValidationResult(proposal_id="p1", task_id="t1", accepted=True),
        ValidationResult(proposal_id="p2", task_id="t2", accepted=False, reasons=[rejected]),
    ]
    for message in [eval_report(0), eval_report(1), *verdicts, verdicts[1], train_report(1, [])]:
        subscriber.observe(message)  # the second p2 is a redelivery: not counted again
    tracker.close()
    found = read_scalars(tmp_path / "tb" / "orchestrator")
    assert found["eval/pass^2"] == [(0, 0.0), (1, 0.25)]
    assert found["validation/acceptance"] == [(1, 1.0), (2, 0.5)]
    assert found["validation/rejected_too_easy"] == [(2, 1.0)]
    assert not any(tag.startswith("train/") for tag in found)  # the trainer's to log


@pytest.mark.slow
def test_wandb_offline_writes_a_run_directory_with_the_scalars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb = WandbSettings(project="sentinel-test", dir=tmp_path / "wb")
    settings = Settings(run_dir=tmp_path / "run", tracking=TrackingSettings(wandb=wandb))
    tracker = open_tracker(settings, "trainer")
    assert len(tracker.trackers) == 2  # TensorBoard and W&B
    for step in (1, 2):
        for point in scalars_of(train_report(step, [])):
            tracker.scalars(point)
    tracker.close()
    wandb_sdk.teardown()  # wait for the service to write the run out
    run_id = (tmp_path / "run" / "tracking" / "run_id").read_text()
    [offline] = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}-trainer")
    [record] = offline.glob("*.wandb")
    written = record.read_bytes()  # protobuf records: the tags are there as they are
    assert b"train/shaped_reward" in written
    assert b"step/train" in written
    assert b"train/clip_fraction" in written
