"""Tasks the Proposer writes, and what validation made of them."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from sentinel.schemas.message import Message, Strict, new_id
from sentinel.schemas.task import StateCheck, Task


class TaskProposal(Message):
    id: str = Field(default_factory=new_id)
    task: Task
    pattern_id: str | None = None  # None for untargeted (synthetic) proposals
    prompt_version: str
    proposer_model: str
    rationale: str = ""


class RejectionCode(StrEnum):
    SCHEMA = "schema"
    UNKNOWN_TOOL = "unknown_tool"
    BAD_ARGUMENTS = "bad_arguments"
    UNKNOWN_ENTITY = "unknown_entity"
    GOLD_WRITE_FAILED = "gold_write_failed"
    NO_STATE_CHANGE = "no_state_change"
    NOT_DISCRIMINATIVE = "not_discriminative"
    DUPLICATE = "duplicate"
    TEST_LEAKAGE = "test_leakage"
    INJECTION = "injection"
    TOO_LARGE = "too_large"
    SANDBOX_TIMEOUT = "sandbox_timeout"
    SANDBOX_CRASH = "sandbox_crash"
    TOO_EASY = "too_easy"
    TOO_HARD = "too_hard"
    POLICY_VIOLATION = "policy_violation"  # a gold write the domain's state rules forbid
    CHECK_FAILED = "check_failed"  # a check the task carries does not hold after its gold run


class RejectionReason(Strict):
    code: RejectionCode
    detail: str


class ValidationResult(Message):
    proposal_id: str
    task_id: str
    accepted: bool
    reasons: list[RejectionReason] = Field(default_factory=list)
    target_db_hash: str | None = None
    solve_rate: float | None = None
    learnability: float | None = None  # 4p(1-p) from the difficulty probe
    probe_policy_version: int | None = None  # the Solver the probe ran: the current one
    # Whether the probe's Solver failed with the category of the pattern the task was written
    # for (None: not probed, or written for no pattern)
    targeted: bool | None = None
    # The per-instance checks the accepted task carries, and how many near-miss variants of
    # its gold run (a wrong id, value or count; a write left out) they were tried on and failed
    checks: list[StateCheck] = Field(default_factory=list)
    near_misses: int = 0
    near_misses_caught: int = 0
    duration_s: float = 0.0

    def key(self) -> str:
        return self.proposal_id
