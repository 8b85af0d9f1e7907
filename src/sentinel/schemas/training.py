"""What flows between the rollouts and the trainer."""

from __future__ import annotations

import hashlib
from statistics import pvariance
from typing import ClassVar, Literal

from pydantic import Field

from sentinel.schemas.experience import Exploration
from sentinel.schemas.message import Message, new_id
from sentinel.schemas.task import Task
from sentinel.schemas.trajectory import Trajectory

Purpose = Literal["train", "eval"]


class RolloutRequest(Message):
    """The orchestrator's order for one rollout group; its id becomes the group's id."""

    schema_version: ClassVar[int] = 2  # 2: purpose

    id: str = Field(default_factory=new_id)
    task: Task
    size: int = Field(ge=1)
    policy_version: int = Field(ge=0)
    served_name: str  # the model name the Solver requests
    explore: bool = False  # LEAFE: reflect on failures and branch from the wrong step
    # eval: a held-out test task, `size` trials for pass^k; the group carries its trajectories
    # to the orchestrator alone (not to the Controller, the curriculum or the trainer)
    purpose: Purpose = "train"


class RolloutGroup(Message):
    """G trajectories of one task under one policy version: GRPO's unit of advantage.

    A group whose rollouts could not run (endpoint down, time limit) is still published,
    with `dropped` saying why and no trajectories, so every request ends in a group. The
    orchestrator publishes one too, under the request's id, for a group it writes off."""

    # 2: purpose; 3: trajectories' tokens as segments, carried once (in the group)
    schema_version: ClassVar[int] = 3

    id: str = Field(default_factory=new_id)
    task_id: str
    policy_version: int
    trajectories: list[Trajectory]
    dropped: str | None = None
    exploration: Exploration | None = None  # LEAFE's branches, when the request asked
    purpose: Purpose = "train"  # eval: held-out trials; the trainer and curriculum skip it

    @property
    def rewards(self) -> list[float]:
        return self.shaped_rewards(0.0)

    def shaped_rewards(self, partial_credit: float) -> list[float]:
        """tau2's reward, or for a failure `partial_credit` x the share of gold actions done."""
        return [
            max(t.reward.reward, partial_credit * t.reward.partial) if t.reward else 0.0
            for t in self.trajectories
        ]

    def informative(self, partial_credit: float = 0.0) -> bool:
        """Whether the rewards differ, so that group-relative advantages are non-zero."""
        rewards = self.shaped_rewards(partial_credit)
        return len(rewards) > 1 and pvariance(rewards) > 0.0


class PolicyVersion(Message):
    version: int
    served_name: str  # the model name rollouts request, e.g. "policy-v3"
    base_model: str
    adapter_path: str | None = None  # None for the base model or full-weight publishing
    train_step: int = 0
    endpoints: list[str] = Field(default_factory=list)  # servers that have loaded it

    def key(self) -> str:
        return f"policy-v{self.version}"


class TrainStepReport(Message):
    step: int
    mode: Literal["grpo", "sft"] = "grpo"
    policy_version: int
    loss: float
    mean_reward: float | None = None
    groups: int
    filtered_groups: int = 0
    stale_groups: int = 0
    simulator_faults: int = 0  # failed trajectories left out: the user simulator's fault
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    tokens: int
    tokens_per_s: float
    peak_memory_mb: float
    duration_s: float
    wait_s: float = 0.0  # the trainer idle, waiting for these groups
    examples: int = 0  # SFT examples trained on (mode "sft")
    trained_groups: list[str] = Field(default_factory=list)
    dropped_groups: dict[str, str] = Field(default_factory=dict)  # group id -> why

    def key(self) -> str:
        """One key per batch of groups: a no-op step keeps the step number, not the key."""
        groups = sorted([*self.trained_groups, *self.dropped_groups])
        digest = hashlib.sha256(" ".join(groups).encode()).hexdigest()[:16]
        return f"{self.mode}-step-{self.step}-{digest}"


class EvalReport(Message):
    """Held-out evaluation of one policy: pass^k and pass@k over `tasks` x `trials`."""

    policy: str
    policy_version: int | None = None
    split: str = "test"
    tasks: int
    trials: int
    pass_hat_k: dict[int, float]
    pass_at_k: dict[int, float]
    mean_reward: float
    terminations: dict[str, int]
    # trials ended by an infrastructure error (or never run: a lost group), left out of
    # pass^k and the mean as tau2 leaves them out; a task short of `trials` is left out whole
    infra_errors: int = 0

    def key(self) -> str:
        return f"eval-{self.split}-{self.policy}-v{self.policy_version}-{self.tasks}x{self.trials}"
