"""The error-pattern library: the Solver's recurring weaknesses, persisted in Redis.

Each diagnosis joins the most similar pattern of its category (near-duplicates merge) or
founds a new one. A pattern counts its diagnoses per policy version, and the library counts
all diagnoses per version, so a pattern's share of the failures shows whether training on
it helped. Adding is one optimistic transaction (WATCH/MULTI) and idempotent per diagnosis
id, so concurrent Controllers and redelivered messages never double-count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from sentinel.schemas import ErrorPattern, FailureCategory, FailureDiagnosis
from sentinel.schemas.failure import PatternEvidence
from sentinel.schemas.message import utc_now

MAX_TOOLS = 5
MAX_EVIDENCE = 3  # the newest failures a pattern carries for the Proposer
_WORD = re.compile(r"[a-z0-9_#]+")


@dataclass(frozen=True)
class Added:
    pattern: ErrorPattern
    created: bool
    counted: bool  # False: this diagnosis was already in the library


def jaccard(a: Sequence[str] | set[str], b: Sequence[str] | set[str]) -> float:
    left, right = set(a), set(b)
    return len(left & right) / len(left | right) if left or right else 1.0


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def general_patterns(write_tools: Iterable[str]) -> list[ErrorPattern]:
    """The `synthetic` baseline's patterns: one per write tool, tied to no failure."""
    return [
        ErrorPattern(
            id=f"general-{tool}",
            title=f"Use {tool} correctly",
            description=f"A general task whose goal needs {tool}; not tied to a failure.",
            category=FailureCategory.OTHER,
            tools=[tool],
        )
        for tool in sorted(write_tools)
    ]


def title_of(diagnosis: FailureDiagnosis) -> str:
    where = f" in {', '.join(diagnosis.tools[:2])}" if diagnosis.tools else ""
    return f"{(diagnosis.kind or diagnosis.category.value).replace('_', ' ')}{where}"


