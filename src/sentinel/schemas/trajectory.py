"""What one Solver rollout did, token by token, and how it was scored."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from sentinel.schemas.chat import ChatMessage, ToolCall
from sentinel.schemas.message import Message, Strict, new_id, utc_now

__all__ = [
    "ChatMessage",
    "RewardBreakdown",
    "SampledSpan",
    "Segment",
    "TerminationReason",
    "Timings",
    "ToolCall",
    "Trajectory",
    "TurnTokens",
]


def _check_forced(forced: list[int] | None, count: int) -> None:
    """Grammar-forced positions: increasing, inside the sampled tokens. None: not known (a
    record from before they were kept; the trainer then judges by logprob)."""
    if forced and (forced[0] < 0 or forced[-1] >= count or forced != sorted(set(forced))):
        raise ValueError(f"forced positions {forced[:8]} are not increasing within {count}")


class TurnTokens(Strict):
    """One sampled assistant turn, exactly as the server saw and produced it."""

    message_index: int  # the ChatMessage this turn produced
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each completion token, at `temperature`
    finish_reason: str | None = None
    temperature: float = 1.0  # sampled at: the trainer scores the tokens at it too
    forced: list[int] | None = None  # completion positions the grammar allowed alone

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if len(self.logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"{len(self.logprobs)} logprobs for {len(self.completion_token_ids)} tokens"
            )
        _check_forced(self.forced, len(self.logprobs))
        return self


class SampledSpan(Strict):
    """One agent turn inside a Segment: the tokens the policy sampled, at [start, end)."""

    message_index: int  # the ChatMessage this turn produced
    start: int = Field(ge=0)
    logprobs: list[float]  # behaviour logprob of each sampled token, at the segment's temperature
    finish_reason: str | None = None
    forced: list[int] | None = None  # span positions the grammar allowed alone
    grammar: int | None = None  # its index in the segment's `grammars`; None: sampled freely

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        _check_forced(self.forced, len(self.logprobs))
        return self

    @property
    def end(self) -> int:
        return self.start + len(self.logprobs)


class Grammar(Strict):
    """What a guided turn was sampled under (vLLM's structured outputs): a JSON schema, as
    the JSON text sent, or a regex. The trainer replays it to mask its logits as vLLM did."""

    kind: Literal["json", "regex"]
    spec: str = Field(max_length=1_000_000)
    # JSON without free whitespace (the server's serve.compact_json): a different grammar,
    # which forces the separators that free whitespace leaves open. Older records: False.
    compact: bool = False


class Segment(Strict):
    """Token-in/token-out: a stretch of a rollout as one sequence that only grew. Each turn's
    prompt was every token before its span; the tokens between spans are the junctions and
    the new messages (tool results, the user's reply), rendered on their own. A trajectory
    has one segment, or more where the history had to be rendered again (a split)."""

    token_ids: list[int]
    turns: list[SampledSpan]
    temperature: float = 1.0
    grammars: list[Grammar] = Field(default_factory=list)  # each once: spans name them

    @model_validator(mode="after")
    def _spans_inside(self) -> Self:
        end = 0
        for span in self.turns:
            if span.start < end or span.end > len(self.token_ids) or span.start == span.end:
                raise ValueError(
                    f"turn at [{span.start}, {span.end}) overlaps, is empty or lies outside "
                    f"{len(self.token_ids)} tokens"
                )
            if span.grammar is not None and not 0 <= span.grammar < len(self.grammars):
                raise ValueError(f"turn at {span.start} names grammar {span.grammar}, not kept")
            end = span.end
        return self


class TerminationReason(StrEnum):
    """tau2-bench's reasons (same values), plus three of SENTINEL's own."""

    AGENT_STOP = "agent_stop"
    USER_STOP = "user_stop"
    MAX_STEPS = "max_steps"
    TOO_MANY_ERRORS = "too_many_errors"
    AGENT_ERROR = "agent_error"
    USER_ERROR = "user_error"
    CONTEXT_LENGTH = "context_length"  # the conversation outgrew the model's context
    INFRA_ERROR = "infra_error"  # the server or environment failed, not the agent
    TOOL_TIMEOUT = "tool_timeout"  # a tool call the agent made ran past its limits


class RewardBreakdown(Strict):
    reward: float
    components: dict[str, float] = Field(default_factory=dict)  # RewardBasis name -> score
    db_match: bool | None = None
    missing_communication: list[str] = Field(default_factory=list)
    partial: float = 0.0  # share of gold actions done: the optional shaped reward's signal
    checks: float | None = None  # share of the task's own checks that hold; None: it has none
    info: dict[str, Any] = Field(default_factory=dict)


class Timings(Strict):
    started_at: datetime = Field(default_factory=utc_now)
    finished_at: datetime | None = None
    llm_s: float = 0.0
    user_s: float = 0.0
    env_s: float = 0.0


class Trajectory(Message):
    """`tokens` (token-in/token-out) carries the rollout's tokens once; `turns` is the older
    record, each turn's whole prompt again (kept readable; the trainer takes either)."""

    schema_version: ClassVar[int] = 2  # 2: tokens

    id: str = Field(default_factory=new_id)
    task_id: str
    domain: str
    group_id: str | None = None
    policy_version: int
    policy_model: str
    messages: list[ChatMessage]
    turns: list[TurnTokens] = Field(default_factory=list)
    tokens: list[Segment] = Field(default_factory=list)
    termination: TerminationReason
    reward: RewardBreakdown | None = None
    malformed_turns: int = 0
    tool_errors: int = 0
    timings: Timings = Field(default_factory=Timings)

    def without_tokens(self) -> Trajectory:
        """The conversation alone, for readers of messages (the Controller): the tokens travel
        once, in the rollout group the trainer reads."""
        return self.model_copy(update={"turns": [], "tokens": []})

    @property
    def splits(self) -> int:
        """Where the history had to be rendered again, so the row split (token-in/token-out)."""
        return max(0, len(self.tokens) - 1)

    @property
    def succeeded(self) -> bool:
        return self.reward is not None and abs(self.reward.reward - 1.0) < 1e-6
