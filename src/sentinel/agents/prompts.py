"""The Proposer's self-evolving prompts (EigenData): versions, lessons and acceptance stats.

Every proposal records the prompt version and pattern it came from. Validation verdicts are
counted per version and per pattern; once a version has `revise_after` verdicts and accepts
fewer than `min_acceptance` of them, a new version is written whose lessons come from its
most frequent rejection reasons, with a real example of each. Versions, counts and recent
rejections live in Redis, so every Proposer replica shares them and a restart keeps them.
A proposal's origin is consumed by the transaction that counts its verdict, so a redelivered
verdict counts once and origins do not pile up; one whose verdict never comes expires.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import cast

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from sentinel.config import ProposerSettings
from sentinel.logs import get_logger
from sentinel.schemas import RejectionCode, ValidationResult
from sentinel.schemas.message import utc_now

log = get_logger(__name__)

RECENT_REJECTIONS = 50
ORIGIN_TTL_S = 7 * 24 * 3600  # a verdict comes within minutes; this only bounds the orphans

ADVICE: dict[RejectionCode, str] = {
    RejectionCode.SCHEMA: "Write complete, valid JSON with every field, and keep texts short.",
    RejectionCode.UNKNOWN_TOOL: "Use only the tools listed; never invent a tool.",
    RejectionCode.BAD_ARGUMENTS: "Give each tool exactly its arguments, with the right types.",
    RejectionCode.UNKNOWN_ENTITY: "Use only ids listed under Entities, copied exactly.",
    RejectionCode.GOLD_WRITE_FAILED: "Each write must be allowed in the entity's current state "
    "(e.g. cancel or modify only pending orders; return or exchange only delivered ones).",
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


class PromptVersion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    lessons: list[str] = Field(default_factory=list)
    reason: str = "initial"
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


class PromptBook:
    def __init__(self, redis: aioredis.Redis, prefix: str, settings: ProposerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.prefix = f"{prefix}:proposer"

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
        revised = PromptVersion(
            version=version + 1,
            lessons=await self._lessons(version, tally),
            reason=f"v{version} accepted {tally.accepted}/{tally.verdicts}",
        )
        created = await self.redis.hsetnx(
            self._key("versions"), str(revised.version), revised.model_dump_json()
        )
        if not created:
            return None  # another replica revised it first
        log.info(
            "proposer prompt revised",
            version=revised.name,
            reason=revised.reason,
            lessons=revised.lessons,
            rejections=tally.codes,
        )
        return revised

    async def _lessons(self, version: int, tally: Tally) -> list[str]:
        """Advice for the most frequent rejection codes, each with a recent real example."""
        recent = cast(list[str], await self.redis.lrange(self._key("rejections", version), 0, -1))
        examples: dict[str, str] = {}
        for line in recent:
            code, _, detail = line.partition("\t")
            examples.setdefault(code, detail)
        lessons = []
        for code, _ in Counter(tally.codes).most_common(self.settings.max_lessons):
            advice = ADVICE.get(RejectionCode(code), "")
            example = examples.get(code, "")
            lessons.append(f"{advice} (rejected before: {example[:160]})" if example else advice)
        return lessons
