from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from sentinel.agents.llm import ContextLengthExceeded, LLMError, OpenAIChatClient
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
