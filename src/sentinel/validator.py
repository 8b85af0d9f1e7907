"""Validation: only tasks that are runnable, checkable and new join the pool.

A proposal goes through stages, cheapest first; the first stage that finds problems ends it,
with every problem that stage found as a machine-readable reason for the Proposer:

1. static checks, without an environment: size, domain, gold actions present, known tools,
   arguments that match each tool's parameters, entity ids that exist in the database, and
   no prompt-injection text in any string of the task (`sentinel.injection`);
2. the gold actions replayed in a sandboxed child (`envs.sandbox`): every gold write must
   succeed, and a task with writes must change the database;
3. a discriminative checker: by tau2's reward, the no-op trajectory and one of only the gold
   reads must both fail; and the task's own checks (`envs.checks`: state predicates derived
   from the gold run, plus any it carried) must fail on the initial state, as they do on the
   near misses the replay tried (a wrong id, value or count; a write left out);
4. novelty: no test-split task may share its gold-action signature or a near-identical
   scenario (leakage), and neither may a task already in the pool (duplicate);
5. optionally, a difficulty probe: K Solver rollouts must solve it sometimes, not always.

An accepted task claims its signature in the pool index atomically, so of two concurrent
duplicates one is accepted. Bad input never raises; only infrastructure failures do.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import anyio
import redis.asyncio as aioredis
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from sentinel import injection, lsh
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.signals import failure_signals, primary_category
from sentinel.config import Settings, ValidationSettings
from sentinel.envs.base import Environment, id_arguments
from sentinel.envs.pack import StatusWalk
from sentinel.envs.registry import load, named
from sentinel.envs.sandbox import (
    LocalProcessSandbox,
    ReplayOutcome,
    ReplayRequest,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
)
from sentinel.logs import get_logger
from sentinel.orchestrator.policy import current_policy
from sentinel.schemas import (
    Action,
    FailureCategory,
    PolicyVersion,
    RejectionCode,
    RejectionReason,
    RewardBasis,
    Task,
    TaskProposal,
    UserInstructions,
    ValidationResult,
)

log = get_logger(__name__)

Reasons = list[RejectionReason]
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}
SHINGLE = 3


@dataclass(frozen=True)
class Probed:
    """What K rollouts of the Solver made of a task."""

    solve_rate: float
    failures: list[FailureCategory]  # each failed rollout's primary category, by the signals
    policy_version: int


class DifficultyProbe(Protocol):
    async def probe(self, task: Task, k: int) -> Probed: ...


class RolloutProbe:
    """The difficulty probe: K concurrent rollouts of the current Solver on the task, the
    newest policy version the loop announced (looked up per probe, so a task is judged by
    the Solver that will train on it, not the base weights). One runner per served policy;
    the older is closed when a newer one takes over."""

    def __init__(
        self,
        runner_for: Callable[[PolicyVersion], RolloutRunner],
        current: Callable[[], Awaitable[PolicyVersion]],
    ) -> None:
        self.runner_for = runner_for
        self.current = current
        self._runner: tuple[int, RolloutRunner] | None = None

    async def probe(self, task: Task, k: int) -> Probed:
        policy = await self.current()
        if self._runner is None or self._runner[0] != policy.version:
            if self._runner is not None:
                await self._runner[1].aclose()
            self._runner = (policy.version, self.runner_for(policy))
        runner = self._runner[1]
        group = await runner.run_group(task, k)
        failed = [t for t in group.trajectories if not t.succeeded]
        categories = [
            primary_category(
                await anyio.to_thread.run_sync(failure_signals, task, t, runner.domain)
            )
            for t in failed
        ]
        solved = sum(t.succeeded for t in group.trajectories)
        return Probed(solved / max(1, len(group.trajectories)), categories, policy.version)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner[1].aclose()
            self._runner = None


class TaskIndex(Protocol):
    """What the pool already holds, for de-duplication."""

    async def duplicate_of(self, signature: str, shingles: frozenset[str], task_id: str,
                           threshold: float) -> str | None: ...  # fmt: skip

    async def claim(
        self, signature: str, shingles: frozenset[str], task_id: str, threshold: float
    ) -> str | None:
        """Record the task, atomically with a last duplicate check; a duplicate's id if any."""
        ...


