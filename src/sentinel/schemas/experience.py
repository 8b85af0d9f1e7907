"""Supervised examples and LEAFE's reflective experience: what the SFT mode learns from."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from sentinel.schemas.message import Strict, new_id


class SFTExample(Strict):
    """A conversation to imitate, in the OpenAI chat format exactly as the server renders it
    (system prompt first, tool calls as `tool_calls`); loss falls on the `trained` messages'
    tokens only, each of which is an assistant message."""

    id: str = Field(default_factory=new_id)
    source: Literal["leafe", "user_model"]
    task_id: str
    messages: list[dict[str, Any]] = Field(min_length=2)
    tools: list[dict[str, Any]] = Field(default_factory=list)
    trained: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _trained_are_assistant_turns(self) -> Self:
        for index in self.trained:
            if not 0 <= index < len(self.messages):
                raise ValueError(
                    f"trained index {index} is outside the {len(self.messages)} messages"
                )
            if self.messages[index].get("role") != "assistant":
                raise ValueError(f"trained message {index} is not an assistant message")
        return self


class Reflection(Strict):
    """The Reflector's reading of a failure: an experience to act on, and where to go back."""

    experience: str  # short and actionable; shown to the policy while it explores a branch
    backtrack_step: int  # index of the agent message to write again
    source: Literal["llm", "feedback"]  # "feedback": the LLM failed; built from the env alone


class Correction(Strict):
    """A failure recovered by a branch: the original prefix plus the branch that did better,
    as an SFT example with the experience removed from its context."""

    trajectory_id: str  # the failed original
    backtrack_step: int
    experience: str
    reward: float  # the branch's tau2 reward (the original's was lower)
    partial: float  # the branch's share of gold actions done
    example: SFTExample


class Exploration(Strict):
    """What LEAFE did with one rollout group's failures, within its budget."""

    failures: int = 0  # failed trajectories in the group
    reflected: int = 0
    branches: int = 0
    interactions: int = 0  # agent turns spent in branches
    recovered: int = 0  # failures with a branch that tau2 scores as a success
    corrections: list[Correction] = Field(default_factory=list)
    cut_short: str | None = None  # why exploration stopped before its budget was spent
