"""What flows between the rollouts and the trainer."""

from __future__ import annotations

from statistics import pvariance
from typing import Literal

from pydantic import Field

from sentinel.schemas.message import Message, new_id
from sentinel.schemas.trajectory import Trajectory


class RolloutGroup(Message):
    """G trajectories of one task under one policy version: GRPO's unit of advantage."""

    id: str = Field(default_factory=new_id)
    task_id: str
    policy_version: int
    trajectories: list[Trajectory]

    @property
    def rewards(self) -> list[float]:
        return [t.reward.reward if t.reward else 0.0 for t in self.trajectories]

    @property
    def informative(self) -> bool:
        """Whether the rewards differ, so that group-relative advantages are non-zero."""
        return len(self.trajectories) > 1 and pvariance(self.rewards) > 0.0


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
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    tokens: int
    tokens_per_s: float
    peak_memory_mb: float
    duration_s: float

    def key(self) -> str:
        return f"{self.mode}-step-{self.step}"
