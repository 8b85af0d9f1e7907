"""How the Controller describes failures: one diagnosis per trajectory, patterns across many."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from sentinel.schemas.message import Message, Strict, new_id, utc_now

KIND_PATTERN = r"^[a-z][a-z0-9_]{2,39}$"


class FailureCategory(StrEnum):
    MISSING_ACTION = "missing_action"  # a gold action never happened
    WRONG_ARGUMENTS = "wrong_arguments"  # the right tool, with other arguments
    WRONG_ENTITY = "wrong_entity"  # an id that is not the task's user, order or item
    WRONG_TOOL = "wrong_tool"
    POLICY_VIOLATION = "policy_violation"
    MISSING_CONFIRMATION = "missing_confirmation"  # a write without the user's explicit yes
    MISSING_COMMUNICATION = "missing_communication"
    UNFINISHED = "unfinished"  # ran out of turns or context
    MALFORMED_OUTPUT = "malformed_output"
    OTHER = "other"


class FailureSignal(Strict):
    """A deterministic finding, computed from the trajectory against the task without an LLM."""

    category: FailureCategory
    step: int | None = None  # index into Trajectory.messages
    tool: str | None = None
    detail: str


class FailureDiagnosis(Message):
    id: str = Field(default_factory=new_id)
    trajectory_id: str
    task_id: str
    policy_version: int
    category: FailureCategory
    first_wrong_step: int | None = None
    summary: str
    evidence: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    signals: list[FailureSignal] = Field(default_factory=list)
    diagnoser_model: str | None = None  # None when only deterministic signals were used
    # The first wrong step and the message it answered, one line each (scanned, bounded)
    excerpt: str | None = Field(None, max_length=1000)
    # A kind of error the fixed categories do not name, in the Controller LLM's words
    # (snake_case); `category` stays the nearest fixed one, as a hint
    kind: str | None = Field(None, pattern=KIND_PATTERN)


class PatternEvidence(Strict):
    """One failure behind a pattern, as the Proposer reads it: what went wrong, where."""

    trajectory_id: str
    summary: str = Field(max_length=1000)
    excerpt: str | None = Field(None, max_length=1000)


class ErrorPattern(Message):
    """A recurring weakness of the Solver, merged from many diagnoses."""

    id: str = Field(default_factory=new_id)
    title: str
    description: str
    category: FailureCategory
    kind: str | None = Field(None, pattern=KIND_PATTERN)  # a named new kind, as diagnosed
    # The (category, kind) of the patterns merged into this one (`category` or
    # `category/kind`): a diagnosis of theirs joins this pattern from then on
    absorbed: list[str] = Field(default_factory=list, max_length=64)
    tools: list[str] = Field(default_factory=list)
    example_trajectory_ids: list[str] = Field(default_factory=list)
    evidence: list[PatternEvidence] = Field(default_factory=list)  # the newest failures last
    # Its share of the failures over versions steers the Proposer (orchestrator.steering):
    # tasks per publication are tasks_per_pattern times this.
    weight: float = Field(1.0, ge=0)
    frequency: dict[int, int] = Field(default_factory=dict)  # policy version -> diagnoses
    updated_at: datetime = Field(default_factory=utc_now)
