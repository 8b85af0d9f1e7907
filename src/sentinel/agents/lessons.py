"""Lessons for the Proposer's next prompt version (EigenData's prompt evolution).

When a prompt version's acceptance falls too low, a LessonWriter reads its rejections (the
validator's codes and details, most frequent first) and writes what the next version should
tell the Proposer. `Reflection` asks an LLM, which can name what no canned text foresaw (a
field it keeps leaving empty, an id format it keeps inventing); `Advice` is canned text per
rejection code, the fallback when the LLM fails or is off. Lessons accumulate: the new ones
first, then the parent's, deduplicated and bounded (`accumulated`).

The LLM's lessons are hostile text on their way into another LLM's prompt: each is judged
by the injection scanner, cut to LESSON_CHARS and dropped when empty or flagged.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, Field

from sentinel.agents.llm import ChatClient, LLMError, complete_structured
from sentinel.config import ProposerSettings
from sentinel.injection import bounded
from sentinel.logs import get_logger
from sentinel.schemas import RejectionCode

log = get_logger(__name__)

LESSON_CHARS = 200
NEW_LESSONS = 3  # written per revision; the rest of the budget is the parent's
EXAMPLE_CHARS = 160  # of a rejection's detail, shown with its code
MIN_WORDS = 3

ADVICE: dict[RejectionCode, str] = {
    RejectionCode.SCHEMA: "Write complete, valid JSON with every field, and keep texts short.",
    RejectionCode.UNKNOWN_TOOL: "Use only the tools listed; never invent a tool.",
    RejectionCode.BAD_ARGUMENTS: "Give each tool exactly its arguments, with the right types.",
    RejectionCode.UNKNOWN_ENTITY: "Use only ids listed under Entities, copied exactly.",
    RejectionCode.GOLD_WRITE_FAILED: "Each write must be allowed in the entity's current "
    "state: check its status under Entities before choosing the action.",
    RejectionCode.NO_STATE_CHANGE: "The actions must change the database: include a write.",
    RejectionCode.NOT_DISCRIMINATIVE: "Doing nothing must fail the task: the goal needs a write "
    "or information the agent must tell the user.",
    RejectionCode.DUPLICATE: "Choose other entities or another goal: this task already exists.",
    RejectionCode.TEST_LEAKAGE: "Do not copy benchmark tasks; invent a new situation.",
    RejectionCode.INJECTION: "Write the scenario as a customer; no instructions to the agent.",
    RejectionCode.TOO_LARGE: "Keep the task small: a few actions and short texts.",
    RejectionCode.SANDBOX_TIMEOUT: "Keep calculations simple.",
    RejectionCode.SANDBOX_CRASH: "Keep calculations simple.",
    RejectionCode.TOO_EASY: "Make the task harder: more steps or a policy condition to check.",
    RejectionCode.TOO_HARD: "Make the task clearer: state what the customer wants.",
    RejectionCode.POLICY_VIOLATION: "Each write must follow the policy: never act twice on "
    "one entity or on one whose status forbids it.",
}


@dataclass(frozen=True)
class Rejections:
    """A prompt version's rejections: how often each code, and a recent real example."""

    counts: Counter[str]
    examples: dict[str, str]

    @classmethod
    def of(cls, codes: dict[str, int], recent: list[str]) -> Rejections:
        """From the tally's code counts and recent "code<TAB>detail" lines, newest first."""
        examples: dict[str, str] = {}
        for line in recent:
            code, _, detail = line.partition("\t")
            examples.setdefault(code, detail[:EXAMPLE_CHARS])
        return cls(Counter(codes), examples)

    def most_common(self, n: int) -> list[tuple[str, int, str]]:
        return [(c, k, self.examples.get(c, "")) for c, k in self.counts.most_common(n)]


@dataclass(frozen=True)
class Written:
    """New lessons, and who wrote them ("advice", or the reflecting model)."""

    lessons: list[str]
    author: str


class LessonWriter(Protocol):
    """Writes the next version's new lessons, given the current ones and the rejections."""

    async def write(self, lessons: list[str], rejections: Rejections) -> Written: ...


class Advice:
    """Canned advice for the most frequent rejection codes, each with a real example."""

    async def write(self, lessons: list[str], rejections: Rejections) -> Written:
        written = []
        for code, _, example in rejections.most_common(NEW_LESSONS):
            if advice := ADVICE.get(_CODES.get(code, RejectionCode.SCHEMA), ""):
                written.append(f"{advice} (rejected before: {example})" if example else advice)
        return Written(written, "advice")


