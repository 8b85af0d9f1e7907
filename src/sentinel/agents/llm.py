"""The one client every agent uses to reach an OpenAI-compatible endpoint.

`ChatClient` is the seam: agents depend on it, not on a vendor SDK. `OpenAIChatClient` speaks
to vLLM, OpenAI or a litellm proxy through the `openai` SDK. With `record_tokens`, vLLM also
returns the prompt and completion token ids and each completion token's logprob, so the
trainer learns from exactly what was sampled.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import httpx
import openai
from pydantic import BaseModel, Field, ValidationError
from pydantic_core import from_json

from sentinel.config import AgentEndpoint, LLMEndpoint

Messages = list[dict[str, Any]]

# Bounds on any model output, checked before parsing: a real answer is max_tokens long (a
# few thousand characters) and a few levels deep; a hostile one must not cost a parser
# minutes, recursion or memory. Generous enough for a strong model's longest answer.
MAX_OUTPUT_CHARS = 100_000
MAX_JSON_DEPTH = 32
# Candidates asked for beside each sampled token: with one rival, a token the grammar forced
# shows as logprob 0 against vLLM's stand-in for -inf (JSON has no -inf).
ALTERNATIVES = 2
DISALLOWED_LOGPROB = -9999.0
PROBLEM_CHARS = 300  # a reason quotes at most this much of what the model wrote


class LLMError(RuntimeError):
    """The endpoint failed after its retries: unreachable, refusing, or answering nonsense."""


class ContextLengthExceeded(LLMError):
    """The prompt no longer fits the model's context."""


class MalformedOutput(LLMError):
    """The model's answer does not parse as the requested structure, even after a repair.

    `problem` is the reason without the structure's name; `retry` is False when asking the
    model again cannot help (the answer is too large to show it back)."""

    def __init__(self, what: str, problem: str, raw: str, *, retry: bool = True) -> None:
        super().__init__(f"{what}: {problem}")
        self.problem = problem
        self.raw = storable(raw)
        self.retry = retry


T = TypeVar("T", bound=BaseModel)


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
    forced: list[int] | None = None  # completion positions the grammar allowed alone
    reasoning: str | None = None  # a thinking model's <think> block, parsed from the text


