"""The streams that connect SENTINEL's stages, and the message each one carries."""

from __future__ import annotations

from enum import StrEnum

from sentinel.schemas import (
    ErrorPattern,
    EvalReport,
    FailureDiagnosis,
    Message,
    PolicyVersion,
    RolloutGroup,
    Task,
    TaskProposal,
    TrainStepReport,
    Trajectory,
    ValidationResult,
)


class Stream(StrEnum):
    TASKS = "tasks"  # accepted tasks entering the pool
    TRAJECTORIES = "trajectories"  # every finished rollout; the Controller reads the failures
    DIAGNOSES = "diagnoses"
    PATTERNS = "patterns"  # new or updated error patterns, for the Proposer
    PROPOSALS = "proposals"  # proposed tasks, for validation
    VALIDATIONS = "validations"  # validation verdicts, for the orchestrator and the Proposer
    ROLLOUT_GROUPS = "rollout_groups"  # for the trainer
    POLICY_VERSIONS = "policy_versions"  # published policies, for the rollouts
    TRAIN_REPORTS = "train_reports"
    EVALUATIONS = "evaluations"  # held-out pass^k per policy version


CARRIES: dict[Stream, type[Message]] = {
    Stream.TASKS: Task,
    Stream.TRAJECTORIES: Trajectory,
    Stream.DIAGNOSES: FailureDiagnosis,
    Stream.PATTERNS: ErrorPattern,
    Stream.PROPOSALS: TaskProposal,
    Stream.VALIDATIONS: ValidationResult,
    Stream.ROLLOUT_GROUPS: RolloutGroup,
    Stream.POLICY_VERSIONS: PolicyVersion,
    Stream.TRAIN_REPORTS: TrainStepReport,
    Stream.EVALUATIONS: EvalReport,
}
