"""The Solver: the policy being trained, in one of two action formats (`rollout.action_format`).

`guided` (the CPU profile): every turn is a tool call, enforced by the server's guided
decoding (`tool_choice=required` with strict schemas, strings capped); talking to the user is
the `respond` pseudo-tool. A 135M model almost never calls tools on its own, and this keeps
every finished turn parseable while the sampled tokens stay exactly what the trainer sees.

`tau2` (the GPU profiles): what tau2-bench's own agent (`tau2.agent.llm_agent.LLMAgent`)
does, so scores compare with tau2-bench's: its system prompt, the environment's tool schemas
as they are, `tool_choice=auto` (each turn the model talks, calls tools, or both, which tau2
runs as a tool call whose text the user never sees), no caps on strings, no per-turn token
budget (tau2 sets none: the server's context bounds a turn), and the agent's ###STOP### is
just text (tau2's LLMAgent never ends a conversation; the user does).

Whatever still goes wrong (truncation, an unknown tool in `guided`, arguments that are not a
JSON object, an empty turn, an answer too long or too deep to parse) becomes an error
observation for the agent, never a crash.
"""

from __future__ import annotations

import copy
import json
import uuid
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
from sentinel.agents.parsing import salvage_cut_call
from sentinel.config import RolloutSettings
from sentinel.schemas import ChatMessage, ToolCall, TurnTokens

RESPOND = "respond"
STOP_TOKEN = "###STOP###"

# tau2-bench's AGENT_INSTRUCTION, word for word (tests/agents/test_action_formats.py checks).
TAU2_INSTRUCTION = """
You are a customer service agent that helps the user according to the <policy> provided below.
In each turn you can either:
- Send a message to the user.
- Make a tool call.
You cannot do both at the same time.

Try to be helpful and always follow the policy. Always make sure you generate valid JSON only.
""".strip()
# The same, plus how to talk under tool_choice=required.
INSTRUCTION = TAU2_INSTRUCTION.replace(
    "- Send a message to the user.", "- Send a message to the user, by calling the `respond` tool."
)

# tau2-bench's SYSTEM_PROMPT.
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


@dataclass(frozen=True)
class Request:
    """What every agent turn asks the server for: the sampling options the formats differ in."""

    tools: list[dict[str, Any]]
    tool_choice: str
    max_tokens: int | None  # None: up to the server's context, as tau2's agent
    parallel_tool_calls: bool


def request_for(schemas: list[dict[str, Any]], settings: RolloutSettings) -> Request:
    """The format's request: guided decoding of one strict call, or tau2's plain `auto`."""
    if settings.action_format == "tau2":
        return Request(copy.deepcopy(schemas), "auto", None, parallel_tool_calls=True)
    tools = strict_tools(schemas, settings.max_string_length)
    return Request(tools, "required", settings.max_tokens, parallel_tool_calls=False)