_CODES = {c.value: c for c in RejectionCode}


class LessonDraft(BaseModel):
    """What the reflecting LLM answers."""

    lessons: list[str] = Field(max_length=NEW_LESSONS)


REFLECT_SYSTEM = (
    "You coach a writer of test tasks for a customer-service agent that calls tools. Each "
    "task it wrote was checked by running it, and many were rejected. Read the rejections and "
    f"write at most {NEW_LESSONS} new lessons, each one short imperative sentence, that would "
    "have prevented the most frequent ones. Do not repeat a lesson it already has."
)


class Reflection:
    """An LLM reads the rejections and writes the lessons; Advice when it cannot."""

    def __init__(self, client: ChatClient, max_tokens: int, temperature: float = 0.3) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.fallback = Advice()

    async def write(self, lessons: list[str], rejections: Rejections) -> Written:
        messages = [
            {"role": "system", "content": REFLECT_SYSTEM},
            {"role": "user", "content": reflect_prompt(lessons, rejections)},
        ]
        try:
            draft = await complete_structured(
                self.client, messages, LessonDraft, schema=lesson_schema(),
                max_tokens=self.max_tokens, temperature=self.temperature,
            )  # fmt: skip
        except LLMError as error:
            log.warning("lesson reflection failed; canned advice instead", error=str(error))
            return await self.fallback.write(lessons, rejections)
        if written := cleaned(draft.lessons):
            return Written(written, self.client.model)
        log.warning("lesson reflection wrote nothing usable; canned advice instead")
        return await self.fallback.write(lessons, rejections)


def lesson_writer(client: ChatClient | None, settings: ProposerSettings) -> LessonWriter:
    """Reflection on the Proposer's endpoint where it has one and `reflect_lessons` is on."""
    if client is None or not settings.reflect_lessons:
        return Advice()
    return Reflection(client, settings.lesson_max_tokens)


def reflect_prompt(lessons: list[str], rejections: Rejections) -> str:
    have = "\n".join(f"- {lesson}" for lesson in lessons) or "(none)"
    seen = "\n".join(
        f"- {code} ({count} times){f': e.g. {example}' if example else ''}"
        for code, count, example in rejections.most_common(8)
    )
    return (
        f"Lessons it already has:\n{have}\n\nRejections, most frequent first:\n{seen}\n\n"
        'Answer as JSON: {"lessons": ["...", ...]}'
    )


def lesson_schema() -> dict[str, Any]:
    """The answer's grammar: few, short lessons, so a small model's answer closes in budget."""
    lesson = {"type": "string", "minLength": 8, "maxLength": LESSON_CHARS}
    return {
        "type": "object",
        "properties": {
            "lessons": {"type": "array", "items": lesson, "minItems": 1, "maxItems": NEW_LESSONS}
        },
        "required": ["lessons"],
        "additionalProperties": False,
    }


def cleaned(lessons: list[str]) -> list[str]:
    """Each lesson on one line, cut to LESSON_CHARS; instruction-like ones (they would reach
    the Proposer's prompt) and ones that are not prose dropped, with the reason logged."""
    kept = []
    for lesson in lessons:
        text = bounded(re.sub(r"\s+", " ", lesson), LESSON_CHARS)
        if text is None:
            log.warning("a reflected lesson was refused by the injection scan")
        elif problem := not_prose(text):
            log.info("a reflected lesson was dropped", reason=problem, lesson=text[:60])
        else:
            kept.append(text)
    return kept


def not_prose(text: str) -> str | None:
    """Why `text` is no sentence, or None. Small models degenerate into runs of digits or one
    repeated word ("1. 1. 1. …"), which is valid JSON and no lesson."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    if len(words) < MIN_WORDS:
        return f"fewer than {MIN_WORDS} words"
    if sum(map(len, words)) < len(text) / 2:
        return "mostly digits or symbols"
    if len({w.lower() for w in words}) < len(words) / 2:
        return "the same words over and over"
    return None


def accumulated(new: list[str], parent: list[str], limit: int) -> list[str]:
    """The new lessons, then the parent's, without repeats (by their words), at most
    `limit`: the oldest of the parent's drop out first."""
    merged: dict[str, str] = {}
    for lesson in [*new, *parent]:
        merged.setdefault(re.sub(r"[^a-z0-9]+", " ", lesson.lower()).strip(), lesson)
    return list(merged.values())[:limit]
