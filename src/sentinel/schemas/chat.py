"""The chat turns tasks and trajectories share: tool calls and messages.

Its own module so `task` (gold actions match tool calls) and `trajectory` (a rollout
is a list of messages) both depend on it, not on each other.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sentinel.schemas.message import Strict

Requestor = Literal["assistant", "user"]


class ToolCall(Strict):
    id: str
    name: str
    arguments: dict[str, Any]
    requestor: Requestor = "assistant"


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    error: bool = False  # a tool result that is an error, or an agent turn that was malformed
