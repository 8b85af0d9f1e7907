from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from sentinel.agents.llm import Completion, OpenAIChatClient, RawToolCall, parse_arguments
from sentinel.agents.solver import RESPOND, Solver, strict_tools
from sentinel.config import RolloutSettings
from sentinel.envs.base import Environment
from sentinel.schemas import ChatMessage, ToolCall

pytestmark = pytest.mark.anyio
SETTINGS = RolloutSettings(max_tokens=96, temperature=1.2)
DEEP = '{"content": ' + "[" * 10_000 + "]" * 10_000 + "}"
SURROGATE = '{"content": "\\ud800"}'
OPENING = [
    ChatMessage(role="assistant", content="Hi! How can I help you today?"),
    ChatMessage(role="user", content="Please mark task_1 as completed, it is done."),
]


class Scripted:
    """A stand-in endpoint that returns fixed completions: only for error handling."""

    model = "scripted"

    def __init__(self, *completions: Completion) -> None:
        self.completions = list(completions)

    async def complete(self, messages: list[dict[str, Any]], **_: Any) -> Completion:
        return self.completions.pop(0)


async def test_real_turn_records_tokens_that_match_the_served_text(
    mock: Environment, llm: Callable[..., OpenAIChatClient], model_dir: Path
) -> None:
    solver = Solver(llm(), mock.policy, mock.tool_schemas, SETTINGS)
    turn = await solver.act(OPENING)
    assert turn.tokens is not None
    assert turn.tokens.message_index == len(OPENING)
    assert turn.tokens.temperature == 1.2  # the trainer scores the tokens at it
    assert len(turn.tokens.completion_token_ids) == len(turn.tokens.logprobs) > 0
    assert all(lp <= 0.0 for lp in turn.tokens.logprobs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.decode(turn.tokens.prompt_token_ids)
    assert "<policy>" in prompt
    assert "Please mark task_1 as completed" in prompt
    sampled = tokenizer.decode(turn.tokens.completion_token_ids, skip_special_tokens=True)
    if turn.malformed is None:  # a finished turn: the parsed call is what was sampled
        name = turn.message.tool_calls[0].name if turn.message.tool_calls else RESPOND
        assert f'"name": "{name}"' in sampled
        if turn.message.tool_calls:
            for value in turn.message.tool_calls[0].arguments.values():
                assert str(value) in sampled
        else:
            assert (turn.message.content or "") in sampled
    else:
        assert turn.message.error
        assert turn.message.content == sampled.strip() or sampled.startswith("<tool_call>")


async def test_history_renders_assistant_text_as_respond_calls(mock: Environment) -> None:
    solver = Solver(Scripted(), mock.policy, mock.tool_schemas, SETTINGS)
    call = ToolCall(id="c1", name="update_task_status", arguments={"task_id": "task_1"})
    rendered = solver.render([
        *OPENING,
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", content='{"status": "pending"}', tool_call_id="c1"),
    ])  # fmt: skip
    assert rendered[0]["role"] == "system"
    assert rendered[1]["tool_calls"][0]["function"]["name"] == RESPOND
    assert parse_arguments(rendered[1]["tool_calls"][0]["function"]["arguments"]) == {
        "content": "Hi! How can I help you today?"
    }
    assert rendered[3]["tool_calls"][0]["function"]["name"] == "update_task_status"
    assert rendered[4] == {"role": "tool", "tool_call_id": "c1", "content": '{"status": "pending"}'}


def test_tools_are_strict_and_strings_capped(mock: Environment) -> None:
    tools = strict_tools(mock.tool_schemas, 40)
    assert len(tools) == len(mock.tool_schemas) + 1 == 5  # and the respond tool
    assert all(t["function"]["strict"] for t in tools)
    update = tools[[t["function"]["name"] for t in tools].index("update_task_status")]
    assert update["function"]["parameters"]["properties"]["task_id"]["maxLength"] == 40
    assert "strict" not in mock.tool_schemas[0]["function"]  # the domain's own are untouched


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (Completion(content='<tool_call>\n{"name": "get_us', finish_reason="length"), "cut off"),
        (Completion(content="<tool_call>{oops</tool_call>", finish_reason="stop"), "no parseable"),
        (Completion(content="", finish_reason="stop"), "no parseable"),
        (
            Completion(tool_calls=[RawToolCall(id="1", name="rm_rf", arguments="{}")]),
            "unknown tool 'rm_rf'",
        ),
        (
            Completion(tool_calls=[RawToolCall(id="1", name="update_task_status", arguments="{x")]),
            "arguments are not JSON",
        ),
        (
            Completion(tool_calls=[RawToolCall(id="1", name=RESPOND, arguments='{"content": 3}')]),
            "needs a string 'content'",
        ),
        (
            Completion(tool_calls=[RawToolCall(id="1", name=RESPOND, arguments="[1]")]),
            "must be a JSON object",
        ),
        (  # issue 19: json.loads raised RecursionError here, which ended the whole group
            Completion(tool_calls=[RawToolCall(id="1", name=RESPOND, arguments=DEEP)]),
            "nested deeper than",
        ),
        (  # valid JSON, but a lone surrogate could not be stored with the trajectory
            Completion(tool_calls=[RawToolCall(id="1", name=RESPOND, arguments=SURROGATE)]),
            "arguments are not JSON",
        ),
        (Completion(content="x" * 1_000_000, finish_reason="stop"), "over the limit"),
    ],
)
async def test_malformed_output_becomes_a_reason_not_a_crash(
    mock: Environment, completion: Completion, reason: str
) -> None:
    solver = Solver(Scripted(completion), mock.policy, mock.tool_schemas, SETTINGS)
    turn = await solver.act(OPENING)
    assert turn.malformed is not None
    assert reason in turn.malformed
    assert turn.message.error
    assert turn.tokens is None  # the stand-in returns no token ids
    assert len(turn.message.model_dump_json()) < 200_000  # storable, and cut to a bound


async def test_plain_text_from_a_server_without_tool_choice_is_a_message(
    mock: Environment,
) -> None:
    text = Completion(content="Could you give me your email? ###STOP###", finish_reason="stop")
    turn = await Solver(Scripted(text), mock.policy, mock.tool_schemas, SETTINGS).act(OPENING)
    assert turn.malformed is None
    assert turn.stops
