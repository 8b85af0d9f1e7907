from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from sentinel.agents.llm import (
    Completion,
    ContextLengthExceeded,
    LLMError,
    MalformedOutput,
    Messages,
    OpenAIChatClient,
    complete_structured,
)
from sentinel.config import LLMEndpoint
from sentinel.process import free_port

pytestmark = pytest.mark.anyio
Client = Callable[..., OpenAIChatClient]


async def test_unreachable_endpoint_is_an_llm_error() -> None:
    endpoint = LLMEndpoint(
        base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, timeout_s=5
    )
    client = OpenAIChatClient(endpoint)
    with pytest.raises(LLMError, match="failed"):
        await client.complete([{"role": "user", "content": "hi"}], max_tokens=4)
    await client.aclose()


async def test_prompt_beyond_the_context_is_context_length_exceeded(llm: Client) -> None:
    client = llm(max_retries=0)
    huge = "order " * 9000
    with pytest.raises(ContextLengthExceeded):
        await client.complete([{"role": "user", "content": huge}], max_tokens=4)


async def test_unknown_model_is_refused_clearly(llm: Client) -> None:
    client = llm("no-such-adapter", max_retries=0)
    with pytest.raises(LLMError, match="no-such-adapter"):
        await client.complete([{"role": "user", "content": "hi"}], max_tokens=4)


async def test_structured_output_follows_the_schema(llm: Client) -> None:
    client = llm()
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green"]}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    completion = await client.complete(
        [{"role": "user", "content": "Pick a colour and a count as JSON."}],
        max_tokens=40,
        json_schema=schema,
        temperature=0,
    )
    assert completion.content is not None
    value = json.loads(completion.content)
    assert value["colour"] in ("red", "green")
    assert isinstance(value["count"], int)


class Colour(BaseModel):
    colour: Literal["red", "green"]


class Scripted:
    """A stand-in endpoint that answers from a script (error handling only)."""

    model = "scripted"

    def __init__(self, *answers: tuple[str, str]) -> None:
        self.answers = list(answers)
        self.seen: list[Messages] = []

    async def complete(self, messages: Messages, **_: Any) -> Completion:
        self.seen.append(messages)
        content, finish = self.answers.pop(0)
        return Completion(content=content, finish_reason=finish)


async def test_structured_output_is_repaired_once_with_the_error_shown() -> None:
    client = Scripted(('{"colour": "blue"}', "stop"), ('```json\n{"colour": "red"}\n```', "stop"))
    value = await complete_structured(
        client, [{"role": "user", "content": "?"}], Colour, max_tokens=9
    )
    assert value == Colour(colour="red")
    assert "colour" in client.seen[1][-1]["content"]  # the repair names the field


async def test_truncated_output_twice_is_malformed_output() -> None:
    client = Scripted(('{"colour": "re', "length"), ('{"col', "length"))
    with pytest.raises(MalformedOutput, match="cut off") as caught:
        await complete_structured(client, [{"role": "user", "content": "?"}], Colour, max_tokens=3)
    assert caught.value.raw == '{"col'


async def test_structured_output_from_the_real_server_parses(llm: Client) -> None:
    value = await complete_structured(
        llm(), [{"role": "user", "content": "Pick a colour."}], Colour, max_tokens=20
    )
    assert value.colour in ("red", "green")


async def test_an_answer_too_large_to_parse_is_not_shown_back_to_the_model() -> None:
    client = Scripted(("[" * 10_000 + "]" * 10_000, "stop"), ('{"colour": "red"}', "stop"))
    with pytest.raises(MalformedOutput, match="nested deeper than") as caught:
        await complete_structured(client, [{"role": "user", "content": "?"}], Colour, max_tokens=3)
    assert len(client.seen) == 1  # no repair round that would send it back
    assert not caught.value.retry