@dataclass
class AgentTurn:
    message: (
        ChatMessage  # assistant text, tool calls (tau2: maybe with text), or the malformed output
    )
    tokens: TurnTokens | None
    malformed: str | None = None  # why the turn could not be used
    can_stop: bool = True  # the agent's ###STOP### ends the rollout (guided; tau2's agent cannot)

    @property
    def stops(self) -> bool:
        return (
            self.can_stop
            and self.malformed is None
            and not self.message.tool_calls
            and STOP_TOKEN in (self.message.content or "")
        )


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
        self.guided = settings.action_format == "guided"
        instruction = INSTRUCTION if self.guided else TAU2_INSTRUCTION
        self.system_prompt = SYSTEM_PROMPT.format(instruction=instruction, policy=policy)
        self.request = request_for(tool_schemas, settings)
        self.tools = self.request.tools
        self.tool_names = frozenset(t["function"]["name"] for t in self.tools)

    async def act(self, history: list[ChatMessage], experience: str | None = None) -> AgentTurn:
        """The next turn; with an `experience` (LEAFE's branches) in the system prompt."""
        request = self.request
        completion = await self.client.complete(
            self.render(history, experience),
            max_tokens=request.max_tokens,
            temperature=self.settings.temperature,
            tools=request.tools,
            tool_choice=request.tool_choice,
            parallel_tool_calls=request.parallel_tool_calls,
            record_tokens=True,
        )
        tokens = _tokens(completion, len(history), self.settings.temperature)
        message, problem = self.interpret(completion)
        return AgentTurn(message=message, tokens=tokens, malformed=problem, can_stop=self.guided)

    def interpret(self, completion: Completion) -> tuple[ChatMessage, str | None]:
        """The turn a completion stands for, and why it is malformed (None: it is usable)."""
        completion = salvage_cut_call(completion, f"cut-{uuid.uuid4().hex[:12]}")
        return self._guided(completion) if self.guided else self._tau2(completion)

    def _guided(self, completion: Completion) -> tuple[ChatMessage, str | None]:
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

    def _tau2(self, completion: Completion) -> tuple[ChatMessage, str | None]:
        """tau2's reading: the text and every tool call as they came. An unknown tool goes to
        the environment, which answers with an error (as in tau2); only what tau2 could not
        take at all (arguments that are not a JSON object, an empty turn) is malformed."""
        raw = completion.content or ""
        try:
            check_text(raw, "the message")
        except ValueError as error:
            return _malformed(raw, str(error))
        calls: list[ToolCall] = []
        for call in completion.tool_calls:
            try:
                check_text(call.name, "the tool name")
                arguments = parse_arguments(call.arguments)
            except ValueError as error:
                return _malformed(raw or call.arguments, f"{clip(call.name, 80)}: {error}")
            calls.append(ToolCall(id=call.id, name=call.name, arguments=arguments))
        if not calls and not raw.strip():
            cut = completion.finish_reason == "length"
            return _malformed(raw, "output cut off" if cut else "empty turn: no text, no tool call")
        return ChatMessage(role="assistant", content=completion.content, tool_calls=calls), None

    def render(self, history: list[ChatMessage], experience: str | None = None) -> Messages:
        """The conversation as the server sees it: in `guided`, assistant text as the `respond`
        calls that were sampled; in `tau2`, as tau2's agent sends it (text and calls as is)."""
        system = self.system_prompt + (EXPERIENCE.format(experience) if experience else "")
        rendered: Messages = [{"role": "system", "content": system}]
        users = {c.id for m in history if m.role == "user" for c in m.tool_calls}
        for index, m in enumerate(history):
            if m.tool_call_id in users or (m.role == "user" and m.tool_calls):
                continue  # the user's own tools (a phone): tau2's agent never sees them
            if m.role == "assistant":
                rendered.append(self._assistant(m, index))
            elif m.role == "tool":
                rendered.append(
                    {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""}
                )
            else:
                rendered.append({"role": m.role, "content": m.content or ""})
        return rendered

    def _assistant(self, m: ChatMessage, index: int) -> dict[str, Any]:
        if m.error:
            return {"role": "assistant", "content": m.content or ""}
        calls = m.tool_calls
        if self.guided:
            respond = ToolCall(
                id=f"respond-{index}", name=RESPOND, arguments={"content": m.content}
            )
            calls = calls or [respond]
        message: dict[str, Any] = {"role": "assistant", "content": "" if self.guided else m.content}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                for c in calls
            ]  # fmt: skip
        return message

    def error_observation(self, reason: str) -> ChatMessage:
        """What the agent is told after a malformed turn, in its format's terms."""
        return error_observation(reason, GUIDED_HINT if self.guided else TAU2_HINT)


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
        forced=completion.forced,
    )


GUIDED_HINT = "Call exactly one tool."
TAU2_HINT = "Send a message to the user or make a tool call."


def error_observation(reason: str, hint: str = GUIDED_HINT) -> ChatMessage:
    """What the agent is told after a malformed turn; the user simulator never sees it."""
    return ChatMessage(role="user", content=f"[invalid action: {reason}] {hint}", error=True)
