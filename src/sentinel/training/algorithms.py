"""Policy-gradient algorithms as a registry: each scores a rollout group into per-trajectory
advantages and weighs each trajectory's loss tokens (the aggregation), by name.

`trainer.algorithm` names one (prime-rl's `Algorithm.score_group` shape); the loss itself
stays one plain function (grpo.grpo_loss), fed each token's advantage and weight:

- `grpo`: A_i = r_i - mean(r), divided by the group's (or batch's) std per
  `trainer.advantage_scale`; tokens weighed per `trainer.loss_aggregation`.
- `rloo`: A_i = r_i - mean(r_{-i}), the leave-one-out baseline (unbiased, no std scaling);
  tokens weighed per `trainer.loss_aggregation`.
- `dr_grpo` (Dr. GRPO, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r), no std;
  every token weighs 1 / (trajectories x `trainer.dr_grpo_max_tokens`), a constant length
  normaliser (TRL's `loss_type="dr_grpo"`: sum / (B x max_completion_length)), so a long
  trajectory's tokens count as much as a short one's.

The weights of one update sum (over its tokens) to the aggregation of that update, so
gradient accumulation over micro-batches gives one answer; `weights` is called again on each
mini-batch when a step makes several updates (`trainer.updates_per_batch`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from statistics import fmean, pstdev
from typing import ClassVar, Literal

from sentinel.config import TrainerSettings
from sentinel.schemas import RolloutGroup

EPS = 1e-6
Scale = Literal["group", "batch", "none"]
Aggregation = Literal["token_mean", "sequence_mean"]


class Algorithm(ABC):
    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: TrainerSettings) -> Algorithm: ...

    @abstractmethod
    def score_group(self, rewards: Sequence[float]) -> list[float]:
        """The advantage of each trajectory of one group, in order."""

    @abstractmethod
    def weights(self, tokens: Mapping[str, int]) -> dict[str, float]:
        """The per-token loss weight of each trajectory, from its loss-token count; only
        trajectories with loss tokens are given."""

    def advantages(
        self, groups: Sequence[RolloutGroup], partial_credit: float = 0.0
    ) -> dict[str, float]:
        """Trajectory id -> advantage, over the groups of a step."""
        scored: dict[str, float] = {}
        for group in groups:
            rewards = group.shaped_rewards(partial_credit)
            for trajectory, value in zip(
                group.trajectories, self.score_group(rewards), strict=True
            ):
                scored[trajectory.id] = value
        return scored


def aggregate(tokens: Mapping[str, int], aggregation: Aggregation) -> dict[str, float]:
    """Token mean over all loss tokens, or the mean over trajectories of each one's mean."""
    if aggregation == "token_mean":
        total = sum(tokens.values())
        return {t: 1.0 / total for t in tokens}
    return {t: 1.0 / (count * len(tokens)) for t, count in tokens.items()}


class GRPO(Algorithm):
    name = "grpo"

    def __init__(self, scale: Scale = "group", aggregation: Aggregation = "token_mean") -> None:
        self.scale = scale
        self.aggregation: Aggregation = aggregation

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> GRPO:
        return cls(settings.advantage_scale, settings.loss_aggregation)

    def score_group(self, rewards: Sequence[float]) -> list[float]:
        mean, std = fmean(rewards), pstdev(rewards)
        if self.scale == "group":
            return [(r - mean) / (std + EPS) for r in rewards]
        return [r - mean for r in rewards]

    def advantages(
        self, groups: Sequence[RolloutGroup], partial_credit: float = 0.0
    ) -> dict[str, float]:
        raw = super().advantages(groups, partial_credit)
        if self.scale == "batch" and len(raw) > 1:  # one std over the step's advantages
            std = pstdev(raw.values())
            return {t: a / (std + EPS) for t, a in raw.items()}
        return raw

    def weights(self, tokens: Mapping[str, int]) -> dict[str, float]:
        return aggregate(tokens, self.aggregation)


class RLOO(Algorithm):
    name = "rloo"

    def __init__(self, aggregation: Aggregation = "token_mean") -> None:
        self.aggregation: Aggregation = aggregation

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> RLOO:
        return cls(settings.loss_aggregation)

    def score_group(self, rewards: Sequence[float]) -> list[float]:
        count = len(rewards)
        if count < 2:  # no other sample to be a baseline: nothing to learn
            return [0.0] * count
        total = sum(rewards)
        return [r - (total - r) / (count - 1) for r in rewards]

    def weights(self, tokens: Mapping[str, int]) -> dict[str, float]:
        return aggregate(tokens, self.aggregation)


class DrGRPO(Algorithm):
    name = "dr_grpo"

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> DrGRPO:
        return cls(settings.dr_grpo_max_tokens)

    def score_group(self, rewards: Sequence[float]) -> list[float]:
        mean = fmean(rewards)
        return [r - mean for r in rewards]

    def weights(self, tokens: Mapping[str, int]) -> dict[str, float]:
        constant = 1.0 / (len(tokens) * self.max_tokens)
        return dict.fromkeys(tokens, constant)


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(algorithm: type[Algorithm]) -> type[Algorithm]:
    """Make `algorithm` selectable as `trainer.algorithm: <its name>`."""
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


for _algorithm in (GRPO, RLOO, DrGRPO):
    register(_algorithm)


def algorithm(settings: TrainerSettings) -> Algorithm:
    """The algorithm `trainer.algorithm` names (validated against the registry)."""
    return ALGORITHMS[settings.algorithm].from_settings(settings)
