"""The user simulator's view and parsing, with and without tools of its own (no LLM)."""

from __future__ import annotations

from typing import Any

import pytest

from sentinel.agents.llm import Completion, MalformedOutput, RawToolCall
from sentinel.agents.user import UserSimulator, is_stop, parse_reply, user_tools
from sentinel.config import RolloutSettings
from sentinel.schemas import ChatMessage, ToolCall
from tests import factories

pytestmark = pytest.mark.anyio
SETTINGS = RolloutSettings()
PHONE = user_tools({"toggle_data": {"type": "object", "properties": {}}})


class Recorder:
    model = "recorder"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {}

    async def complete(self, messages: list[dict[str, Any]], **options: Any) -> Completion:
        self.options = options
        return Completion(content="Hello.")


HISTORY = [
    ChatMessage(role="assistant", content="Hi!"),
    ChatMessage(role="user", content="My data is off."),
    ChatMessage(role="assistant", tool_calls=[ToolCall(id="a1", name="get_line", arguments={})]),
    ChatMessage(role="tool", content="{secret}", tool_call_id="a1"),
    ChatMessage(role="assistant", content="Turn it on, please."),
    ChatMessage(
        role="user",
        tool_calls=[ToolCall(id="u1", name="toggle_data", arguments={}, requestor="user")],
    ),
    ChatMessage(role="tool", content="Mobile data: ON", tool_call_id="u1"),
]


def test_the_user_sees_its_own_tool_calls_and_results_never_the_agents() -> None:
    rendered = UserSimulator(Recorder(), SETTINGS, PHONE).render("scenario", HISTORY)
    assert rendered == [
        {"role": "system", "content": "scenario"},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "My data is off."},
        {"role": "user", "content": "Turn it on, please."},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "u1", "type": "function",
            "function": {"name": "toggle_data", "arguments": "{}"},
        }]},
        {"role": "tool", "tool_call_id": "u1", "content": "Mobile data: ON"},
    ]  # fmt: skip


async def test_tools_are_offered_only_where_the_user_has_some() -> None:
    plain, phone, task = Recorder(), Recorder(), factories.task()
    await UserSimulator(plain, SETTINGS).reply("scenario", HISTORY[:2], task)
    await UserSimulator(phone, SETTINGS, PHONE).reply("scenario", HISTORY[:2], task)
    assert "tools" not in plain.options
    assert phone.options["tools"] == PHONE


def test_a_reply_with_tool_calls_is_the_users_and_never_a_stop() -> None:
    call = RawToolCall(id="u2", name="toggle_data", arguments="{}")
    completion = Completion(content="###STOP###", tool_calls=[call])
    reply = parse_reply(completion, tools=True)
    assert [(c.name, c.requestor) for c in reply.tool_calls] == [("toggle_data", "user")]
    assert not is_stop(reply)
    assert parse_reply(completion).tool_calls == []  # no tools: text only, as before
    assert is_stop(parse_reply(completion))


@pytest.mark.parametrize("arguments", ["{oops", "[1, 2]", "[" * 100 + "]" * 100])
def test_user_arguments_that_are_not_an_object_are_malformed(arguments: str) -> None:
    completion = Completion(tool_calls=[RawToolCall(id="u", name="x", arguments=arguments)])
    with pytest.raises(MalformedOutput, match="user tool call"):
        parse_reply(completion, tools=True)
