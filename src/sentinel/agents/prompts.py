"""The Proposer's self-evolving prompts (EigenData): versions, lessons and acceptance stats.

Every proposal records the prompt version and pattern it came from. Validation verdicts are
counted per version and per pattern; once a version has `revise_after` verdicts and accepts
fewer than `min_acceptance` of them, a new version is written: a LessonWriter reads its
rejections (agents.lessons: an LLM by reflection, or canned advice) and its new lessons join
the parent's, bounded. Each version's acceptance is then judged against its parent's.
Versions, counts and recent rejections live in Redis, so every Proposer replica shares them
and a restart keeps them. A proposal's origin is consumed by the transaction that counts its
verdict, so a redelivered verdict counts once and origins do not pile up; one whose verdict
never comes expires.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from sentinel.agents.lessons import Advice, LessonWriter, Rejections, accumulated
from sentinel.config import ProposerSettings
from sentinel.logs import get_logger
from sentinel.schemas import ValidationResult
from sentinel.schemas.message import utc_now

log = get_logger(__name__)

RECENT_REJECTIONS = 50
ORIGIN_TTL_S = 7 * 24 * 3600  # a verdict comes within minutes; this only bounds the orphans
REVISION_CLAIM_S = 600  # a replica that died mid-revision leaves the next one to another


class PromptVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    lessons: list[str] = Field(default_factory=list)
    reason: str = "initial"
    parent: int | None = None  # the version it revised, whose acceptance it is judged against
    author: str = "none"  # who wrote its new lessons: "advice", or the reflecting model
    created_at: datetime = Field(default_factory=utc_now)

    @property
    def name(self) -> str:
        return f"v{self.version}"


class Origin(BaseModel):
    """Where a proposal came from, remembered until its verdict arrives."""

    model_config = ConfigDict(extra="forbid")

    prompt_version: int
    pattern_id: str | None


class Tally(BaseModel):
    accepted: int = 0
    rejected: int = 0
    codes: dict[str, int] = Field(default_factory=dict)

    @property
    def verdicts(self) -> int:
        return self.accepted + self.rejected

    @property
    def acceptance(self) -> float:
        return self.accepted / self.verdicts if self.verdicts else 0.0


class Lineage(BaseModel):
    """A version's acceptance against its parent's: did its lessons help?"""

    version: int
    parent: int | None
    acceptance: float
    verdicts: int
    parent_acceptance: float | None

    @property
    def gain(self) -> float | None:
        return None if self.parent_acceptance is None else self.acceptance - self.parent_acceptance


class PromptBook:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        settings: ProposerSettings,
        writer: LessonWriter | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = f"{prefix}:proposer"
        self.writer = writer or Advice()

    def _key(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    async def current(self) -> PromptVersion:
        """The newest version; v1 (no lessons) is written on first use."""
        first = PromptVersion(version=1)
        await self.redis.hsetnx(self._key("versions"), "1", first.model_dump_json())
        versions = await self.redis.hkeys(self._key("versions"))
        newest = max(int(v) for v in versions)
        raw = await self.redis.hget(self._key("versions"), str(newest))
        return PromptVersion.model_validate_json(cast(str, raw))

    async def versions(self) -> list[PromptVersion]:
        raw = await self.redis.hvals(self._key("versions"))
        return sorted((PromptVersion.model_validate_json(r) for r in raw), key=lambda v: v.version)

    async def lineage(self) -> list[Lineage]:
        """Every version's acceptance, beside its parent's."""
        acceptance: dict[int, float] = {}
        lineage = []
        for version in await self.versions():  # oldest first: a parent before its child
            tally = await self.tally(f"version:{version.version}")
            acceptance[version.version] = tally.acceptance
            parent = None if version.parent is None else acceptance.get(version.parent)
            lineage.append(Lineage(
                version=version.version, parent=version.parent, acceptance=tally.acceptance,
                verdicts=tally.verdicts, parent_acceptance=parent,
            ))  # fmt: skip
        return lineage

    async def remember(self, proposal_id: str, origin: Origin) -> None:
        key = self._key("origin", proposal_id)
        await self.redis.set(key, origin.model_dump_json(), ex=ORIGIN_TTL_S)

    async def tally(self, scope: str) -> Tally:
        """Counts for `version:<n>` or `pattern:<id>`."""
        raw = cast(dict[str, str], await self.redis.hgetall(self._key("tally", scope)))
        codes = {k.removeprefix("code:"): int(v) for k, v in raw.items() if k.startswith("code:")}
        return Tally(
            accepted=int(raw.get("accepted", 0)), rejected=int(raw.get("rejected", 0)), codes=codes
        )

    async def streak(self, pattern_id: str) -> int:
        """Consecutive rejections of proposals for this pattern."""
        return int(await self.redis.get(self._key("streak", pattern_id)) or 0)

    async def record(self, result: ValidationResult) -> PromptVersion | None:
        """Count a verdict; returns the new prompt version if it triggered a revision."""
        origin = await self.count(result)
        if origin is None:
            return None  # not ours, another run's, or already counted: nothing to learn
        return await self._maybe_revise(origin.prompt_version)

    async def count(self, result: ValidationResult) -> Origin | None:
        """Count a verdict once per proposal: the proposal's origin is read and deleted in the
        counting transaction, so a redelivered verdict (or a second verdict for the same
        proposal) finds none. Returns the origin it counted for, None if it counted nothing."""
        key = self._key("origin", result.proposal_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    origin = Origin.model_validate_json(raw)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(key)
                    self._tally(pipe, origin, result)
                    await pipe.execute()
                    return origin
                except WatchError:
                    continue  # another replica touched it: read again

    def _tally(self, pipe: Pipeline, origin: Origin, result: ValidationResult) -> None:
        verdict = "accepted" if result.accepted else "rejected"
        scopes = [f"version:{origin.prompt_version}"]
        if origin.pattern_id:
            scopes.append(f"pattern:{origin.pattern_id}")
        for scope in scopes:
            pipe.hincrby(self._key("tally", scope), verdict, 1)
            for reason in result.reasons:
                pipe.hincrby(self._key("tally", scope), f"code:{reason.code.value}", 1)
        if origin.pattern_id:
            streak = self._key("streak", origin.pattern_id)
            if result.accepted:
                pipe.delete(streak)
            else:
                pipe.incr(streak)
        for reason in result.reasons:
            recent = self._key("rejections", origin.prompt_version)
            pipe.lpush(recent, f"{reason.code.value}\t{reason.detail[:300]}")
            pipe.ltrim(recent, 0, RECENT_REJECTIONS - 1)

    async def _maybe_revise(self, version: int) -> PromptVersion | None:
        tally = await self.tally(f"version:{version}")
        current = await self.current()
        if (
            version != current.version
            or tally.verdicts < self.settings.revise_after
            or tally.acceptance >= self.settings.min_acceptance
        ):
            return None
        # One replica writes the lessons (an LLM call): the others see the claim and go on.
        claim = self._key("revising", version + 1)
        if not await self.redis.set(claim, "1", nx=True, ex=REVISION_CLAIM_S):
            return None
        recent = cast(list[str], await self.redis.lrange(self._key("rejections", version), 0, -1))
        new = await self.writer.write(current.lessons, Rejections.of(tally.codes, recent))
        revised = PromptVersion(
            version=version + 1,
            lessons=accumulated(new.lessons, current.lessons, self.settings.max_lessons),
            reason=f"v{version} accepted {tally.accepted}/{tally.verdicts}",
            parent=version,
            author=new.author,
        )
        created = await self.redis.hsetnx(
            self._key("versions"), str(revised.version), revised.model_dump_json()
        )
        if not created:
            return None  # another replica revised it first (a claim that expired)
        log.info(
            "proposer prompt revised",
            version=revised.name,
            reason=revised.reason,
            author=revised.author,
            lessons=revised.lessons,
            rejections=tally.codes,
        )
        return revised
