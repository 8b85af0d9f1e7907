"""The one parser of what the policy sampled: reasoning, tool calls and text, from raw text.

Token-in/token-out sampling (`/v1/completions` on token ids) gets raw text back, so the
server's tool-call and reasoning parsers never run; this module is their only counterpart,
for every action format:

- reasoning: `<think>...</think>` at the start (or text before a lone `</think>`, for
  templates whose generation prompt opens the block, as Qwen3-Thinking's does);
- guided: the JSON array vLLM's `tool_choice="required"` grammar produces,
  `[{"name": ..., "parameters": {...}}]`;
- Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (our ChatML
  template's and Qwen's format);
- anything else is the assistant's text (with Hermes calls: the text before them).

Hostile output is bounded first (`check_text`); a call that does not parse is left for the
Solver to report as a malformed turn, never an exception.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json

from sentinel.agents.llm import Completion, RawToolCall, check_json, check_text

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, the rest); reasoning is None when the text has none. An unclosed block
    (cut off at max_tokens) is all reasoning."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
        inside, closed, rest = body.partition(THINK_CLOSE)
        return inside.strip(), rest.lstrip() if closed else ""
    before, closed, rest = text.partition(THINK_CLOSE)
    if closed and THINK_OPEN not in before:
        return before.strip(), rest.lstrip()
    return None, text


def parse_completion(text: str, finish_reason: str | None, call_prefix: str) -> Completion:
    """The sampled `text` as a Completion: its reasoning, its tool calls (ids
    `{call_prefix}-{n}`) and its text. Raw text that does not parse stays `content`."""
    try:
        check_text(text, "the completion")
    except ValueError:
        return Completion(content=text[:200], finish_reason=finish_reason)
    reasoning, rest = split_reasoning(text)
    content: str | None = None
    calls = _guided_calls(rest, call_prefix)
    if calls is None:
        calls = _hermes_calls(rest, call_prefix)
        content = rest
        if calls is None:  # a <tool_call> that does not parse: the raw text, for the error
            calls = []
        elif calls:  # the text before the calls, as vLLM's Hermes parser gives it
            content = rest.partition(CALL_OPEN)[0].strip() or None
    return Completion(
        content=content, tool_calls=calls, finish_reason=finish_reason, reasoning=reasoning
    )


def salvage_cut_call(completion: Completion, call_id: str) -> Completion:
    """A completion cut at max_tokens after its one Hermes call's JSON closed, but before or
    inside the closing tag, as that call: the model's choice is whole, only the tag is
    missing. Anything else (two calls, JSON left open, text after it) comes back as it was."""
    text = completion.content
    if completion.tool_calls or completion.finish_reason != "length" or not text:
        return completion
    before, opened, after = text.partition(CALL_OPEN)
    body = after.strip()
    if not opened or CALL_OPEN in body:
        return completion
    cut = next(k for k in range(len(CALL_CLOSE) - 1, -1, -1) if body.endswith(CALL_CLOSE[:k]))
    try:
        value = from_json(check_json(body[: len(body) - cut].strip(), "a tool call"),
                          allow_inf_nan=False)  # fmt: skip
    except ValueError:
        return completion
    call = _call(value, "arguments", call_id)
    if call is None:
        return completion
    return completion.model_copy(update={"content": before.strip() or None, "tool_calls": [call]})


def _guided_calls(text: str, prefix: str) -> list[RawToolCall] | None:
    """The calls of a guided answer (a JSON array of {name, parameters}); None if it is not one."""
    stripped = text.strip()
    if not stripped.startswith("["):
        return None
    try:
        value = from_json(check_json(stripped, "the tool calls"), allow_inf_nan=False)
    except ValueError:
        return None
    if not isinstance(value, list) or not value:
        return None
    calls = []
    for index, item in enumerate(value):
        call = _call(item, "parameters", f"{prefix}-{index}")
        if call is None:
            return None
        calls.append(call)
    return calls


def _hermes_calls(text: str, prefix: str) -> list[RawToolCall] | None:
    """The `<tool_call>` blocks; [] if there are none, None if one does not parse."""
    calls: list[RawToolCall] = []
    rest = text
    while CALL_OPEN in rest:
        _, _, after = rest.partition(CALL_OPEN)
        body, closed, rest = after.partition(CALL_CLOSE)
        if not closed:
            return None
        try:
            value = from_json(check_json(body.strip(), "a tool call"), allow_inf_nan=False)
        except ValueError:
            return None
        call = _call(value, "arguments", f"{prefix}-{len(calls)}")
        if call is None:
            return None
        calls.append(call)
    return calls


def _call(item: Any, key: str, call_id: str) -> RawToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get(key, {})
    return RawToolCall(id=call_id, name=item["name"], arguments=json.dumps(arguments))