class PatternLibrary:
    def __init__(self, redis: aioredis.Redis, prefix: str, merge_similarity: float = 0.5) -> None:
        self.redis = redis
        self.key = f"{prefix}:patterns"
        self.counted_key = f"{prefix}:patterns:counted"
        self.failures_key = f"{prefix}:patterns:failures"
        self.retired_key = f"{prefix}:patterns:retired"
        self.merge_similarity = merge_similarity

    async def add(self, diagnosis: FailureDiagnosis, max_examples: int = 20) -> Added:
        """Merge `diagnosis` into the library; retried until no concurrent writer interferes."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key, self.counted_key)
                    patterns = _parse(await pipe.hvals(self.key))
                    seen = await pipe.sismember(self.counted_key, diagnosis.id)
                    match = self.match(patterns, diagnosis)
                    if seen:
                        assert match is not None, "a counted diagnosis always has a pattern"
                        return Added(match, created=False, counted=False)
                    pattern = _merge(match, diagnosis, max_examples)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.key, pattern.id, pattern.model_dump_json())
                    pipe.sadd(self.counted_key, diagnosis.id)
                    pipe.hincrby(self.failures_key, str(diagnosis.policy_version), 1)
                    await pipe.execute()
                    return Added(pattern, created=match is None, counted=True)
                except WatchError:
                    continue

    def match(
        self, patterns: Sequence[ErrorPattern], diagnosis: FailureDiagnosis
    ) -> ErrorPattern | None:
        """The pattern this diagnosis belongs to: same category and named kind (a new kind
        founds its own pattern), most similar tools and text."""
        best: tuple[float, float, ErrorPattern] | None = None
        text = words(f"{diagnosis.summary} {' '.join(diagnosis.evidence)}")
        for pattern in patterns:
            if (pattern.category, pattern.kind) != (diagnosis.category, diagnosis.kind):
                continue
            tools = jaccard(pattern.tools, diagnosis.tools)
            if tools < self.merge_similarity:
                continue
            score = (tools, jaccard(words(pattern.description), text), pattern)
            if best is None or score[:2] > best[:2]:
                best = score
        return best[2] if best else None

    async def set_weight(self, pattern_id: str, weight: float) -> None:
        """Steering's verdict on the pattern (orchestrator.steering)."""
        await self._update(pattern_id, lambda p: p.model_copy(update={"weight": weight}))

    async def retire(self, pattern_id: str) -> None:
        """Out of the library: no diagnosis joins it again (a like one founds a new pattern).
        Kept under `retired`, for the report."""
        await self._update(pattern_id, None)

    async def retired(self) -> list[ErrorPattern]:
        return _parse(await self.redis.hvals(self.retired_key))

    async def _update(
        self, pattern_id: str, change: Callable[[ErrorPattern], ErrorPattern] | None
    ) -> None:
        """Rewrite one pattern (None: move it to `retired`) in a transaction, so a diagnosis
        counted meanwhile is not lost."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key)
                    raw = await pipe.hget(self.key, pattern_id)
                    if raw is None:
                        return
                    pattern = ErrorPattern.model_validate_json(raw)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if change is None:
                        pipe.hdel(self.key, pattern_id)
                        pipe.hset(self.retired_key, pattern_id, pattern.model_dump_json())
                    else:
                        pipe.hset(self.key, pattern_id, change(pattern).model_dump_json())
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def all(self) -> list[ErrorPattern]:
        """Every pattern, most frequent first."""
        patterns = _parse(await self.redis.hvals(self.key))
        return sorted(patterns, key=lambda p: -sum(p.frequency.values()))

    async def get(self, pattern_id: str) -> ErrorPattern | None:
        raw = await self.redis.hget(self.key, pattern_id)
        return ErrorPattern.model_validate_json(raw) if raw else None

    async def failures(self) -> dict[int, int]:
        """Diagnosed failures per policy version: the denominator of each pattern's share."""
        raw = await self.redis.hgetall(self.failures_key)
        return {int(version): int(count) for version, count in raw.items()}

    async def trend(self, pattern: ErrorPattern) -> dict[int, float]:
        """The pattern's share of all diagnosed failures, per policy version."""
        failures = await self.failures()
        return {
            version: pattern.frequency.get(version, 0) / total
            for version, total in sorted(failures.items())
            if total
        }


def _parse(raw: Sequence[str | bytes]) -> list[ErrorPattern]:
    return [ErrorPattern.model_validate_json(item) for item in raw]


def _merge(
    pattern: ErrorPattern | None, diagnosis: FailureDiagnosis, max_examples: int
) -> ErrorPattern:
    evidence = PatternEvidence(
        trajectory_id=diagnosis.trajectory_id, summary=diagnosis.summary,
        excerpt=diagnosis.excerpt,
    )  # fmt: skip
    if pattern is None:
        return ErrorPattern(
            title=title_of(diagnosis),
            description=_describe(diagnosis),
            category=diagnosis.category,
            kind=diagnosis.kind,
            tools=diagnosis.tools[:MAX_TOOLS],
            example_trajectory_ids=[diagnosis.trajectory_id],
            evidence=[evidence],
            frequency={diagnosis.policy_version: 1},
        )
    tools = [*pattern.tools, *(t for t in diagnosis.tools if t not in pattern.tools)]
    examples = [*pattern.example_trajectory_ids, diagnosis.trajectory_id][-max_examples:]
    frequency = dict(pattern.frequency)
    frequency[diagnosis.policy_version] = frequency.get(diagnosis.policy_version, 0) + 1
    return pattern.model_copy(
        update={
            "tools": tools[:MAX_TOOLS],
            "example_trajectory_ids": examples,
            "evidence": [*pattern.evidence, evidence][-MAX_EVIDENCE:],
            "frequency": frequency,
            "updated_at": utc_now(),
        }
    )


def _describe(diagnosis: FailureDiagnosis) -> str:
    """The founding diagnosis in words: its summary, then the deterministic evidence."""
    details = [s.detail for s in diagnosis.signals[:3]]
    return " ".join([diagnosis.summary, *(f"e.g. {d}." for d in details)])[:1000]
