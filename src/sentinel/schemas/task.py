"""Tasks in tau2-bench's format, plus where each one came from."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, JsonValue, field_validator

from sentinel.schemas.chat import Requestor, ToolCall
from sentinel.schemas.failure import FailureCategory
from sentinel.schemas.message import Message, Strict


class RewardBasis(StrEnum):
    DB = "DB"
    ENV_ASSERTION = "ENV_ASSERTION"
    NL_ASSERTION = "NL_ASSERTION"
    ACTION = "ACTION"
    COMMUNICATE = "COMMUNICATE"


class Action(Strict):
    """A gold tool call: what the agent (or user) should do."""

    action_id: str
    requestor: Requestor = "assistant"
    name: str
    arguments: dict[str, Any]
    info: str | None = None
    compare_args: list[str] | None = None

    def compared(self) -> dict[str, Any]:
        """The arguments a call must match, as tau2's ActionEvaluator compares them."""
        keys = self.compare_args if self.compare_args is not None else list(self.arguments)
        return {k: self.arguments.get(k) for k in keys}

    def matches(self, call: ToolCall) -> bool:
        return call.name == self.name and all(
            call.arguments.get(k) == v for k, v in self.compared().items()
        )


class EnvAssertion(Strict):
    env_type: Requestor
    func_name: str
    arguments: dict[str, Any]
    assert_value: bool = True
    message: str | None = None


class EvaluationCriteria(Strict):
    actions: list[Action] | None = None
    env_assertions: list[EnvAssertion] | None = None
    communicate_info: list[str] | None = None
    nl_assertions: list[str] | None = None
    reward_basis: list[RewardBasis] = Field(
        default_factory=lambda: [RewardBasis.DB, RewardBasis.COMMUNICATE]
    )


class UserInstructions(Strict):
    domain: str
    reason_for_call: str
    known_info: str | None = None
    unknown_info: str | None = None
    task_instructions: str


class UserScenario(Strict):
    persona: str | None = None
    instructions: UserInstructions | str


class TaskSpec(Strict):
    """tau2-bench's `Task`, field for field, so it converts both ways losslessly."""

    id: str
    description: dict[str, Any] | None = None
    user_scenario: UserScenario
    ticket: str | None = None
    initial_state: dict[str, Any] | None = None
    evaluation_criteria: EvaluationCriteria | None = None


class Origin(StrEnum):
    SEED = "seed"  # a tau2 train-split task
    PROPOSED = "proposed"  # written by the Proposer for an error pattern
    MUTATED = "mutated"  # a seed task transformed toward a pattern
    SYNTHETIC = "synthetic"  # proposed without a target pattern (the paper's baseline)


class Provenance(Strict):
    origin: Origin
    split: Literal["train", "test"] | None = None
    parent_trajectory_ids: list[str] = Field(default_factory=list)
    pattern_id: str | None = None
    # The pattern's category when written for one: the probe's failures must show it for the
    # task to count as targeted (ValidationResult.targeted).
    target_category: FailureCategory | None = None
    proposal_id: str | None = None
    prompt_version: str | None = None
    generation: int = 0


CHECK_VALUE_CHARS = 4000  # a check's expected value, as JSON
MAX_CHECKS = 24


class StateCheck(Strict):
    """A per-instance checker (EigenData): one allow-listed predicate on the state after a
    run, the value at `path` in the agent's (or user's) database. Data, never code: a lookup
    and an equality, so a hostile task cannot make the checker run anything."""

    side: Literal["agent", "user"] = "agent"
    path: list[str] = Field(min_length=1, max_length=8)  # list positions as decimal strings
    op: Literal["equals", "absent"] = "equals"
    value: JsonValue = None  # what `equals` expects

    @field_validator("path")
    @classmethod
    def _short(cls, path: list[str]) -> list[str]:
        if any(not 0 < len(part) <= 200 for part in path):
            raise ValueError("each path segment must have 1 to 200 characters")
        return path

    @field_validator("value")
    @classmethod
    def _bounded(cls, value: JsonValue) -> JsonValue:
        if len(json.dumps(value)) > CHECK_VALUE_CHARS:
            raise ValueError(f"an expected value of over {CHECK_VALUE_CHARS} characters")
        return value

    def describe(self) -> str:
        where = ".".join(self.path)
        shown = json.dumps(self.value)
        return f"{where} absent" if self.op == "absent" else f"{where} == {shown[:80]}"


class Task(Message):
    """A task the Solver can be run on, in a named environment domain."""

    id: str
    domain: str
    spec: TaskSpec
    provenance: Provenance
    # What the state must show after a successful run, beside tau2's own criteria: derived
    # by validation from the gold run and proven to fail the no-op and near-miss runs.
    checks: list[StateCheck] = Field(default_factory=list, max_length=MAX_CHECKS)

    @property
    def actions(self) -> list[Action]:
        """The gold tool calls, the agent's and the user's, in order."""
        criteria = self.spec.evaluation_criteria
        return list(criteria.actions or []) if criteria else []

    @property
    def agent_actions(self) -> list[Action]:
        """The agent's gold tool calls (the user's own actions left out)."""
        return [a for a in self.actions if a.requestor == "assistant"]