def _reason(code: RejectionCode, detail: str) -> RejectionReason:
    return RejectionReason(code=code, detail=detail[:500])


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return (
            sorted(items, key=json.dumps) if all(not isinstance(v, dict) for v in items) else items
        )
    return value


def gold_signature(task: Task, write_tools: Iterable[str]) -> str:
    """What the task makes happen: its writes (its reads if it has none), canonicalized:
    sorted keys, sorted id lists, lower-cased strings, in any order."""
    writes = frozenset(write_tools)
    actions = task.actions
    chosen = [a for a in actions if a.name in writes] or actions
    canonical = sorted(json.dumps([a.name, _canonical(a.arguments)]) for a in chosen)
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()[:32]


def scenario_shingles(task: Task) -> frozenset[str]:
    """Word 3-shingles of what the user simulator is told, for near-duplicate detection."""
    instructions = task.spec.user_scenario.instructions
    if isinstance(instructions, UserInstructions):
        parts = [instructions.reason_for_call, instructions.known_info or "",
                 instructions.unknown_info or "", instructions.task_instructions]  # fmt: skip
        text = " ".join(parts)
    else:
        text = instructions
    words = re.findall(r"[a-z0-9#_@.]+", text.lower())
    return frozenset(" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - 2)))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_PROPOSAL_ID = re.compile(r'^\s*\{\s*"id"\s*:\s*"([^"]{1,200})"')
_TASK_ID = re.compile(r'"task"\s*:\s*\{\s*"id"\s*:\s*"([^"]{1,200})"')


def reject_unparseable(raw: str, error: ValidationError | ValueError) -> ValidationResult:
    """The verdict on a payload that is not a TaskProposal (truncated JSON, wrong fields):
    its ids salvaged from the text where they can be, so the verdict still finds its way."""
    proposal_id, task_id = _PROPOSAL_ID.search(raw), _TASK_ID.search(raw)
    digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
    return ValidationResult(
        proposal_id=proposal_id.group(1) if proposal_id else f"unparseable-{digest}",
        task_id=task_id.group(1) if task_id else "unknown",
        accepted=False,
        reasons=[_reason(RejectionCode.SCHEMA, f"not a valid TaskProposal: {error}")],
    )


class RedisTaskIndex:
    """Signatures and scenario shingles of the pool's tasks, seeded with the train split.

    A lookup reads one signature and the stored shingles of the tasks in the proposal's LSH
    buckets (`sentinel.lsh`), never the whole pool; check and claim are one Lua script."""

    def __init__(self, redis: aioredis.Redis, prefix: str, domain: Environment) -> None:
        self.redis = redis
        self.domain = domain
        base = f"{prefix}:pool:{domain.name}"
        self.signatures = f"{base}:signatures"  # signature -> task id
        self.scenarios = f"{base}:scenarios"  # task id -> shingles JSON
        self.buckets = f"{base}:lsh"  # {buckets}:{band}:{digest} -> set of task ids
        self.seeded = f"{base}:seeded"  # lsh.VERSION once the train split and buckets are in
        self.script = redis.register_script(lsh.CHECK_AND_CLAIM)
        self._seeded = False
        self._seeding = anyio.Lock()

    async def _seed(self) -> None:
        async with self._seeding:
            if not self._seeded and await self.redis.get(self.seeded) != lsh.VERSION:
                await self._seed_once()
            self._seeded = True

    async def _seed_once(self) -> None:
        """The train split, and buckets for tasks claimed before this version (one pass;
        idempotent, so processes starting together may both run it)."""
        writes = self.domain.write_tools
        async with self.redis.pipeline(transaction=False) as pipe:
            for task in self.domain.tasks("train"):
                shingles = scenario_shingles(task)
                pipe.hsetnx(self.signatures, gold_signature(task, writes), task.id)
                pipe.hsetnx(self.scenarios, task.id, json.dumps(sorted(shingles)))
                for bucket in lsh.bands(shingles):
                    pipe.sadd(f"{self.buckets}:{bucket}", task.id)
            await pipe.execute()
        async for task_id, raw in self.redis.hscan_iter(self.scenarios, count=500):
            for bucket in lsh.bands(frozenset(json.loads(raw))):
                await self.redis.sadd(f"{self.buckets}:{bucket}", task_id)
        await self.redis.set(self.seeded, lsh.VERSION)

    async def _run(
        self, signature: str, shingles: frozenset[str], task_id: str, threshold: float, claim: bool
    ) -> str | None:
        await self._seed()
        keys = [self.signatures, self.scenarios]
        keys += [f"{self.buckets}:{bucket}" for bucket in lsh.bands(shingles)]
        args: list[str] = [signature, task_id, json.dumps(sorted(shingles)), repr(threshold)]
        args.append("1" if claim else "0")
        holder = await self.script(keys=keys, args=args)
        return None if holder is None else str(holder)

    async def duplicate_of(
        self, signature: str, shingles: frozenset[str], task_id: str, threshold: float
    ) -> str | None:
        return await self._run(signature, shingles, task_id, threshold, claim=False)

    async def claim(
        self, signature: str, shingles: frozenset[str], task_id: str, threshold: float
    ) -> str | None:
        """Check again and record, atomically: two concurrent near-duplicates cannot both
        get in, and a redelivered task finds its own claim."""
        return await self._run(signature, shingles, task_id, threshold, claim=True)


def local_sandbox(settings: ValidationSettings, domain: str) -> LocalProcessSandbox:
    """The sandbox the settings describe: child processes on this machine, reused."""
    limits = SandboxLimits(
        cpu_s=settings.cpu_s, memory_mb=settings.memory_mb, wall_s=settings.wall_s
    )
    return LocalProcessSandbox(
        limits, warm=settings.warm, preload=(domain,), max_concurrency=settings.max_concurrency,
        replays_per_child=settings.replays_per_child,
        isolation="off" if settings.allow_no_network_isolation else "require",
    )  # fmt: skip


async def open_validator(
    settings: Settings, redis: aioredis.Redis, stack: AsyncExitStack, domain: str | None = None
) -> Validator:
    """The validator as a `validate` worker runs it: tau2's domain, the local sandbox, the
    pool index in Redis and, when configured, the difficulty probe on the policy endpoint.
    What it opens is closed by `stack`."""
    v = settings.validation
    tau2 = await anyio.to_thread.run_sync(load, named(domain) if domain else settings.env)
    sandbox = local_sandbox(v, tau2.name)
    stack.push_async_callback(sandbox.aclose)
    index = RedisTaskIndex(redis, settings.bus.prefix, tau2)
    probe = None
    if v.probe_rollouts:  # the current Solver on the policy endpoint
        probe = RolloutProbe(
            lambda p: RolloutRunner.from_settings(settings, tau2, p.served_name, p.version),
            partial(current_policy, redis, settings.bus.prefix, settings.llm.policy.model),
        )
        stack.push_async_callback(probe.aclose)
    return Validator(tau2, sandbox, v, index, probe)


class Validator:
    def __init__(
        self,
        domain: Environment,
        sandbox: Sandbox,
        settings: ValidationSettings,
        index: TaskIndex,
        probe: DifficultyProbe | None = None,
    ) -> None:
        self.domain = domain
        self.sandbox = sandbox
        self.settings = settings
        self.index = index
        self.probe = probe
        self.limits = SandboxLimits(
            cpu_s=settings.cpu_s, memory_mb=settings.memory_mb, wall_s=settings.wall_s
        )  # the same as local_sandbox's, so requests use its pool
        self.parameters = {
            s["function"]["name"]: s["function"].get("parameters", {}) for s in domain.tool_schemas
        }
        self.test = [
            (t.id, gold_signature(t, domain.write_tools), scenario_shingles(t))
            for t in domain.tasks("test")
        ]

    async def validate(self, proposal: TaskProposal, *, claim: bool = True) -> ValidationResult:
        """The verdict; an accepted task claims its place in the pool index unless `claim`
        is False (a dry run, as `sentinel validate` does: the pool is left unchanged)."""
        start = time.perf_counter()
        task = proposal.task
        verdict: dict[str, Any] = {}
        reasons = self.static(proposal)
        if not reasons:
            request = ReplayRequest(
                domain=self.domain.name, task=task, limits=self.limits,
                near_misses=self.settings.near_misses,
            )  # fmt: skip
            outcome = await self.sandbox.replay(request)
            reasons = self.replayed(task, outcome) or self.discriminative(task, outcome)
            verdict |= {
                "target_db_hash": outcome.db_hash_after, "checks": outcome.checks,
                "near_misses": len(outcome.near_misses),
                "near_misses_caught": sum(m.caught for m in outcome.near_misses),
            }  # fmt: skip
        if not reasons:
            reasons = await self.novel(task)
        if not reasons and self.probe is not None and self.settings.probe_rollouts:
            reasons = await self.difficulty(task, verdict)
        if not reasons and claim:
            reasons = await self.claim(task)
        return ValidationResult(
            proposal_id=proposal.id,
            task_id=task.id,
            accepted=not reasons,
            reasons=reasons,
            duration_s=time.perf_counter() - start,
            **verdict,
        )

    # --- 1. static -----------------------------------------------------------------------

    def static(self, proposal: TaskProposal) -> Reasons:
        task = proposal.task
        try:
            size = len(proposal.model_dump_json())
        except PydanticSerializationError as error:  # nested past the serializer's limit
            return [_reason(RejectionCode.SCHEMA, f"cannot be serialized: {error}")]
        if size > self.settings.max_task_chars:
            detail = f"{size} characters (at most {self.settings.max_task_chars})"
            return [_reason(RejectionCode.TOO_LARGE, detail)]
        reasons = self._shape(task)
        if reasons:
            return reasons
        for i, action in enumerate(task.actions):
            reasons += self._action(i, action)
        reasons += self._calls(task) + self._rules(task)
        return reasons + self._injection(task)

    def _shape(self, task: Task) -> Reasons:
        actions, criteria = task.actions, task.spec.evaluation_criteria
        if task.domain != self.domain.name:
            return [
                _reason(RejectionCode.SCHEMA, f"domain {task.domain!r}, not {self.domain.name!r}")
            ]
        if task.provenance.split == "test":
            return [_reason(RejectionCode.TEST_LEAKAGE, "claims to be a test-split task")]
        if not actions:
            return [_reason(RejectionCode.SCHEMA, "no gold actions: nothing to check")]
        if len(actions) > self.settings.max_actions:
            detail = f"{len(actions)} gold actions (at most {self.settings.max_actions})"
            return [_reason(RejectionCode.TOO_LARGE, detail)]
        if criteria and RewardBasis.NL_ASSERTION in criteria.reward_basis:
            return [_reason(RejectionCode.SCHEMA, "NL assertions need an LLM judge")]
        return []

    def _action(self, i: int, action: Action) -> Reasons:
        where = f"action {i} ({action.name})"
        if action.requestor == "user":  # its name is checked by `_calls`
            schema = self.domain.user_tool_schemas.get(action.name)
            return [] if schema is None else self._arguments(where, action.arguments, schema)
        if action.name not in self.parameters:
            valid = ", ".join(sorted(self.parameters))
            return [
                _reason(RejectionCode.UNKNOWN_TOOL, f"{where}: no such tool; use one of {valid}")
            ]
        reasons = self._arguments(where, action.arguments, self.parameters[action.name])
        for name, value in id_arguments(action.arguments):
            if value not in self.domain.entities.ids:
                detail = f"{where}: {name} {value!r} does not exist"
                reasons.append(_reason(RejectionCode.UNKNOWN_ENTITY, detail))
        return reasons

    def _calls(self, task: Task) -> Reasons:
        """tau2 must read the task, and every function its initial state, env assertions and
        user actions name must be on the domain's allow-lists: tau2 dispatches them with
        `getattr`, in the reward path too."""
        if problems := self.domain.spec_problems(task):
            return [_reason(RejectionCode.SCHEMA, f"not a valid task: {p}") for p in problems]
        return [_reason(RejectionCode.UNKNOWN_TOOL, p) for p in self.domain.call_problems(task)]

    def _rules(self, task: Task) -> Reasons:
        """A perfect agent keeps the domain's state rules (`DomainPack.rules`): a gold write
        that breaks one (airline's tools let a reservation be cancelled twice) teaches the
        opposite. Checked from the database's own statuses, so only without an initial state."""
        if task.spec.initial_state is not None:
            return []
        walk = StatusWalk(self.domain.pack.rules, self.domain.entities.status)
        return [
            _reason(RejectionCode.POLICY_VIOLATION, f"action {i}: {broken}")
            for i, a in enumerate(task.actions)
            if a.requestor == "assistant" and (broken := walk.step(a.name, a.arguments))
        ]

    def _arguments(self, where: str, arguments: dict[str, Any], schema: dict[str, Any]) -> Reasons:
        properties: dict[str, Any] = schema.get("properties", {})
        problems = [
            f"missing {name!r}" for name in schema.get("required", []) if name not in arguments
        ]
        problems += [f"unknown argument {name!r}" for name in arguments if name not in properties]
        for name, value in arguments.items():
            expected = properties.get(name, {}).get("type")
            if expected in JSON_TYPES and not _is(value, expected):
                problems.append(f"{name!r} must be {expected}, got {type(value).__name__}")
        return [_reason(RejectionCode.BAD_ARGUMENTS, f"{where}: {p}") for p in problems]

    def _injection(self, task: Task) -> Reasons:
        """Every string of the task, keys included, through the injection filter: all of
        them reach an LLM somewhere (user simulator, evaluator, prompts, Controller)."""
        findings = injection.scan(task.model_dump(mode="json"))
        return [_reason(RejectionCode.INJECTION, f.detail) for f in findings]

    # --- 2. replay -------------------------------------------------------------------------

    def replayed(self, task: Task, outcome: ReplayOutcome) -> Reasons:
        if not outcome.network_isolated and not self.settings.allow_no_network_isolation:
            raise SandboxUnavailable(
                "the replay ran without network isolation, and "
                "validation.allow_no_network_isolation does not waive it"
            )
        if outcome.failure is not None:
            return [outcome.failure]
        if outcome.assertion_error is not None:
            detail = f"an env assertion cannot be evaluated: {outcome.assertion_error}"
            return [_reason(RejectionCode.SCHEMA, detail)]
        failed = [
            _reason(RejectionCode.GOLD_WRITE_FAILED, f"action {i} ({r.name}): {r.content}")
            for i, r in enumerate(outcome.results)
            if r.error and r.name in self.domain.write_tools
        ]
        if failed:
            return failed
        if outcome.check_failures:
            return [
                _reason(RejectionCode.CHECK_FAILED, f"after the gold actions, {c} does not hold")
                for c in outcome.check_failures
            ]
        writes = any(a.name in self.domain.write_tools for a in task.actions)
        unchanged = (outcome.db_hash_before, outcome.user_db_hash_before) == (
            outcome.db_hash_after, outcome.user_db_hash_after,
        )  # fmt: skip
        if writes and unchanged:
            return [
                _reason(
                    RejectionCode.NO_STATE_CHANGE, "the gold writes leave the database as it was"
                )
            ]
        if outcome.assertions_after is False:
            detail = "after the gold actions, the task's env assertions do not hold"
            return [_reason(RejectionCode.GOLD_WRITE_FAILED, detail)]
        return []

    # --- 3. discriminative -------------------------------------------------------------------

    def discriminative(self, task: Task, outcome: ReplayOutcome) -> Reasons:
        target = (outcome.db_hash_after, outcome.user_db_hash_after)
        actions = task.actions
        agent_actions = [a for a in actions if a.requestor == "assistant"]
        reads = [a for a in agent_actions if a.name not in self.domain.write_tools]
        passing = []
        before = (outcome.db_hash_before, outcome.user_db_hash_before)
        if self._passes(task, before, target, not agent_actions, outcome.assertions_before):
            passing.append("the no-op trajectory")
        if self._passes(
            task,
            (outcome.read_only_db_hash, outcome.read_only_user_db_hash),
            target,
            len(reads) == len(agent_actions),
            outcome.assertions_read_only,
        ):
            passing.append("a trajectory of only the gold reads")
        if passing:
            detail = f"{' and '.join(passing)} would score 1: the checker cannot tell success"
            return [_reason(RejectionCode.NOT_DISCRIMINATIVE, detail)]
        if outcome.checks_hold_before:
            detail = "its checks all hold before any action: they cannot tell success"
            return [_reason(RejectionCode.NOT_DISCRIMINATIVE, detail)]
        return []

    @staticmethod
    def _passes(
        task: Task,
        hashes: tuple[str | None, str | None],
        target: tuple[str | None, str | None],
        has_all_actions: bool,
        assertions: bool | None,
    ) -> bool:
        """Whether a silent trajectory ending with `hashes` would earn tau2's reward of 1;
        `assertions`: whether the env assertions hold there, as the sandbox found (None: the
        task has none, which tau2 scores 1)."""
        criteria = task.spec.evaluation_criteria
        if criteria is None:
            return True
        basis = set(criteria.reward_basis)
        checks = {
            RewardBasis.DB: hashes == target,
            RewardBasis.ENV_ASSERTION: assertions is not False,
            RewardBasis.COMMUNICATE: not criteria.communicate_info,  # it says nothing
            RewardBasis.ACTION: has_all_actions,
        }
        return all(checks[b] for b in basis if b in checks)

    # --- 4. novelty ----------------------------------------------------------------------------

    async def novel(self, task: Task) -> Reasons:
        signature, shingles = self._fingerprint(task)
        threshold = self.settings.scenario_similarity
        for test_id, test_signature, test_shingles in self.test:
            if signature == test_signature:
                return [
                    _reason(RejectionCode.TEST_LEAKAGE, f"same gold actions as test task {test_id}")
                ]
            if similarity(shingles, test_shingles) >= threshold:
                return [_reason(RejectionCode.TEST_LEAKAGE, f"scenario copies test task {test_id}")]
        holder = await self.index.duplicate_of(signature, shingles, task.id, threshold)
        if holder is not None:
            return [_reason(RejectionCode.DUPLICATE, f"the pool already has it as {holder}")]
        return []

    async def claim(self, task: Task) -> Reasons:
        signature, shingles = self._fingerprint(task)
        threshold = self.settings.scenario_similarity
        holder = await self.index.claim(signature, shingles, task.id, threshold)
        if holder is not None:
            return [_reason(RejectionCode.DUPLICATE, f"accepted meanwhile as {holder}")]
        return []

    def _fingerprint(self, task: Task) -> tuple[str, frozenset[str]]:
        return gold_signature(task, self.domain.write_tools), scenario_shingles(task)

    # --- 5. difficulty ---------------------------------------------------------------------------

    async def difficulty(self, task: Task, verdict: dict[str, Any]) -> Reasons:
        """K rollouts of the current Solver: sometimes solved, never always nor never. A task
        written for a pattern is *targeted* when a failure shows the pattern's category."""
        assert self.probe is not None
        probed = await self.probe.probe(task, self.settings.probe_rollouts)
        p = probed.solve_rate
        verdict |= {
            "solve_rate": p, "learnability": 4 * p * (1 - p),
            "probe_policy_version": probed.policy_version,
        }  # fmt: skip
        if (category := task.provenance.target_category) is not None:
            verdict["targeted"] = category in probed.failures
        if p >= 1.0:
            return [
                _reason(
                    RejectionCode.TOO_EASY, f"solved in all {self.settings.probe_rollouts} probes"
                )
            ]
        if p <= 0.0:
            return [
                _reason(
                    RejectionCode.TOO_HARD,
                    f"solved in none of {self.settings.probe_rollouts} probes",
                )
            ]
        return []


def _is(value: Any, expected: str) -> bool:
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False
    return isinstance(value, JSON_TYPES[expected])