class Generation(BaseModel):
    """A completion sampled from token ids: the raw text and exactly the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # behaviour logprob of each sampled token
    forced: list[int] | None = None  # positions the grammar allowed alone (see `forced`)
    finish_reason: str | None = None


class ChatClient(Protocol):
    model: str

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
    ) -> Completion: ...


class OpenAIChatClient:
    def __init__(
        self, endpoint: LLMEndpoint, model: str | None = None, *, cache_salt: str | None = None
    ) -> None:
        self.model = model or endpoint.model
        self.endpoint = endpoint
        # vLLM's prefix-cache salt on every request: a policy's own (training.publisher),
        # so no request reuses KV blocks computed under other weights
        self.cache_salt = cache_salt
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
        max_tokens: int | None,
        temperature: float = 1.0,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        json_schema: dict[str, Any] | None = None,
        record_tokens: bool = False,
        parallel_tool_calls: bool = False,
    ) -> Completion:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,  # None: up to the server's context (tau2's agent)
            "temperature": temperature,
        }
        if tools:
            request |= {"tools": tools, "tool_choice": tool_choice or "auto"}
            request["parallel_tool_calls"] = parallel_tool_calls
        if json_schema is not None:
            request["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json_schema},
            }
        if record_tokens:
            request |= {"logprobs": True, "top_logprobs": ALTERNATIVES}
            request["extra_body"] = {"return_token_ids": True}
        if self.cache_salt is not None:
            request["extra_body"] = {**request.get("extra_body", {}), "cache_salt": self.cache_salt}
        try:
            response = await self._client.chat.completions.create(**request)
        except openai.OpenAIError as error:
            raise llm_error(error, self.endpoint.base_url) from error
        return _completion(response, record_tokens)

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int | None,
        temperature: float = 1.0,
        json_schema: dict[str, Any] | None = None,
        regex: str | None = None,
    ) -> Generation:
        """Token-in/token-out: `/v1/completions` with a token-id prompt, the sampled ids and
        their logprobs back; guided by `json_schema` or `regex` (vLLM's structured outputs).
        `max_tokens` None: up to the context's end (tau2's agent sets no per-turn budget)."""
        extra: dict[str, Any] = {"return_token_ids": True}
        if self.cache_salt is not None:
            extra["cache_salt"] = self.cache_salt
        if json_schema is not None or regex is not None:
            guide = {"json": json_schema} if json_schema is not None else {"regex": regex}
            extra["structured_outputs"] = guide
        try:
            response = await self._client.completions.create(
                model=self.model, prompt=prompt_ids, max_tokens=max_tokens,
                temperature=temperature, logprobs=ALTERNATIVES, extra_body=extra,
            )  # fmt: skip
        except openai.OpenAIError as error:
            raise llm_error(error, self.endpoint.base_url) from error
        if not response.choices:
            raise LLMError("the endpoint returned no choices")
        choice = response.choices[0]
        ids = list(getattr(choice, "token_ids", None) or [])
        logprobs = (
            [float(x) for x in (choice.logprobs.token_logprobs or [])] if choice.logprobs else []
        )
        if not ids or len(ids) != len(logprobs):
            raise LLMError(
                f"{self.endpoint.base_url} returned no token ids or logprobs (not vLLM?)"
            )
        listed = choice.logprobs.top_logprobs or [] if choice.logprobs else []
        tokens = choice.logprobs.tokens or [] if choice.logprobs else []
        tops = [
            [v for k, v in (top or {}).items() if k != token]
            for token, top in zip(tokens, listed, strict=False)  # unequal: `forced` says None
        ]
        return Generation(
            text=choice.text, token_ids=ids, logprobs=logprobs, finish_reason=choice.finish_reason,
            forced=forced(logprobs, tops),
        )  # fmt: skip

    async def tokenize(
        self,
        messages: Messages,
        *,
        tools: list[dict[str, Any]] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]:
        """`messages` rendered by the served chat template and tokenized, by the server that
        samples (vLLM's `/tokenize`): the same template and tokenizer, nothing held here."""
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "add_generation_prompt": generation_prompt,
        }  # fmt: skip
        if tools:
            body["tools"] = tools
        root = self.endpoint.base_url.rstrip("/").removesuffix("/v1")
        try:
            async with httpx.AsyncClient(timeout=self.endpoint.timeout_s) as http:
                response = await http.post(
                    f"{root}/tokenize", json=body, headers=self.endpoint.auth_headers()
                )
        except httpx.HTTPError as error:
            raise LLMError(f"{root}/tokenize failed: {error}") from error
        if response.status_code != 200:
            raise LLMError(f"{root}/tokenize refused: {response.status_code} {clip(response.text)}")
        tokens = response.json().get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise LLMError(f"{root}/tokenize answered without token ids")
        return tokens


class ClosableChatClient(ChatClient, Protocol):
    async def aclose(self) -> None: ...


def open_chat_client(endpoint: LLMEndpoint) -> ClosableChatClient:
    """The client an agent's endpoint names (`client`): litellm (any provider) or the
    openai SDK; a plain LLMEndpoint is always the openai SDK."""
    if isinstance(endpoint, AgentEndpoint) and endpoint.client == "litellm":
        from sentinel.agents.litellm_client import LiteLLMChatClient  # heavy: only if used

        return LiteLLMChatClient(endpoint)
    return OpenAIChatClient(endpoint)


def llm_error(error: openai.OpenAIError, where: str) -> LLMError:
    """The LLMError for an SDK's error after its retries; both routes raise the same ones
    (litellm's exceptions subclass openai's)."""
    if isinstance(error, openai.BadRequestError):
        text = str(error).lower()
        if "context length" in text or "maximum model length" in text:
            return ContextLengthExceeded(str(error))
        return LLMError(f"{where} refused the request: {error}")
    return LLMError(f"{where} failed: {error}")


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
        tops = [
            [a.logprob for a in t.top_logprobs or [] if a.token != t.token] for t in content or []
        ]
        completion.forced = forced(completion.logprobs, tops)
    return completion


def forced(logprobs: list[float], alternatives: list[list[float]]) -> list[int] | None:
    """The positions whose sampled token the grammar allowed alone: it has logprob 0 and
    every other candidate the server listed was masked (a near-certain token the model chose
    freely still has finite rivals, so it keeps its loss). None when the server listed no
    candidates (not vLLM, or an old one): the trainer then judges by logprob."""
    if len(alternatives) != len(logprobs) or not any(alternatives):
        return None
    return [
        i for i, (lp, others) in enumerate(zip(logprobs, alternatives, strict=True))
        if lp == 0.0 and all(o <= DISALLOWED_LOGPROB for o in others)
    ]  # fmt: skip


