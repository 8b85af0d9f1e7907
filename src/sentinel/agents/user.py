"""The user simulator: an LLM playing a task's user_scenario, by tau2-bench's conventions.

It gets tau2's own system prompt (simulation guidelines plus the scenario) and sees the
conversation with roles flipped: the agent's messages are its "user" turns. It never sees the
agent's tool calls, their results or the agent's error observations. It ends the conversation
with tau2's tokens: ###STOP###, ###TRANSFER### or ###OUT-OF-SCOPE###. A reply too long to be a
turn, or not valid Unicode, is MalformedOutput: the rollout ends as an infra error (the
simulator failed, not the agent).

Where the environment gives the user tools of its own (a phone: `Environment.user_tools`), the
simulator is offered them as tau2's UserSimulator is: a reply may be tool calls (requestor
"user"), which the rollout steps on the same episode and whose results come back to the
simulator alone, until it says something to the agent. Arguments that are not a JSON object
make the reply MalformedOutput too; an unknown tool or bad arguments are the environment's
error results, as in tau2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from sentinel.agents.llm import (
    ChatClient,
    Completion,
    MalformedOutput,
    Messages,
    check_text,
    parse_arguments,
)
from sentinel.config import RolloutSettings
from sentinel.schemas import ChatMessage, Task, ToolCall

STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")


def is_stop(message: ChatMessage) -> bool:
    """tau2's rule: a reply that calls tools never ends the conversation."""
    return not message.tool_calls and any(token in (message.content or "") for token in STOP_TOKENS)


def user_tools(schemas: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The user's tools (name -> parameters schema, `Environment.user_tool_schemas`) in
    OpenAI's function-calling format."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": name.replace("_", " ").capitalize() + ".",
                "parameters": parameters or {"type": "object", "properties": {}},
            },
        }
        for name, parameters in schemas.items()
    ]


class User(Protocol):
    """Who answers the agent in a rollout: the LLM simulator, or agents.scripted_user."""

    client: Any  # the endpoint closed with the rollout runner; None without one

    async def reply(
        self, system_prompt: str, history: list[ChatMessage], task: Task
    ) -> ChatMessage: ...


class UserSimulator:
    def __init__(
        self,
        client: ChatClient,
        settings: RolloutSettings,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.tools = tools or []  # the user's own tools, OpenAI format; [] for most domains

    async def reply(
        self, system_prompt: str, history: list[ChatMessage], task: Task
    ) -> ChatMessage:
        """The user's next message, given the task's prompt (tau2's guidelines + scenario,
        which is all it knows of the `task`)."""
        options: dict[str, Any] = {"tools": self.tools} if self.tools else {}
        completion = await self.client.complete(
            self.render(system_prompt, history),
            max_tokens=self.settings.user_max_tokens,
            temperature=self.settings.user_temperature,
            **options,
        )
        return parse_reply(completion, tools=bool(self.tools))

    def render(self, system_prompt: str, history: list[ChatMessage]) -> Messages:
        """tau2's `flip_roles`: the user's own tool calls and their results stay, the agent's
        go."""
        rendered: Messages = [{"role": "system", "content": system_prompt}]
        own = {c.id for m in history if m.role == "user" for c in m.tool_calls}
        for m in history:
            if m.role == "tool" and m.tool_call_id in own:
                rendered.append(
                    {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""}
                )
            elif m.role == "user" and m.tool_calls and not m.error:
                rendered.append({"role": "assistant", "content": m.content or "", "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                    for c in m.tool_calls
                ]})  # fmt: skip
            elif m.error or m.tool_calls or m.role in ("tool", "system"):
                continue
            else:
                role = "user" if m.role == "assistant" else "assistant"
                rendered.append({"role": role, "content": m.content or ""})
        return rendered


def parse_reply(completion: Completion, *, tools: bool = False) -> ChatMessage:
    """The simulator's completion as the user's message; MalformedOutput says why it is not.

    With `tools`, its tool calls come along (requestor "user"), as tau2 flips them."""
    raw = completion.content or ""
    try:
        content = check_text(raw, "the user's reply").strip()
    except ValueError as error:
        raise MalformedOutput("user reply", str(error), raw, retry=False) from None
    if not (tools and completion.tool_calls):
        return ChatMessage(role="user", content=content)
    calls: list[ToolCall] = []
    for call in completion.tool_calls:
        try:
            arguments = parse_arguments(call.arguments)
        except ValueError as error:
            raise MalformedOutput(
                "user tool call", f"{call.name[:80]}: {error}", call.arguments, retry=False
            ) from None
        calls.append(ToolCall(id=call.id, name=call.name, arguments=arguments, requestor="user"))
    return ChatMessage(role="user", content=content or None, tool_calls=calls)
