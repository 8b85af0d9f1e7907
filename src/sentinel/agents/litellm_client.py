"""The Controller's and Proposer's route to any provider litellm supports.

`LiteLLMChatClient` is a `ChatClient` like `OpenAIChatClient`, and fails the same way: the
same timeout per attempt, the same retries (transient errors only, with the openai SDK's
backoff), and the same `LLMError`s (`llm_error`: litellm's exceptions subclass openai's).
litellm's own retries are off: they retry every error, a refused request too, without backoff.
The policy keeps the openai client: only it returns vLLM's token ids and logprobs.

The key goes to litellm as an argument, never through the environment or a log line.
"""

from __future__ import annotations

import os
import random
from typing import Any

import anyio
import openai

from sentinel.agents.llm import Completion, LLMError, Messages, _completion, llm_error
from sentinel.config import AgentEndpoint

# litellm fetches its model price map from GitHub at import unless told not to: a run must
# not depend on the network (nor wait on it) for a table it does not use.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout

# The openai SDK's retry schedule (openai._constants), so both routes wait alike.
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0


class LiteLLMChatClient:
    def __init__(self, endpoint: AgentEndpoint, model: str | None = None) -> None:
        self.model = model or endpoint.model
        self.endpoint = endpoint
        self._route = f"{endpoint.provider}/{self.model}"
        self._key = endpoint.api_key()  # MissingKey now, at start, as the openai client
        self._where = endpoint.base_url or endpoint.provider

    async def aclose(self) -> None:
        """Nothing to close: litellm pools its HTTP clients itself."""

    async def complete(
        self,
        messages: Messages,
        *,
        max_tokens: int | None,
        temperature: float = 1.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        json_schema: dict[str, Any] | None = None,
        record_tokens: bool = False,
        parallel_tool_calls: bool = False,
    ) -> Completion:
        if record_tokens:  # the policy's need: vLLM's token ids come through the openai SDK
            raise LLMError("token ids and logprobs need the endpoint's client: openai")
        request = self._request(messages, max_tokens, temperature, json_schema)
        if tools:
            request |= {"tools": tools, "tool_choice": tool_choice or "auto"}
            request["parallel_tool_calls"] = parallel_tool_calls
        response = await self._with_retries(request)
        return _completion(response, record_tokens=False)

    def _request(
        self,
        messages: Messages,
        max_tokens: int | None,
        temperature: float,
        json_schema: dict[str, Any] | None,
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self._route,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "api_key": self._api_key(),
            "timeout": self.endpoint.timeout_s,
            "num_retries": 0,  # ours, below
            "max_retries": 0,  # the openai SDK's, inside litellm's openai route
        }
        if self.endpoint.base_url:
            request["api_base"] = self.endpoint.base_url
        if json_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json_schema},
            }
        return request

    def _api_key(self) -> str | None:
        """The key; for a keyless vLLM "EMPTY" (the openai route needs one). Another
        provider gets None then, and litellm reads that provider's own variable."""
        return None if self._key == "EMPTY" and self.endpoint.provider != "openai" else self._key

    async def _with_retries(self, request: dict[str, Any]) -> Any:
        for attempt in range(self.endpoint.max_retries + 1):
            try:
                return await litellm.acompletion(**request)
            except openai.OpenAIError as error:
                if attempt == self.endpoint.max_retries or not transient(error):
                    raise llm_error(error, self._where) from error
            await anyio.sleep(retry_delay(attempt))
        raise AssertionError("unreachable")


def transient(error: openai.OpenAIError) -> bool:
    """What the openai SDK retries: no connection, a timeout, 408, 409, 429 and 5xx."""
    if isinstance(error, openai.APIConnectionError):  # a timeout is one too
        return True
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and (status in (408, 409, 429) or status >= 500)


def retry_delay(attempt: int) -> float:
    """The openai SDK's backoff: 0.5 s doubling up to 8 s, less up to a quarter of jitter."""
    delay = min(INITIAL_RETRY_DELAY_S * 2.0**attempt, MAX_RETRY_DELAY_S)
    return delay * (1 - 0.25 * random.random())
