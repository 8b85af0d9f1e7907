"""Rollout groups into GRPO samples: staleness, dynamic filtering, advantages, packing, weights.

A token-in/token-out trajectory (`Trajectory.tokens`) is one growing sequence per segment:
one rollout, one row (more only where the history had to be rendered again, a counted split),
with loss on the spans the policy sampled. An older trajectory carries each turn's exact
prompt and completion instead (`turns`); its turns are packed into one sequence when each
turn's prompt extends the previous sequence token for token, else they become separate
sequences. Either way nothing is re-tokenized, only the policy's sampled tokens carry loss,
and of those only the ones the grammar did not force (see `learnable`). Each loss
token gets a weight such that the weighted sum over the whole step is the
chosen aggregation, so gradient accumulation over any split of the batch gives one answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Literal, NamedTuple

from sentinel.schemas import RolloutGroup, Trajectory
from sentinel.schemas.trajectory import Grammar, Segment
from sentinel.training.algorithms import GRPO, Algorithm
from sentinel.usersim.rules import simulator_fault

# Records from before the server's candidates were kept name no forced positions: there a
# sampled token with behaviour logprob above this counts as forced (a near-certain free
# choice too, which is why new records carry the grammar's own verdict).
FORCED_LOGPROB = -1e-4
UNINFORMATIVE = "uninformative: every reward equal"


@dataclass
class Sample:
    """One token sequence; arrays are indexed by position in `input_ids`."""

    input_ids: list[int]
    loss_mask: list[bool]  # True on tokens the policy sampled (and the grammar did not force)
    behaviour_logprobs: list[float]  # the server's logprob of each sampled token, 0 elsewhere
    advantage: float
    weight: float  # per loss token
    trajectory_id: str
    group_id: str = ""
    temperature: float = 1.0  # the policy's: its logits are divided by it, as when sampled
    # [start, end) of each turn sampled under a grammar, and it: the trainer masks as vLLM did
    guided: list[tuple[int, int, Grammar]] = field(default_factory=list)


@dataclass
class GRPOBatch:
    samples: list[Sample]
    groups: int  # groups received
    filtered_groups: int = 0  # zero reward variance: nothing to learn
    stale_groups: int = 0  # produced by a policy older than max_staleness
    simulator_faults: int = 0  # failed trajectories the user simulator caused, left out
    rewards: list[float] = field(default_factory=list)  # of the groups kept
    trained: list[str] = field(default_factory=list)  # ids of the groups kept
    dropped: dict[str, str] = field(default_factory=dict)  # group id -> why it was left out

    @property
    def loss_tokens(self) -> int:
        return sum(sum(s.loss_mask) for s in self.samples)

    @property
    def mean_reward(self) -> float | None:
        return fmean(self.rewards) if self.rewards else None


class Packed(NamedTuple):
    """Turns that extend each other, as one sequence; arrays indexed by position."""

    ids: list[int]
    mask: list[bool]
    behaviour: list[float]
    temperature: float


def pack(trajectory: Trajectory) -> list[Packed]:
    """The trajectory as training rows: its segments (token-in/token-out), else its turns as
    few sequences as the prefix property (and one temperature per sequence) allows."""
    if trajectory.tokens:
        return [_segment(s) for s in trajectory.tokens]
    sequences: list[Packed] = []
    for turn in trajectory.turns:
        prompt, completion = turn.prompt_token_ids, turn.completion_token_ids
        current = sequences[-1] if sequences else None
        if (
            current is not None
            and current.temperature == turn.temperature
            and prompt[: len(current.ids)] == current.ids
        ):
            ids, mask, behaviour, _ = current
            extra = prompt[len(ids) :]
        else:
            ids, mask, behaviour = [], [], []
            sequences.append(Packed(ids, mask, behaviour, turn.temperature))
            extra = prompt
        ids.extend(extra)
        mask.extend([False] * len(extra))
        behaviour.extend([0.0] * len(extra))
        ids.extend(completion)
        mask.extend(learnable(turn.logprobs, turn.forced))
        behaviour.extend(turn.logprobs)
    return sequences


def guided_spans(trajectory: Trajectory, rows: int) -> list[list[tuple[int, int, Grammar]]]:
    """Per row of `pack` (`rows` of them), the spans sampled under a grammar: token-in/
    token-out rows only, as older records did not keep their grammar."""
    if not trajectory.tokens:
        return [[] for _ in range(rows)]
    return [
        [(s.start, s.end, segment.grammars[s.grammar]) for s in segment.turns
         if s.grammar is not None]
        for segment in trajectory.tokens
    ]  # fmt: skip


def learnable(logprobs: list[float], forced: list[int] | None) -> list[bool]:
    """Which sampled tokens carry loss: all but those the grammar allowed alone. Under
    guided decoding vLLM reports logprobs after the grammar's mask, so a forced token has
    probability 1 under the sampling policy and no learning signal."""
    if forced is None:
        return [lp < FORCED_LOGPROB for lp in logprobs]
    mask = [True] * len(logprobs)
    for i in forced:
        mask[i] = False
    return mask


def _segment(segment: Segment) -> Packed:
    """One growing sequence: loss on the sampled spans, rendered tokens and junctions none."""
    count = len(segment.token_ids)
    mask, behaviour = [False] * count, [0.0] * count
    for span in segment.turns:
        mask[span.start : span.end] = learnable(span.logprobs, span.forced)
        behaviour[span.start : span.end] = span.logprobs
    return Packed(list(segment.token_ids), mask, behaviour, segment.temperature)


def advantages(
    groups: Sequence[RolloutGroup],
    scale: Literal["group", "batch", "none"],
    partial_credit: float = 0.0,
) -> dict[str, float]:
    """GRPO's trajectory-level r - mean(group), optionally divided by the group's or batch's
    std (training.algorithms has the others)."""
    return GRPO(scale).advantages(groups, partial_credit)


def build_batch(
    groups: Sequence[RolloutGroup],
    *,
    current_version: int,
    max_staleness: int,
    scale: Literal["group", "batch", "none"],
    aggregation: Literal["token_mean", "sequence_mean"],
    partial_credit: float = 0.0,
    algorithm: Algorithm | None = None,
    exclude_simulator_faults: bool = False,
) -> GRPOBatch:
    """The step's samples; `algorithm` scores and weighs them (None: GRPO by scale and
    aggregation). With `exclude_simulator_faults`, failures the user simulator caused leave
    their groups first (a group left without reward variance is then filtered)."""
    algorithm = algorithm or GRPO(scale, aggregation)
    batch = GRPOBatch(samples=[], groups=len(groups))
    kept: list[RolloutGroup] = []
    for group in groups:
        if exclude_simulator_faults:
            group = _without_simulator_faults(group, batch)
        if reason := _dropped(group, current_version, max_staleness, partial_credit):
            batch.dropped[group.id] = reason
            batch.stale_groups += reason.startswith("stale")
            batch.filtered_groups += reason == UNINFORMATIVE
        else:
            kept.append(group)
    batch.trained = [g.id for g in kept]
    batch.rewards = [r for g in kept for r in g.shaped_rewards(partial_credit)]
    advantage = algorithm.advantages(kept, partial_credit)
    packed = {t.id: pack(t) for g in kept for t in g.trajectories}
    trajectories = [
        t for g in kept for t in g.trajectories if any(any(p.mask) for p in packed[t.id])
    ]
    weights = algorithm.weights(
        {t.id: sum(sum(p.mask) for p in packed[t.id]) for t in trajectories}
    )
    for trajectory in trajectories:
        weight = weights[trajectory.id]
        made = packed[trajectory.id]
        rows = zip(made, guided_spans(trajectory, len(made)), strict=True)
        for (ids, mask, behaviour, temperature), guided in rows:
            sample = Sample(
                ids, mask, behaviour, advantage[trajectory.id], weight, trajectory.id,
                trajectory.group_id or "", temperature, guided,
            )  # fmt: skip
            batch.samples.append(sample)
    return batch


def _without_simulator_faults(group: RolloutGroup, batch: GRPOBatch) -> RolloutGroup:
    """The group without its simulator-blamed failures, counted on the batch."""
    kept = [t for t in group.trajectories if simulator_fault(t) is None]
    batch.simulator_faults += len(group.trajectories) - len(kept)
    return group.model_copy(update={"trajectories": kept})


def _dropped(
    group: RolloutGroup, current_version: int, max_staleness: int, partial_credit: float
) -> str | None:
    """Why `group` is left out of the step, or None to train on it."""
    if group.dropped:
        return f"rollout: {group.dropped}"
    if (age := current_version - group.policy_version) > max_staleness:
        return f"stale: {age} versions behind (max_staleness {max_staleness})"
    return None if group.informative(partial_credit) else UNINFORMATIVE


def micro_batches(
    samples: Sequence[Sample], max_tokens: int, share_prefix: bool = False
) -> list[list[Sample]]:
    """Split samples into micro-batches of at most `max_tokens` padded tokens (at least one).

    With `share_prefix`, a micro-batch is one group's samples, by length: their common prefix
    runs once and the rows after it in chunks (grpo.backward_sharing_prefix)."""
    if not share_prefix:
        return _split(samples, max_tokens)
    by_group: dict[str, list[Sample]] = {}
    for sample in samples:
        by_group.setdefault(sample.group_id, []).append(sample)
    return [sorted(group, key=lambda s: len(s.input_ids)) for group in by_group.values()]


def _split(samples: Sequence[Sample], max_tokens: int) -> list[list[Sample]]:
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    for sample in ordered:
        width = max([len(sample.input_ids), *(len(s.input_ids) for s in current)])
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(sample)
    if current:
        batches.append(current)
    return batches
