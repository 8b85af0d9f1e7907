"""The Controller's periodic look across its patterns: merge the ones that name one weakness,
and rewrite each description from the failures behind it.

A pattern is founded by one diagnosis and grows by matching (`PatternLibrary.match`), so two
patterns can name one weakness (a new kind of error the LLM named twice in other words, or
tools that only later overlapped), and a description stays the founding failure's words.
Every `controller.consolidate_every` diagnoses, one Controller replica (a Redis counter
decides which) consolidates:
1. **Deterministic merges** (`patterns.overlapping`): two patterns of one category and kind
   whose tools now overlap enough. These always run, and are all that runs without an LLM.
2. **The LLM's judgment.** It reads the most frequent patterns, each with its counts and its
   newest failing turns, and answers which pairs are the same weakness (across categories:
   the fixed categories are hints, not a cage) and one sentence describing each pattern
   from its failures.

The answer is hostile input. A pair must name two different listed patterns, and a pattern
is merged once per round at most (the more frequent one absorbs the other). A description
must read as prose and pass the injection scan, or the old one stays: it reaches the
Proposer's prompt. A failed or malformed answer leaves step 1's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from sentinel import injection
from sentinel.agents.llm import ChatClient, LLMError, complete_structured
from sentinel.config import ControllerSettings
from sentinel.logs import get_logger
from sentinel.orchestrator.patterns import PatternLibrary, kind_key, overlapping, words
from sentinel.schemas import ErrorPattern

log = get_logger(__name__)

DESCRIPTION_CHARS = 240
MIN_DESCRIPTION = 40
CHARS_PER_TOKEN = 2  # as the Proposer's draft budget (agents.proposer.text_limits)
KEYS_TOKENS = 48  # the answer's braces, keys and a few pairs
ENTRY_TOKENS = 24  # one description's own keys and number
MIN_WORDS = 5  # a description shorter than this names nothing the title does not
MIN_PROSE = 0.7  # the share of its words that must be words of letters

SYSTEM = """You are the Controller of a training loop for a customer-service agent. You keep a
list of the agent's recurring error patterns. Read the patterns and their newest failures.
Answer with JSON only: "same" lists pairs of pattern numbers that describe the same
weakness (leave it empty if none do); "descriptions" gives, for each pattern, one plain
sentence saying what the agent does wrong, from its failures."""


class DescriptionDraft(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: int
    text: str = Field(max_length=DESCRIPTION_CHARS * 2)


class ConsolidationDraft(BaseModel):
    """What the LLM writes; the Consolidator checks it against the patterns shown."""

    model_config = ConfigDict(extra="forbid")

    same: list[list[int]] = Field(default_factory=list, max_length=16)
    descriptions: list[DescriptionDraft] = Field(default_factory=list, max_length=32)


class Consolidation(BaseModel):
    """What a round changed: the merges (kept id, merged id) and the ids re-described."""

    merged: list[tuple[str, str]] = Field(default_factory=list)
    described: list[str] = Field(default_factory=list)
    llm: bool = False  # whether the LLM's answer was used


def description_chars(shown: int, max_tokens: int) -> int:
    """Each description's maxLength, so that an answer describing every shown pattern closes
    within `max_tokens` (a weak model writes each text up to its maxLength; a draft cut off
    is lost): about 2 characters a token, after the keys, the numbers and the pairs."""
    room = CHARS_PER_TOKEN * (max_tokens - KEYS_TOKENS - ENTRY_TOKENS * shown) // max(shown, 1)
    return max(MIN_DESCRIPTION, min(DESCRIPTION_CHARS, room))


def draft_schema(shown: int, max_tokens: int) -> dict[str, Any]:
    numbers = {"enum": list(range(shown))}
    chars = description_chars(shown, max_tokens)
    return {
        "type": "object",
        "properties": {
            "same": {
                "type": "array",
                "items": {"type": "array", "items": numbers, "minItems": 2, "maxItems": 2},
                "maxItems": max(1, shown // 2),
            },
            "descriptions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "pattern": numbers,
                        "text": {"type": "string", "maxLength": chars},
                    },
                    "required": ["pattern", "text"],
                    "additionalProperties": False,
                },
                "minItems": shown,  # each pattern described: a weak model's "[]" says nothing
                "maxItems": shown,
            },
        },
        "required": ["same", "descriptions"],
        "additionalProperties": False,
    }


def render_prompt(patterns: Sequence[ErrorPattern]) -> str:
    """One numbered entry per pattern: its name, counts and tools, its description, and its
    newest failure (texts the Controller scanned and bounded when it diagnosed them)."""
    lines = []
    for i, p in enumerate(patterns):
        failures = sum(p.frequency.values())
        tools = ", ".join(p.tools) or "no tool"
        lines.append(f"[{i}] {p.title} ({kind_key(p.category, p.kind)}; {failures} failures;"
                     f" tools: {tools})")  # fmt: skip
        lines.append(f"    described as: {p.description[:300]}")
        if p.evidence:
            newest = p.evidence[-1]
            lines.append(f"    newest failure: {newest.summary[:200]}")
            if newest.excerpt:
                lines.extend(f"      {line[:200]}" for line in newest.excerpt.splitlines()[:2])
    return "\n".join(["Patterns:", *lines])


def prose(text: str) -> str | None:
    """`text` as a pattern's description, or None when it is not one: too short, mostly not
    words (a weak model's digit runs and fragments), or read as an instruction."""
    bounded = injection.bounded(" ".join(text.split()), DESCRIPTION_CHARS)
    if bounded is None:
        return None
    tokens = bounded.split()
    wordlike = [t for t in tokens if t.strip(".,;:!?()\"'").isalpha()]
    if len(wordlike) < MIN_WORDS or len(wordlike) < MIN_PROSE * len(tokens):
        return None
    return bounded


def pairs_of(draft: ConsolidationDraft, shown: Sequence[ErrorPattern]) -> list[tuple[int, int]]:
    """The LLM's pairs that name two different listed patterns, each pattern once at most,
    the more frequent first (it absorbs the other)."""
    chosen: list[tuple[int, int]] = []
    used: set[int] = set()
    for pair in draft.same:
        if len(pair) != 2 or len(set(pair)) != 2 or used & set(pair):
            continue
        if not all(0 <= i < len(shown) for i in pair):
            continue
        a, b = pair
        ranked = sorted((a, b), key=lambda i: -sum(shown[i].frequency.values()))
        chosen.append((ranked[0], ranked[1]))
        used |= {a, b}
    return chosen


class Consolidator:
    def __init__(
        self,
        library: PatternLibrary,
        redis: aioredis.Redis,
        settings: ControllerSettings,
        client: ChatClient | None = None,
    ) -> None:
        self.library = library
        self.redis = redis
        self.settings = settings
        self.client = client  # None: deterministic merges only
        self.counter_key = f"{library.key}:consolidation:diagnoses"

    async def due(self) -> bool:
        """Count one diagnosis; True for the replica whose count completes a round."""
        every = self.settings.consolidate_every
        return every > 0 and await self.redis.incr(self.counter_key) % every == 0

    async def consolidate(self) -> Consolidation:
        done = Consolidation()
        for into, other in overlapping(await self.library.all(), self.library.merge_similarity):
            if await self.library.merge(into.id, other.id):
                done.merged.append((into.id, other.id))
        if self.client is None:
            return self._logged(done)
        shown = (await self.library.all())[: self.settings.consolidate_patterns]
        if len(shown) < 2:
            return self._logged(done)
        draft = await self._ask(shown)
        if draft is None:
            return self._logged(done)
        done.llm = True
        for a, b in pairs_of(draft, shown):
            if await self.library.merge(shown[a].id, shown[b].id):
                done.merged.append((shown[a].id, shown[b].id))
        merged_away = {other for _, other in done.merged}
        for d in draft.descriptions:
            if not 0 <= d.pattern < len(shown) or shown[d.pattern].id in merged_away:
                continue
            text = prose(d.text)
            if text and not _restates(text, shown[d.pattern]):
                await self.library.describe(shown[d.pattern].id, text)
                done.described.append(shown[d.pattern].id)
        return self._logged(done)

    async def _ask(self, shown: Sequence[ErrorPattern]) -> ConsolidationDraft | None:
        assert self.client is not None
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": render_prompt(shown)},
        ]
        try:
            return await complete_structured(
                self.client, messages, ConsolidationDraft,
                schema=draft_schema(len(shown), self.settings.consolidate_max_tokens),
                max_tokens=self.settings.consolidate_max_tokens, temperature=0.0,
            )  # fmt: skip
        except LLMError as error:  # includes MalformedOutput: the deterministic merges stand
            log.warning("consolidation without the LLM", error=str(error)[:200])
            return None

    @staticmethod
    def _logged(done: Consolidation) -> Consolidation:
        log.info("patterns consolidated", merged=len(done.merged),
                 described=len(done.described), llm=done.llm)  # fmt: skip
        return done


def _restates(text: str, pattern: ErrorPattern) -> bool:
    """Whether `text` only repeats the pattern's title: nothing learnt from the failures."""
    return words(text) <= words(pattern.title) | {"the", "agent", "a", "an", "in", "of"}