def check_text(text: str, what: str = "output") -> str:
    """`text` if it is small enough to handle and valid Unicode; ValueError says why not.

    Every parser of model output calls this (or `check_json`) first."""
    if len(text) > MAX_OUTPUT_CHARS:
        raise ValueError(f"{what}: {len(text)} characters, over the limit of {MAX_OUTPUT_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: it would fail later, when stored
        raise ValueError(f"{what}: not valid Unicode at character {error.start}") from None
    return text


def check_json(text: str, what: str = "output") -> str:
    """`check_text`, and JSON nesting no deeper than MAX_JSON_DEPTH (counted without parsing,
    so a hostile answer costs one linear scan, never the parser's recursion)."""
    check_text(text, what)
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{what}: nested deeper than {MAX_JSON_DEPTH} levels")
    return text


def _depth(text: str) -> int:
    """The deepest bracket nesting outside JSON strings (stops counting past the limit)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return depth
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def storable(text: str) -> str:
    """At most MAX_OUTPUT_CHARS of model output, lone surrogates replaced: safe to keep."""
    return text[:MAX_OUTPUT_CHARS].encode("utf-8", "replace").decode("utf-8")


def clip(text: str, limit: int = PROBLEM_CHARS) -> str:
    """At most `limit` characters of model output, for a reason or a log line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's JSON arguments as a dict; ValueError says what is wrong.

    Strict JSON: no NaN or Infinity, no lone surrogates (both would break storing the call)."""
    check_json(raw, "arguments")
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError as error:
        raise ValueError(f"arguments are not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def parse_structured(raw: str, model: type[T], *, truncated: bool = False) -> T:
    """A model answer parsed as `model`; MalformedOutput says why it is not one.

    `truncated`: the answer stopped at the token limit (the reason says so)."""
    try:  # the depth of the part that is parsed: prose around it may hide brackets
        text = check_json(_json_text(check_text(raw, "the answer")), "the answer")
    except ValueError as error:
        raise MalformedOutput(model.__name__, str(error), raw, retry=False) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        problem = first_problem(error, truncated=truncated)
        raise MalformedOutput(model.__name__, problem, raw) from None


async def complete_structured(
    client: ChatClient,
    messages: Messages,
    model: type[T],
    *,
    schema: dict[str, Any] | None = None,
    max_tokens: int,
    temperature: float = 0.0,
) -> T:
    """An answer parsed as `model`, decoded under `schema` (default: the model's own).

    Servers with structured output (vLLM, OpenAI) keep the JSON well-formed; what can still go
    wrong (truncation at max_tokens, a server that ignores the schema, values the schema
    cannot express) gets one repair round in which the model sees its error. Raises
    MalformedOutput if that fails too.
    """
    schema = schema or model.model_json_schema()
    conversation = list(messages)
    for attempt in range(2):
        completion = await client.complete(
            conversation, max_tokens=max_tokens, temperature=temperature, json_schema=schema
        )
        raw = completion.content or ""
        try:
            return parse_structured(raw, model, truncated=completion.finish_reason == "length")
        except MalformedOutput as error:
            if attempt == 1 or not error.retry:
                raise
            conversation += [
                {"role": "assistant", "content": raw},
                {"role": "user", "content": f"That JSON is invalid: {error.problem}. Answer "
                 "again, shorter, with only the corrected JSON."},
            ]  # fmt: skip
    raise AssertionError("unreachable")


def _json_text(raw: str) -> str:
    """The JSON inside an answer: without code fences or prose around the outer object.

    Plain string operations: a regex with `\\s*` before an anchor is quadratic in runs of
    whitespace, minutes on a hostile answer."""
    text = raw.strip()
    if text.startswith("```"):
        text = text[3:].removeprefix("json").lstrip()
    if text.endswith("```"):
        text = text[:-3].rstrip()
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


def first_problem(error: ValidationError, *, truncated: bool) -> str:
    """The first validation error, short: where and what (never the whole input)."""
    if truncated:
        return "the answer was cut off at the token limit"
    item = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in item["loc"]) or "the answer"
    return clip(f"{where}: {item['msg']}")  # a location can be a hostile key
