"""Steering the Proposer by each pattern's share of the failures over policy versions.

SENTINEL's claim is that tasks aimed at the Solver's recurring errors make those errors
recede. So a pattern's share of the diagnosed failures, version by version, decides how many
tasks it gets next (its `weight`, which the Proposer multiplies into `tasks_per_pattern`):

- **persistent** (its share held or grew): more tasks, `persistent_weight`;
- **shrinking** (its share fell by more than `shrink_tolerance`): fewer, `shrinking_weight`;
- **vanished** (no diagnosis in its last `vanish_after` judged versions): retired from the
  library, and its tasks leave the pool, so nothing keeps drilling a solved weakness;
- anything with too little history keeps weight 1.

Only *finished* versions are judged (older than the newest one seen), each with at least
`min_failures` diagnoses, so a share is never read off a version still being rolled out.
Steering runs once per new version across Controller replicas (a claim key in Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sentinel.config import SteeringSettings
from sentinel.logs import get_logger
from sentinel.orchestrator.patterns import PatternLibrary
from sentinel.orchestrator.pool import TaskPool
from sentinel.schemas import ErrorPattern

log = get_logger(__name__)

CLAIM_TTL_S = 24 * 3600


class Fate(StrEnum):
    NEW = "new"  # too little history to judge
    PERSISTENT = "persistent"
    SHRINKING = "shrinking"
    VANISHED = "vanished"


@dataclass(frozen=True)
class Judged:
    fate: Fate
    weight: float
    shares: dict[int, float]  # the judged versions' shares, oldest first


def judge(
    pattern: ErrorPattern, failures: dict[int, int], before: int, settings: SteeringSettings
) -> Judged:
    """The pattern's fate from the versions before `before` with enough failures to judge."""
    versions = sorted(v for v, n in failures.items() if v < before and n >= settings.min_failures)
    born = min(pattern.frequency, default=before)
    shares = {v: pattern.frequency.get(v, 0) / failures[v] for v in versions if v >= born}
    recent = list(shares.values())[-settings.vanish_after :]
    if len(recent) == settings.vanish_after and not any(recent) and any(shares.values()):
        return Judged(Fate.VANISHED, 0.0, shares)
    if len(shares) < 2:
        return Judged(Fate.NEW, 1.0, shares)
    *earlier, now = shares.values()
    baseline = sum(earlier) / len(earlier)
    if now < baseline * (1 - settings.shrink_tolerance):
        return Judged(Fate.SHRINKING, settings.shrinking_weight, shares)
    return Judged(Fate.PERSISTENT, settings.persistent_weight, shares)


class Steering:
    """Judges every pattern once per new policy version and acts on the verdicts."""

    def __init__(self, library: PatternLibrary, pool: TaskPool, settings: SteeringSettings) -> None:
        self.library = library
        self.pool = pool
        self.settings = settings
        self._seen = -1  # the newest version this process has claimed or seen claimed

    async def on_version(self, version: int) -> dict[str, Judged] | None:
        """Steer by the versions before `version`, unless a replica already did (None).
        Called per trajectory: a version this process has seen costs no Redis call."""
        if version <= self._seen:
            return None
        self._seen = version
        claim = f"{self.library.key}:steered:{version}"
        if not await self.library.redis.set(claim, "1", nx=True, ex=CLAIM_TTL_S):
            return None
        failures = await self.library.failures()
        verdicts: dict[str, Judged] = {}
        for pattern in await self.library.all():
            judged = judge(pattern, failures, version, self.settings)
            verdicts[pattern.id] = judged
            if judged.fate is Fate.VANISHED:
                await self._retire(pattern, version)
            elif judged.weight != pattern.weight:
                await self.library.set_weight(pattern.id, judged.weight)
        log.info(
            "patterns steered",
            version=version,
            fates={pid: j.fate.value for pid, j in verdicts.items()},
        )
        return verdicts

    async def _retire(self, pattern: ErrorPattern, version: int) -> None:
        await self.library.retire(pattern.id)
        removed = await self.pool.remove_pattern(pattern.id)
        log.info("pattern retired", pattern=pattern.id, version=version, tasks_removed=removed)
