"""Token-in/token-out: a rollout as one token sequence that only grows.

The prompt of turn n+1 is the prompt of turn n, plus the completion sampled at turn n, plus
the tokens of the messages that came after it (tool results, the user's reply, an error
observation), rendered on their own. History is never rendered again, so the trainer scores
exactly the tokens the sampler saw and produced.

Rendering new messages on their own: the served chat template renders a fixed dummy prefix
(system, user, assistant) followed by the new messages, and the dummy prefix's own tokens are
cut off. The dummy system message keeps the template from injecting its default system
prompt (SmolLM2's "You are a helpful AI assistant named SmolLM...") in front of them.

The junction: the template closes an assistant message with more than the end-of-turn token
the model samples (ChatML: `<|im_end|>` then `\\n`). `Template.closing` is learned from two
dummy renders; after a completion, the part of it the model did not sample is appended (all
of it when the completion was cut off at max_tokens). Those tokens, like every rendered one,
carry no loss.

A split: where the template would render the dummy prefix differently once messages follow
it (a history rewrite), or the system prompt changes, the sequence cannot grow; the whole
conversation is rendered afresh as a new Segment (a new training row), and counted
(`Trajectory.splits`).

Reasoning (`<think>...</think>`) is part of the sampled text, so it stays in the sequence,
at sampling and at training alike: earlier turns' reasoning is kept, never stripped.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from sentinel.agents.llm import Generation, Messages
from sentinel.agents.parsing import parse_completion
from sentinel.schemas import ChatMessage
from sentinel.schemas.trajectory import Grammar, SampledSpan, Segment

DUMMY: Messages = [{"role": "system", "content": "."}, {"role": "user", "content": "."}]


class TokenClient(Protocol):
    """What the token path needs of an endpoint (OpenAIChatClient has it)."""

    model: str

    async def tokenize(
        self,
        messages: Messages,
        *,
        tools: list[dict[str, Any]] | None = None,
        generation_prompt: bool = True,
    ) -> list[int]: ...

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int | None,
        temperature: float = 1.0,
        json_schema: dict[str, Any] | None = None,
        regex: str | None = None,
    ) -> Generation: ...


class TemplateError(RuntimeError):
    """The served template cannot be grown token by token (it does not extend its own renders)."""


@dataclass(frozen=True)
class Template:
    """What the served chat template puts around messages, learned once from dummy renders."""

    prefix: list[int]  # DUMMY and an assistant reply, as the start of a longer conversation
    closing: list[int]  # after an assistant's content: its end-of-turn and the junction

    @classmethod
    async def learn(cls, client: TokenClient) -> Template:
        opened = await client.tokenize(DUMMY, generation_prompt=True)
        tails = []
        for content in ("a", "b"):
            reply = {"role": "assistant", "content": content}
            rendered = await client.tokenize([*DUMMY, reply], generation_prompt=False)
            if rendered[: len(opened)] != opened:
                raise TemplateError("an assistant reply does not extend the generation prompt")
            tails.append(rendered[len(opened) :])
        common = 0  # the longest common suffix: what follows any content
        while common < min(map(len, tails)) - 1 and tails[0][-1 - common] == tails[1][-1 - common]:
            common += 1
        if common == 0:
            raise TemplateError("the template closes an assistant reply with nothing")
        prefix = opened + tails[0]
        return cls(prefix=prefix, closing=tails[0][len(tails[0]) - common :])

    def junction(self, completion: list[int]) -> list[int]:
        """The closing tokens the model did not sample: all but the end-of-turn it stopped
        on, or all of them when it was cut off."""
        for sampled in range(min(len(self.closing), len(completion)), 0, -1):
            if completion[-sampled:] == self.closing[:sampled]:
                return self.closing[sampled:]
        return list(self.closing)

    async def render_new(self, client: TokenClient, messages: Messages) -> list[int] | None:
        """`messages` as they continue a conversation that ended with an assistant reply and
        its junction; None where the template rewrites the earlier messages (a split)."""
        rendered = await client.tokenize(
            [*DUMMY, {"role": "assistant", "content": "a"}, *messages], generation_prompt=True
        )
        if rendered[: len(self.prefix)] != self.prefix:
            return None
        return rendered[len(self.prefix) :]


@dataclass
class Transcript:
    """One rollout's growing token sequence, as Segments (more than one only after a split)."""

    client: TokenClient
    template: Template
    tools: list[dict[str, Any]] | None
    temperature: float
    # The server compiles JSON grammars without free whitespace (serve.compact_json): its
    # guided turns are recorded so, for the trainer's replay to mask as vLLM did.
    compact_json: bool = field(kw_only=True)
    segments: list[Segment] = field(default_factory=list)
    _rendered: int = 0  # messages of the rendered conversation already in the sequence
    _system: dict[str, Any] | None = None
    _junction: list[int] = field(default_factory=list)

    async def prompt(self, rendered: Messages) -> list[int]:
        """The next turn's prompt: the sequence so far, grown by the messages of `rendered`
        (the whole conversation, as the Solver renders it) that came after it."""
        new = rendered[self._rendered :]
        grown = None
        if self.segments and rendered[0] == self._system and new:
            grown = await self.template.render_new(self.client, new)
        if grown is None:  # the first turn, or a split: the whole conversation afresh
            ids = await self.client.tokenize(rendered, tools=self.tools)
            self.segments.append(Segment(token_ids=ids, turns=[], temperature=self.temperature))
            self._system = copy.deepcopy(rendered[0])
        else:
            self.segments[-1].token_ids.extend([*self._junction, *grown])
        self._rendered = len(rendered)
        return list(self.segments[-1].token_ids)

    def record(
        self, generation: Generation, message_index: int, grammar: Grammar | None = None
    ) -> None:
        """The sampled turn, appended as policy tokens; it stands for one rendered message.
        A guided turn names its grammar, kept once per segment."""
        segment = self.segments[-1]
        if grammar is not None and grammar not in segment.grammars:
            segment.grammars.append(grammar)
        segment.turns.append(
            SampledSpan(
                message_index=message_index, start=len(segment.token_ids),
                logprobs=generation.logprobs, finish_reason=generation.finish_reason,
                forced=generation.forced,
                grammar=None if grammar is None else segment.grammars.index(grammar),
            )
        )  # fmt: skip
        segment.token_ids.extend(generation.token_ids)
        self._junction = self.template.junction(generation.token_ids)
        self._rendered += 1

    @property
    def splits(self) -> int:
        return max(0, len(self.segments) - 1)


