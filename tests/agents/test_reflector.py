"""The Reflector: experience from feedback (never the gold), a step no later than the mistake.

Its real-server path runs in tests/agents/test_explorer.py, inside the budgeted exploration."""

from __future__ import annotations

from typing import Any

import pytest

from sentinel.agents.llm import Completion
from sentinel.agents.reflector import Reflector, allowed_steps, feedback
from sentinel.config import LeafeSettings
from sentinel.envs.base import Environment
from sentinel.schemas import ChatMessage, ToolCall
from tests import factories

pytestmark = pytest.mark.anyio


class Garbage:
    """An endpoint whose JSON never parses: the error path, not a model."""

    model = "garbage"

    async def complete(self, messages: Any, **kwargs: Any) -> Completion:
        return Completion(content='{"experience": 7', finish_reason="stop")


def test_the_step_to_redo_is_never_after_the_first_wrong_one() -> None:
    assert allowed_steps([2, 4, 6], 4) == [2, 4]
    assert allowed_steps([2, 4, 6], 5) == [2, 4]
    assert allowed_steps([2, 4, 6], None) == [2, 4, 6]
    assert allowed_steps([2, 4, 6], 1) == [2]  # the mistake came before any agent turn


def test_feedback_reports_what_the_environment_said_and_never_the_gold() -> None:
    task, trajectory = factories.task(), factories.trajectory(reward=0.0)
    lines = feedback(trajectory)
    assert any("get_order_details failed" in line and "order not found" in line for line in lines)
    assert any("Ran out of turns" in line for line in lines)
    assert any("database" in line for line in lines)
    gold = {str(v) for a in task.actions for v in a.arguments.values()}
    assert not any(value in line for value in gold for line in lines)


async def test_a_model_that_answers_garbage_leaves_the_feedback_and_the_signals_step(
    retail: Environment,
) -> None:
    task, trajectory = factories.task(), factories.trajectory(reward=0.0)
    reflection = await Reflector(retail, LeafeSettings(), Garbage()).reflect(task, trajectory)
    assert reflection.source == "feedback"
    assert reflection.backtrack_step == 2
    assert "order not found" in reflection.experience


def test_feedback_leaves_out_the_users_own_tool_errors() -> None:
    """telecom's user calls phone tools of their own; their failures are not the agent's."""
    phone = ToolCall(id="u1", name="toggle_airplane_mode", arguments={}, requestor="user")
    lookup = ToolCall(id="a1", name="get_customer_by_phone", arguments={"phone_number": "x"})
    messages = [
        ChatMessage(role="user", content="My phone has no service.", tool_calls=[phone]),
        ChatMessage(role="tool", content="Error: no such setting", tool_call_id="u1", error=True),
        ChatMessage(role="assistant", tool_calls=[lookup]),
        ChatMessage(role="tool", content="Error: customer not found", tool_call_id="a1",
                    error=True),
    ]  # fmt: skip
    trajectory = factories.trajectory().model_copy(update={"messages": messages})
    lines = feedback(trajectory)
    assert any("get_customer_by_phone failed" in line for line in lines)
    assert not any("airplane" in line or "no such setting" in line for line in lines)
