"""The one client every agent uses to reach an OpenAI-compatible endpoint.

`ChatClient` is the seam: agents depend on it, not on a vendor SDK. `OpenAIChatClient` speaks
to vLLM, OpenAI or a litellm proxy through the `openai` SDK. With `record_tokens`, vLLM also
returns the prompt and completion token ids and each completion token's logprob, so the
trainer learns from exactly what was sampled.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import openai
from pydantic import BaseModel, Field

from sentinel.config import LLMEndpoint

Messages = list[dict[str, Any]]


class LLMError(RuntimeError):
    """The endpoint failed after its retries: unreachable, refusing, or answering nonsense."""


class ContextLengthExceeded(LLMError):
    """The prompt no longer fits the model's context."""


class RawToolCall(BaseModel):
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


class Completion(BaseModel):
    content: str | None = None
    tool_calls: list[RawToolCall] = Field(default_factory=list)
    finish_reason: str | None = None
    prompt_token_ids: list[int] = Field(default_factory=list)
    completion_token_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)


class ChatClient(Protocol):
    model: str

    async def complete(
        self,
        messages: Messages,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        json_schema: dict[str, Any] | None = None,
        record_tokens: bool = False,
    ) -> Completion: ...


class OpenAIChatClient:
    def __init__(self, endpoint: LLMEndpoint, model: str | None = None) -> None:
        self.model = model or endpoint.model
        self.endpoint = endpoint
        self._client = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key(),
            timeout=endpoint.timeout_s,
            max_retries=endpoint.max_retries,
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(
        self,
        messages: Messages,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        json_schema: dict[str, Any] | None = None,
        record_tokens: bool = False,
    ) -> Completion:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if tools:
            request |= {"tools": tools, "tool_choice": tool_choice or "auto"}
            request["parallel_tool_calls"] = False
        if json_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json_schema},
            }
        if record_tokens:
            request |= {"logprobs": True, "extra_body": {"return_token_ids": True}}
        try:
            response = await self._client.chat.completions.create(**request)
        except openai.BadRequestError as error:
            text = str(error).lower()
            if "context length" in text or "maximum model length" in text:
                raise ContextLengthExceeded(str(error)) from error
            raise LLMError(f"{self.endpoint.base_url} refused the request: {error}") from error
        except openai.OpenAIError as error:
            raise LLMError(f"{self.endpoint.base_url} failed: {error}") from error
        return _completion(response, record_tokens)


def _completion(response: Any, record_tokens: bool) -> Completion:
    if not response.choices:
        raise LLMError("the endpoint returned no choices")
    choice = response.choices[0]
    message = choice.message
    calls = [
        RawToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "{}")
        for c in message.tool_calls or []
        if getattr(c, "function", None) is not None
    ]
    completion = Completion(
        content=message.content, tool_calls=calls, finish_reason=choice.finish_reason
    )
    if record_tokens:
        completion.prompt_token_ids = list(getattr(response, "prompt_token_ids", None) or [])
        completion.completion_token_ids = list(getattr(choice, "token_ids", None) or [])
        content = choice.logprobs.content if choice.logprobs else None
        completion.logprobs = [float(t.logprob) for t in content or []]
    return completion


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's JSON arguments as a dict; ValueError says what is wrong."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value