def guided_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema vLLM builds for `tool_choice="required"` with parallel calls off
    (vllm.tool_parsers.utils.get_json_schema_from_tools): one call, any tool, its parameters."""
    options: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for tool in copy.deepcopy(tools):
        function = tool["function"]
        params = function.get("parameters") or {"type": "object", "properties": {}}
        definitions.update(params.pop("$defs", {}) if isinstance(params, dict) else {})
        options.append({
            "properties": {"name": {"type": "string", "enum": [function["name"]]},
                           "parameters": params},
            "required": ["name", "parameters"],
        })  # fmt: skip
    schema: dict[str, Any] = {
        "type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options},
        "maxItems": 1,
    }  # fmt: skip
    if definitions:
        schema["$defs"] = definitions
    return schema


@dataclass
class Sampled:
    """One agent turn sampled on the token path: the message it stands for, and why it is
    malformed (None: usable)."""

    message: ChatMessage
    malformed: str | None
    reasoning: str | None = None


class Interpreter(Protocol):
    """The Solver's side of a turn (sentinel.agents.solver.Solver has it)."""

    tools: list[dict[str, Any]]

    def render(self, history: list[ChatMessage], experience: str | None = None) -> Messages: ...

    def interpret(self, completion: Any) -> tuple[ChatMessage, str | None]: ...


def grammar_of(
    json_schema: dict[str, Any] | None, regex: str | None, *, compact: bool
) -> Grammar | None:
    """The grammar as vLLM compiles it: a schema as the JSON text of the request."""
    if json_schema is not None:
        return Grammar(kind="json", spec=json.dumps(json_schema), compact=compact)
    return None if regex is None else Grammar(kind="regex", spec=regex)


async def sample_turn(
    solver: Interpreter,
    transcript: Transcript,
    history: list[ChatMessage],
    *,
    max_tokens: int | None,
    experience: str | None = None,
    json_schema: dict[str, Any] | None = None,
    regex: str | None = None,
) -> Sampled:
    """The Solver's next turn, sampled from the transcript's tokens and recorded in it; one
    parser (sentinel.agents.parsing) reads the raw text, the Solver judges it."""
    prompt = await transcript.prompt(solver.render(history, experience))
    generation = await transcript.client.generate(
        prompt, max_tokens=max_tokens, temperature=transcript.temperature,
        json_schema=json_schema, regex=regex,
    )  # fmt: skip
    grammar = grammar_of(json_schema, regex, compact=transcript.compact_json)
    transcript.record(generation, len(history), grammar)
    completion = parse_completion(generation.text, generation.finish_reason, f"call-{len(history)}")
    message, problem = solver.interpret(completion)
    return Sampled(message=message, malformed=problem, reasoning=completion.reasoning)
