"""The streams that connect SENTINEL's stages, the message each one carries, and its readers.

`GROUPS` declares the consumer groups that read each stream. Every process that touches a
stream creates them (the bus does, on its first publish and when a consumer starts), and the
monitor never trims a stream past an entry a declared group has not acknowledged, even one
whose process has not started yet (issue 19: the trainer's pod often starts last).
"""

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


RECORDER = "recorder"  # sentinel.orchestrator.recorder: every stream, into the run record
ORCHESTRATOR = "orchestrator"  # sentinel.orchestrator.loop
TRAINER = "trainer"  # sentinel.workers.trainer
CONTROLLER = "controller"  # sentinel.agents.controller
PROPOSER = "proposer"  # sentinel.agents.proposer: patterns
PROPOSER_FEEDBACK = "proposer-feedback"  # sentinel.agents.proposer: verdicts
VALIDATION_DISPATCH = "validation-dispatch"  # sentinel.orchestrator.dispatch

# The groups that read each stream. A new consumer group must be declared here: one that is
# not may find its stream trimmed past entries it never saw (a consumer warns at start).
GROUPS: dict[str, tuple[str, ...]] = {  # keyed by Stream
    Stream.TASKS: (RECORDER,),
    Stream.TRAJECTORIES: (RECORDER, CONTROLLER),
    Stream.DIAGNOSES: (RECORDER,),
    Stream.PATTERNS: (RECORDER, PROPOSER),
    Stream.PROPOSALS: (RECORDER, VALIDATION_DISPATCH),
    Stream.VALIDATIONS: (RECORDER, PROPOSER_FEEDBACK),
    Stream.ROLLOUT_GROUPS: (RECORDER, ORCHESTRATOR, TRAINER),
    Stream.POLICY_VERSIONS: (RECORDER, ORCHESTRATOR),
    Stream.TRAIN_REPORTS: (RECORDER, ORCHESTRATOR),
    Stream.EVALUATIONS: (RECORDER,),
}
