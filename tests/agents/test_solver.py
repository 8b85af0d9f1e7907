from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from sentinel.agents.llm import Completion, OpenAIChatClient, RawToolCall, parse_arguments
from sentinel.agents.solver import (
    GUIDED_HINT,
    RESPOND,
    TAU2_HINT,
    Solver,
    request_for,
    strict_tools,
)
from sentinel.config import RolloutSettings
from sentinel.envs.base import Environment
from sentinel.schemas import ChatMessage, ToolCall

pytestmark = pytest.mark.anyio
SETTINGS = RolloutSettings(action_format="guided", max_tokens=96, temperature=1.2)
TAU2 = RolloutSettings(action_format="tau2", max_tokens=96, temperature=1.2)
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
    names = [t["function"]["name"] for t in tools]
    assert names == [*(t["function"]["name"] for t in mock.tool_schemas), RESPOND]
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


def test_each_format_asks_for_its_own_turn(mock: Environment) -> None:
    guided, tau2 = request_for(mock.tool_schemas, SETTINGS), request_for(mock.tool_schemas, TAU2)
    assert (guided.tool_choice, guided.max_tokens, guided.parallel_tool_calls) == (
        "required",
        96,
        False,
    )
    assert guided.tools == strict_tools(mock.tool_schemas, SETTINGS.max_string_length)
    assert (tau2.tool_choice, tau2.max_tokens, tau2.parallel_tool_calls) == ("auto", None, True)
    assert tau2.tools == mock.tool_schemas  # tau2's schemas as they are: no respond, strict, caps
    assert "respond" not in Solver(Scripted(), mock.policy, mock.tool_schemas, TAU2).system_prompt


def _call(call_id: str, name: str, arguments: str) -> RawToolCall:
    return RawToolCall(id=call_id, name=name, arguments=arguments)


async def test_tau2_turns_are_text_calls_or_both_as_sampled(mock: Environment) -> None:
    long = "x" * 200 + " ###STOP###"
    both = Completion(content="Let me check.", tool_calls=[
        _call("c1", "get_users", "{}"), _call("c2", "not_a_tool", '{"a": "' + "y" * 100 + '"}'),
    ])  # fmt: skip
    solver = Solver(Scripted(Completion(content=long), both), mock.policy, mock.tool_schemas, TAU2)
    talk = await solver.act(OPENING)
    assert talk.malformed is None
    assert talk.message.content == long  # not cut at max_string_length
    assert not talk.stops  # tau2's agent never ends the conversation: the user does
    acting = await solver.act(OPENING)
    assert acting.malformed is None
    assert acting.message.content == "Let me check."
    names = [c.name for c in acting.message.tool_calls]
    assert names == ["get_users", "not_a_tool"]  # unknown: the environment answers with an error
    assert acting.message.tool_calls[1].arguments == {"a": "y" * 100}


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (Completion(content="", finish_reason="stop"), "empty turn"),
        (Completion(content=" ", finish_reason="length"), "cut off"),
        (Completion(tool_calls=[_call("1", "get_users", "{x")]), "arguments are not JSON"),
        (Completion(tool_calls=[_call("1", "get_users", DEEP)]), "nested deeper than"),
        (Completion(content="x" * 1_000_000), "over the limit"),
    ],
)
async def test_tau2_turns_tau2_could_not_take_are_malformed(
    mock: Environment, completion: Completion, reason: str
) -> None:
    solver = Solver(Scripted(completion), mock.policy, mock.tool_schemas, TAU2)
    turn = await solver.act(OPENING)
    assert turn.malformed is not None
    assert reason in turn.malformed
    observation = solver.error_observation(turn.malformed).content or ""
    assert observation.endswith(TAU2_HINT)


def test_tau2_history_is_what_tau2s_agent_sends(mock: Environment) -> None:
    solver = Solver(Scripted(), mock.policy, mock.tool_schemas, TAU2)
    call = ToolCall(id="c1", name="get_users", arguments={})
    rendered = solver.render([
        *OPENING,
        ChatMessage(role="assistant", content="One moment.", tool_calls=[call]),
        ChatMessage(role="tool", content="[]", tool_call_id="c1"),
    ])  # fmt: skip
    assert rendered[1] == {"role": "assistant", "content": "Hi! How can I help you today?"}
    assert rendered[3]["content"] == "One moment."
    assert rendered[3]["tool_calls"][0]["function"] == {"name": "get_users", "arguments": "{}"}
    guided = Solver(Scripted(), mock.policy, mock.tool_schemas, SETTINGS)
    assert guided.error_observation("bad").content == f"[invalid action: bad] {GUIDED_HINT}"


async def test_real_tau2_turn_talks_or_calls_and_is_not_cut(
    mock: Environment, llm: Callable[..., OpenAIChatClient], model_dir: Path
) -> None:
    """SmolLM2 under tool_choice auto mostly talks; whatever it sampled is the turn, whole."""
    settings = TAU2.model_copy(update={"temperature": 0.0})
    solver = Solver(llm(), mock.policy, mock.tool_schemas, settings)
    sentence = "The quarterly planning meeting moves to Thursday at ten in the large room upstairs."
    asked = ChatMessage(role="user", content=f"Repeat this sentence back to me: {sentence}")
    turn = await solver.act([OPENING[0], asked])
    assert turn.malformed is None
    assert turn.tokens is not None
    assert turn.tokens.finish_reason == "stop"  # no per-turn budget cut it short
    sampled = AutoTokenizer.from_pretrained(model_dir).decode(
        turn.tokens.completion_token_ids, skip_special_tokens=True
    )
    if turn.message.tool_calls:  # a call is fine too: its arguments are what was sampled
        assert all(c.name in mock.tool_names for c in turn.message.tool_calls)
    else:
        assert len(turn.message.content or "") > SETTINGS.max_string_length
        assert turn.message.content == sampled
