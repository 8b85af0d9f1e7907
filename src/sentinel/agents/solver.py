"""The Solver: the policy being trained, one tool call per turn.

Every turn is a tool call, enforced by the server's guided decoding (`tool_choice=required`
with strict schemas); talking to the user is the `respond` pseudo-tool. A 135M model almost
never calls tools on its own, and this keeps every finished turn parseable while the sampled
tokens stay exactly what the trainer sees. Whatever still goes wrong (truncation, an unknown
tool, arguments that are not JSON, an answer too long or too deep to parse) becomes an error
observation for the agent, never a crash.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from sentinel.agents.llm import (
    ChatClient,
    Completion,
    Messages,
    check_text,
    clip,
    parse_arguments,
    storable,
)
from sentinel.config import RolloutSettings
from sentinel.schemas import ChatMessage, ToolCall, TurnTokens

RESPOND = "respond"
STOP_TOKEN = "###STOP###"

# tau2-bench's agent instruction, plus how to talk under tool_choice=required.
INSTRUCTION = """
You are a customer service agent that helps the user according to the <policy> provided below.
In each turn you can either:
- Send a message to the user, by calling the `respond` tool.
- Make a tool call.
You cannot do both at the same time.

Try to be helpful and always follow the policy. Always make sure you generate valid JSON only.
""".strip()

SYSTEM_PROMPT = "<instructions>\n{instruction}\n</instructions>\n<policy>\n{policy}\n</policy>"
# LEAFE: what an earlier attempt taught, last so the server's prefix cache still holds.
EXPERIENCE = (
    "\n<experience>\nAn earlier attempt at this task failed. Learn from it:\n{}\n</experience>"
)

RESPOND_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": RESPOND,
        "description": "Send a message to the user.",
        "parameters": {
            "type": "object",
            "properties": {"content": {"type": "string", "description": "The message."}},
            "required": ["content"],
        },
    },
}


@dataclass
class AgentTurn:
    message: ChatMessage  # assistant text, an assistant tool call, or the malformed output
    tokens: TurnTokens | None
    malformed: str | None = None  # why the turn could not be used

    @property
    def stops(self) -> bool:
        return self.malformed is None and STOP_TOKEN in (self.message.content or "")


def strict_tools(schemas: list[dict[str, Any]], max_string_length: int) -> list[dict[str, Any]]:
    """Tool schemas that guided decoding enforces: strict, strings capped (tiny models ramble)."""
    tools = copy.deepcopy([*schemas, RESPOND_TOOL])

    def cap(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "enum" not in node:
                node.setdefault("maxLength", max_string_length)
            for value in node.values():
                cap(value)
        elif isinstance(node, list):
            for value in node:
                cap(value)

    for tool in tools:
        tool["function"]["strict"] = True
        cap(tool["function"]["parameters"])
    return tools


class Solver:
    def __init__(
        self,
        client: ChatClient,
        policy: str,
        tool_schemas: list[dict[str, Any]],
        settings: RolloutSettings,
    ) -> None:
        self.client = client
        self.settings = settings
        self.system_prompt = SYSTEM_PROMPT.format(instruction=INSTRUCTION, policy=policy)
        self.tools = strict_tools(tool_schemas, settings.max_string_length)
        self.tool_names = frozenset(t["function"]["name"] for t in self.tools)

    async def act(self, history: list[ChatMessage], experience: str | None = None) -> AgentTurn:
        """The next turn; with an `experience` (LEAFE's branches) in the system prompt."""
        completion = await self.client.complete(
            self.render(history, experience),
            max_tokens=self.settings.max_tokens,
            temperature=self.settings.temperature,
            tools=self.tools,
            tool_choice="required",
            record_tokens=True,
        )
        tokens = _tokens(completion, len(history), self.settings.temperature)
        message, problem = self.interpret(completion)
        return AgentTurn(message=message, tokens=tokens, malformed=problem)

    def interpret(self, completion: Completion) -> tuple[ChatMessage, str | None]:
        """The turn a completion stands for, and why it is malformed (None: it is usable)."""
        raw = completion.content or ""
        if not completion.tool_calls:
            if completion.finish_reason == "length":
                return _malformed(raw, "output cut off at max_tokens before a tool call closed")
            if "<tool_call>" in raw or not raw.strip():
                return _malformed(raw, "no parseable tool call")
            try:  # a server without tool_choice: the text is the message
                return ChatMessage(role="assistant", content=check_text(raw, "the message")), None
            except ValueError as error:
                return _malformed(raw, str(error))
        call = completion.tool_calls[0]
        if call.name not in self.tool_names:
            return _malformed(raw or call.arguments, f"unknown tool {clip(call.name, 80)!r}")
        try:
            arguments = parse_arguments(call.arguments)
        except ValueError as error:
            return _malformed(call.arguments, f"{call.name}: {error}")
        if call.name == RESPOND:
            content = arguments.get("content")
            if not isinstance(content, str):
                return _malformed(call.arguments, "respond needs a string 'content'")
            return ChatMessage(role="assistant", content=content), None
        tool_call = ToolCall(id=call.id, name=call.name, arguments=arguments)
        return ChatMessage(role="assistant", tool_calls=[tool_call]), None

    def render(self, history: list[ChatMessage], experience: str | None = None) -> Messages:
        """The conversation as the server sees it: assistant text as `respond` calls."""
        system = self.system_prompt + (EXPERIENCE.format(experience) if experience else "")
        rendered: Messages = [{"role": "system", "content": system}]
        users = {c.id for m in history if m.role == "user" for c in m.tool_calls}
        for index, m in enumerate(history):
            if m.tool_call_id in users or (m.role == "user" and m.tool_calls):
                continue  # the user's own tools (a phone): tau2's agent never sees them
            if m.role == "assistant" and m.error:
                rendered.append({"role": "assistant", "content": m.content or ""})
            elif m.role == "assistant":
                calls = m.tool_calls or [
                    ToolCall(id=f"respond-{index}", name=RESPOND, arguments={"content": m.content})
                ]
                rendered.append({"role": "assistant", "content": "", "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                    for c in calls
                ]})  # fmt: skip
            elif m.role == "tool":
                rendered.append(
                    {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""}
                )
            else:
                rendered.append({"role": m.role, "content": m.content or ""})
        return rendered


def _malformed(raw: str, reason: str) -> tuple[ChatMessage, str]:
    """The output kept as the turn's text (shown back to the agent), cut to a storable size."""
    return ChatMessage(role="assistant", content=storable(raw), error=True), clip(reason)


def _tokens(completion: Completion, message_index: int, temperature: float) -> TurnTokens | None:
    ids, logprobs = completion.completion_token_ids, completion.logprobs
    if not ids or len(ids) != len(logprobs):
        return None  # the server does not return token ids and logprobs (not vLLM)
    return TurnTokens(
        message_index=message_index,
        prompt_token_ids=completion.prompt_token_ids,
        completion_token_ids=completion.completion_token_ids,
        logprobs=completion.logprobs,
        finish_reason=completion.finish_reason,
        temperature=temperature,
    )


def error_observation(reason: str) -> ChatMessage:
    """What the agent is told after a malformed turn; the user simulator never sees it."""
    return ChatMessage(
        role="user", content=f"[invalid action: {reason}] Call exactly one tool.", error=True
    )
