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
MAX_EXAMPLES = 20  # trajectory ids a merged pattern keeps (controller.max_examples' default)
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
        self.merged_key = f"{prefix}:patterns:merged"
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
        founds its own pattern, unless a merge absorbed it), most similar tools and text."""
        best: tuple[float, float, ErrorPattern] | None = None
        text = words(f"{diagnosis.summary} {' '.join(diagnosis.evidence)}")
        kind = kind_key(diagnosis.category, diagnosis.kind)
        for pattern in patterns:
            if kind != kind_key(pattern.category, pattern.kind) and kind not in pattern.absorbed:
                continue
            tools = jaccard(pattern.tools, diagnosis.tools)
            if tools < self.merge_similarity:
                continue
            score = (tools, jaccard(words(pattern.description), text), pattern)
            if best is None or score[:2] > best[:2]:
                best = score
        return best[2] if best else None

    async def merge(self, into_id: str, other_id: str) -> ErrorPattern | None:
        """Fold pattern `other_id` into `into_id` (the Controller's consolidation): counts,
        evidence and tools joined, and `other`'s kinds absorbed, so its later diagnoses join
        `into`. `other` leaves the library; `merged` maps it to `into` for the report and
        for tasks proposed for it. None when either is gone (a concurrent merge or
        retirement) or they are the same."""
        if into_id == other_id:
            return None
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.key)
                    into_raw, other_raw = await pipe.hmget(self.key, [into_id, other_id])
                    if into_raw is None or other_raw is None:
                        return None
                    merged = combine(
                        ErrorPattern.model_validate_json(into_raw),
                        ErrorPattern.model_validate_json(other_raw),
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.key, into_id, merged.model_dump_json())
                    pipe.hdel(self.key, other_id)
                    pipe.hset(self.merged_key, other_id, into_id)
                    await pipe.execute()
                    return merged
                except WatchError:
                    continue

    async def merged(self) -> dict[str, str]:
        """Merged pattern id -> the id it was merged into."""
        raw = await self.redis.hgetall(self.merged_key)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def describe(self, pattern_id: str, description: str) -> None:
        """A new description, summarised from the pattern's recent evidence."""
        await self._update(
            pattern_id, lambda p: p.model_copy(update={"description": description[:1000]})
        )

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


def kind_key(category: FailureCategory, kind: str | None) -> str:
    """A (category, kind) as one string: `ErrorPattern.absorbed`'s entries."""
    return f"{category.value}/{kind}" if kind else category.value


def combine(into: ErrorPattern, other: ErrorPattern) -> ErrorPattern:
    """`other` folded into `into`: per-version counts summed, tools and examples joined,
    the newest evidence kept, the larger steering weight."""
    frequency = dict(into.frequency)
    for version, count in other.frequency.items():
        frequency[version] = frequency.get(version, 0) + count
    absorbed = [kind_key(other.category, other.kind), *other.absorbed, *into.absorbed]
    own = kind_key(into.category, into.kind)
    return into.model_copy(
        update={
            "tools": list(dict.fromkeys([*into.tools, *other.tools]))[:MAX_TOOLS],
            "example_trajectory_ids": list(
                dict.fromkeys([*other.example_trajectory_ids, *into.example_trajectory_ids])
            )[-MAX_EXAMPLES:],
            "evidence": [*other.evidence, *into.evidence][-MAX_EVIDENCE:],
            "frequency": frequency,
            "weight": max(into.weight, other.weight),
            "absorbed": [k for k in dict.fromkeys(absorbed) if k != own][:64],
            "updated_at": utc_now(),
        }
    )


def overlapping(
    patterns: Sequence[ErrorPattern], similarity: float
) -> list[tuple[ErrorPattern, ErrorPattern]]:
    """The deterministic merges: two patterns of one (category, kind) whose tools, grown
    since they were founded apart, now overlap by at least `similarity`. Each pair is
    (the more frequent, the other); a pattern is in one pair at most."""
    ranked = sorted(patterns, key=lambda p: (-sum(p.frequency.values()), p.id))
    pairs, used = [], set()
    for i, into in enumerate(ranked):
        for other in ranked[i + 1 :]:
            if into.id in used or other.id in used:
                continue
            same_kind = kind_key(into.category, into.kind) == kind_key(other.category, other.kind)
            if same_kind and jaccard(into.tools, other.tools) >= similarity:
                pairs.append((into, other))
                used |= {into.id, other.id}
    return pairs


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
