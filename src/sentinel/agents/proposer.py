"""The Proposer: error patterns in, executable tau2 tasks out.

For each pattern it samples real database entities that fit the pattern's tools
(`agents.grounding`), and the LLM writes the customer's scenario and the gold actions around
them. The gold actions' JSON schema offers only the grounded ids, so even a tiny model writes
runnable actions; the scenario always carries the user's real identifiers. The prompt
carries the pattern's newest failures as evidence (the Controller's summary of each and the
turns where it went wrong) and the current version's lessons from validation
(`agents.prompts`). When proposals
for a pattern keep failing, or the endpoint is down, it mutates a seed train task toward the
pattern instead. Proposals go to the proposals stream; verdicts come back on the
validations stream and update the prompt statistics. A draft that does not parse, or does not
make a task, is a `schema` verdict of its own, so the prompt learns from it too.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sentinel.agents.llm import (
    ChatClient,
    LLMError,
    MalformedOutput,
    clip,
    complete_structured,
    first_problem,
)
from sentinel.agents.prompts import Origin as ProposalOrigin
from sentinel.agents.prompts import PromptBook, PromptVersion
from sentinel.config import ProposerSettings
from sentinel.envs.base import Environment, id_arguments
from sentinel.envs.episodes import EnvFailure, EnvPool
from sentinel.envs.grounding import actions_schema, ground, mutate
from sentinel.envs.pack import DomainPack, Grounding, GroundingUnsupported, Phrasing
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Action,
    Envelope,
    ErrorPattern,
    EvaluationCriteria,
    FailureCategory,
    Origin,
    Provenance,
    RejectionCode,
    RejectionReason,
    Task,
    TaskProposal,
    TaskSpec,
    ToolCall,
    UserInstructions,
    UserScenario,
    ValidationResult,
)
from sentinel.usersim.scenario import spoken

log = get_logger(__name__)

GROUP = "proposer"
FEEDBACK_GROUP = "proposer-feedback"
MUTATOR = "mutation"
MAX_LOOKUPS = 3
MAX_WRITES = 2
EVIDENCE_SHOWN = 2  # of a pattern's failures, in the prompt

SYSTEM = """You write training tasks for {persona}.
A task is a customer's situation (what they want and what they know) plus the exact tool
calls a perfect agent makes to solve it. The task must exercise the weakness described, use
only the entities given, and be solvable under {policy}. Answer with JSON only."""


def system_prompt(pack: DomainPack) -> str:
    """The Proposer's system prompt, in the words of the domain's pack."""
    return SYSTEM.format(persona=pack.persona, policy=pack.policy_name)


class DraftAction(BaseModel):
    """One gold tool call as the LLM writes it: typed here, so a wrong shape is a reason."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)


class TaskDraft(BaseModel):
    """What the LLM writes for one task."""

    model_config = ConfigDict(extra="forbid")

    persona: str = Field(max_length=300)
    reason_for_call: str = Field(max_length=600)
    known_info: str = Field(max_length=600)
    unknown_info: str = Field(max_length=400)
    task_instructions: str = Field(max_length=1200)
    lookups: list[DraftAction] = Field(default_factory=list, max_length=MAX_LOOKUPS)
    # none for a task whose goal is to tell the customer something (`communicates`)
    writes: list[DraftAction] = Field(default_factory=list, max_length=MAX_WRITES)


# The texts' longest lengths, in characters, when the token budget has room for them all.
TEXTS = {
    "reason_for_call": 160,
    "known_info": 120,
    "unknown_info": 100,
    "task_instructions": 200,
    "persona": 80,
}
ACTION_TOKENS = 64  # one gold call: its name, ids, numbers or a GENERIC_TEXT
KEYS_TOKENS = 32  # the draft's braces, keys and quotes (more if the model pads with newlines)
CHARS_PER_TOKEN = 2  # weak models fill texts with digit runs (~1 char a token); prose is ~4


def text_limits(max_tokens: int) -> dict[str, int]:
    """Each text's maxLength, shrunk so that a draft of the most actions still closes within
    `max_tokens`: a draft cut off at the limit is lost, after a repair round that costs as
    much again (SmolLM2 writes every text up to its maxLength)."""
    room = CHARS_PER_TOKEN * (max_tokens - KEYS_TOKENS - ACTION_TOKENS * (MAX_LOOKUPS + MAX_WRITES))
    scale = min(1.0, room / sum(TEXTS.values()))
    return {name: max(16, int(limit * scale)) for name, limit in TEXTS.items()}


def draft_schema(
    lookups: dict[str, Any], writes: dict[str, Any], max_tokens: int
) -> dict[str, Any]:
    """The gold actions first, in two lists so that every task has a write; then texts that
    fit the rest of `max_tokens` (constrained decoding writes fields in this order, so a long
    text cannot cut the actions)."""
    texts = {
        name: {"type": "string", "maxLength": n} for name, n in text_limits(max_tokens).items()
    }
    properties = {"lookups": lookups, "writes": writes, **texts}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def render_prompt(pattern: ErrorPattern | None, grounding: Grounding, prompt: PromptVersion) -> str:
    target = (
        f"Weakness to target: {pattern.title}. {pattern.description}\n"
        f"Tools involved: {', '.join(pattern.tools) or 'any'}"
        if pattern
        else "Write a typical, realistic customer request."
    )
    lessons = [f"- {lesson}" for lesson in prompt.lessons]
    return "\n".join(
        [
            target,
            *evidence_lines(pattern),
            "Entities (use only these ids):",
            grounding.describe(),
            *(["Lessons from rejected tasks:", *lessons] if lessons else []),
            "Write one task as JSON.",
        ]
    )


def evidence_lines(pattern: ErrorPattern | None) -> list[str]:
    """The pattern's newest failures: what went wrong and the turns where it did, so the task
    recreates the situation the Solver failed in (the Controller scanned and bounded them)."""
    shown = pattern.evidence[-EVIDENCE_SHOWN:] if pattern else []
    lines = []
    for evidence in reversed(shown):
        lines.append(f"- {evidence.summary}")
        if evidence.excerpt:
            lines.extend(f"  {line}" for line in evidence.excerpt.splitlines())
    return ["Failures seen, newest first:", *lines] if lines else []


def communicates(pattern: ErrorPattern | None) -> bool:
    """Whether the pattern's tasks are about telling the customer something: reads only,
    scored by what the agent says (tau2's `communicate_info`), never by a write."""
    return pattern is not None and pattern.category == FailureCategory.MISSING_COMMUNICATION


NO_WRITES = {"type": "array", "maxItems": 0}
ANSWER_CHARS = 60


def answer_in(results: Sequence[str], known: str) -> tuple[str, str] | None:
    """A fact the agent must look up and tell: (its field, its value) from the lookups'
    results, the last (most specific) first. Never an id (`*_id`), a value the customer
    already knows, nor one too short to check or long to say; None when there is none."""
    for content in reversed(results):
        try:
            data = json.loads(content)
        except ValueError:
            continue
        for key, value in _scalars(data):
            said = str(value)
            if (
                not key.endswith("_id") and 4 <= len(said) <= ANSWER_CHARS
                and said.lower() not in known.lower() and not said.isspace()
            ):  # fmt: skip
                return key, said
    return None


def _scalars(data: Any, key: str = "") -> list[tuple[str, str | int | float]]:
    if isinstance(data, dict):
        return [pair for k, v in data.items() for pair in _scalars(v, str(k))]
    if isinstance(data, list):
        return [pair for v in data for pair in _scalars(v, key)]
    if isinstance(data, str | int | float) and not isinstance(data, bool) and key:
        return [(key, data)]
    return []


def identify(known_info: str, grounding: Grounding) -> str:
    """The user's real identifiers, so the agent can find them whatever the model wrote."""
    return f"{grounding.identity()} {known_info}".strip()


def restate(writes: Sequence[Action], reason: str, phrasing: Phrasing) -> str:
    """What the customer wants, from the gold writes, so the request is never nonsense: in
    the domain's customer words (the pack's openings) with the details a customer would give,
    their values only. Never a tool name or `key: value` syntax, which would hand the user
    simulator the gold call to recite."""
    wants = dict.fromkeys(phrasing.openings.get(w.name, phrasing.default_opening) for w in writes)
    details = dict.fromkeys(value for w in writes for value in spoken(w.arguments))
    said = f'You call to say: "I\'d like to {" and ".join(wants)}."'
    if details:
        said += f" The details you have: {'; '.join(details)}."
    return f"{said} {reason}".strip()


class Proposer:
    def __init__(
        self,
        domain: Environment,
        book: PromptBook,
        bus: Bus,
        settings: ProposerSettings,
        client: ChatClient | None = None,
        envs: EnvPool | None = None,
    ) -> None:
        self.domain = domain
        self.book = book
        self.bus = bus
        self.settings = settings
        self.client = client  # None: mutation only
        self.rng = random.Random(settings.seed)
        self.seeds = [t for t in domain.tasks("train") if _writes(t, domain)]
        self._own_envs = envs is None  # mutations replay there, never in this process
        self.envs = envs or EnvPool(domain.settings)
        self._drafting = anyio.CapacityLimiter(settings.max_concurrency or math.inf)

    async def aclose(self) -> None:
        """Stop the children of its own environment pool (call before the loop ends)."""
        if self._own_envs:
            await self.envs.aclose()

    async def propose(self, pattern: ErrorPattern | None) -> list[TaskProposal]:
        """Proposals for a pattern (None: untargeted, synthetic): `tasks_per_pattern` times
        the pattern's steering weight (orchestrator.steering), at least one unless zero."""
        mutate_now = self.client is None
        if pattern is not None:
            mutate_now |= await self.book.streak(pattern.id) >= self.settings.mutation_after > 0
        proposals: list[TaskProposal] = []

        async def one() -> None:  # concurrent: the server batches them
            proposal = None
            if not mutate_now:
                async with self._drafting:
                    proposal = await self.write(pattern)
            proposal = proposal or await self._mutation(pattern)
            if proposal is not None:
                proposals.append(proposal)

        async with anyio.create_task_group() as tg:
            for _ in range(self.quota(pattern)):
                tg.start_soon(one)
        return proposals

    def quota(self, pattern: ErrorPattern | None) -> int:
        base = self.settings.tasks_per_pattern
        if pattern is None or pattern.weight == 1.0:
            return base
        return 0 if pattern.weight <= 0 else max(1, round(base * pattern.weight))

    async def write(self, pattern: ErrorPattern | None) -> TaskProposal | None:
        """One LLM-written proposal; None if the domain or the endpoint cannot give one, or
        the draft is unusable (then a `schema` verdict says why)."""
        assert self.client is not None
        prompt = await self.book.current()
        pattern_tools = pattern.tools if pattern else []
        telling = communicates(pattern)  # then the check is what the agent says
        writes = (
            []
            if telling
            else [t for t in pattern_tools if t in self.domain.write_tools]
            or [self.rng.choice(sorted(self.domain.write_tools))]
        )
        # otherwise a pattern about reads still needs a write to be checkable: any one
        tools = list(dict.fromkeys([*writes, *pattern_tools]))
        try:
            grounding = ground(self.domain, tools, self.rng)
        except GroundingUnsupported as error:
            log.info("no grounding; mutating instead", reason=str(error))
            return None
        messages = [
            {"role": "system", "content": system_prompt(self.domain.pack)},
            {"role": "user", "content": render_prompt(pattern, grounding, prompt)},
        ]
        schema = draft_schema(
            actions_schema(self.domain, grounding, [], MAX_LOOKUPS, min_actions=int(telling)),
            NO_WRITES if telling
            else actions_schema(self.domain, grounding, writes, MAX_WRITES, lookups=False),
            self.settings.max_tokens,
        )  # fmt: skip
        task_id = f"proposed-{uuid.uuid4().hex[:12]}"
        try:
            draft = await complete_structured(
                self.client, messages, TaskDraft, schema=schema,
                max_tokens=self.settings.max_tokens, temperature=self.settings.temperature,
            )  # fmt: skip
            task = self._task(task_id, draft, grounding, pattern, prompt)
            if telling:
                task = await self._telling(task)
        except MalformedOutput as error:
            await self._unparseable(task_id, pattern, prompt, error)
            return None
        except LLMError as error:
            log.warning("proposer endpoint failed; mutating instead", error=str(error))
            return None
        return await self._proposal(task, pattern, prompt.version, self.client.model)

    async def _telling(self, task: Task) -> Task:
        """The task with the fact its lookups find as what the agent must tell, and the
        customer's question for it; MalformedOutput when they find nothing to tell."""
        reads = self.domain.tool_names - self.domain.write_tools
        calls = [ToolCall(id=f"l{i}", name=a.name, arguments=a.arguments)
                 for i, a in enumerate(task.actions) if a.name in reads]  # fmt: skip
        try:  # in the pool's limited child: a hostile endpoint's draft is stopped there
            episode = await self.envs.open(task)
            try:
                results = [r.content for r in [await episode.step(c) for c in calls] if not r.error]
            finally:
                await episode.close()
        except EnvFailure as error:
            raise MalformedOutput("Task", f"its lookups could not run: {error}", "") from None
        instructions = task.spec.user_scenario.instructions
        assert isinstance(instructions, UserInstructions)
        found = answer_in(results, instructions.known_info or "")
        if found is None:
            raise MalformedOutput("Task", "its lookups find nothing to tell the customer", "")
        field, value = found
        ids = [v for c in calls for _, v in id_arguments(c.arguments)]
        about = f" of {ids[-1]}" if ids else ""
        question = f'You call to ask: "What is the {field.replace("_", " ")}{about}?"'
        told = instructions.model_copy(
            update={"reason_for_call": f"{question} {instructions.reason_for_call}"[:600]}
        )
        criteria = task.spec.evaluation_criteria
        assert criteria is not None
        spec = task.spec.model_copy(update={
            "user_scenario": task.spec.user_scenario.model_copy(update={"instructions": told}),
            "evaluation_criteria": criteria.model_copy(update={"communicate_info": [value]}),
        })  # fmt: skip
        return task.model_copy(update={"spec": spec})

    async def _unparseable(
        self, task_id: str, pattern: ErrorPattern | None, prompt: PromptVersion, error: LLMError
    ) -> None:
        """Malformed output is a rejection too: it teaches the next prompt version."""
        proposal_id = f"proposal-{task_id}"
        origin = ProposalOrigin(prompt_version=prompt.version, pattern_id=pattern and pattern.id)
        verdict = ValidationResult(
            proposal_id=proposal_id, task_id=task_id, accepted=False,
            reasons=[RejectionReason(code=RejectionCode.SCHEMA, detail=str(error)[:500])],
        )  # fmt: skip
        await self.book.remember(proposal_id, origin)
        await self.bus.publish(Stream.VALIDATIONS, verdict)
        log.info("proposal unparseable", task=task_id, error=clip(str(error), 200))

    def _task(
        self,
        task_id: str,
        draft: TaskDraft,
        grounding: Grounding,
        pattern: ErrorPattern | None,
        prompt: PromptVersion,
    ) -> Task:
        """The task a parsed draft stands for; MalformedOutput if it makes none."""
        try:
            return self._build(task_id, draft, grounding, pattern, prompt)
        except ValidationError as error:
            problem = first_problem(error, truncated=False)
            raise MalformedOutput("Task", problem, draft.model_dump_json()) from None

    def _build(
        self,
        task_id: str,
        draft: TaskDraft,
        grounding: Grounding,
        pattern: ErrorPattern | None,
        prompt: PromptVersion,
    ) -> Task:
        if not draft.writes and not communicates(pattern):  # a hostile or broken draft
            raise MalformedOutput("Task", "no gold write: nothing to check", "")
        once = {json.dumps([w.name, w.arguments], sort_keys=True): w for w in draft.writes}
        actions = [  # a write repeated word for word is the model stuttering, not the goal
            Action(action_id=str(i), name=a.name, arguments=a.arguments)
            for i, a in enumerate([*draft.lookups, *once.values()])
        ]
        instructions = UserInstructions(
            domain=self.domain.name,
            reason_for_call=restate(
                actions[len(draft.lookups) :], draft.reason_for_call, self.domain.pack.phrasing
            )
            if draft.writes
            else draft.reason_for_call,
            known_info=identify(draft.known_info, grounding),
            unknown_info=draft.unknown_info or None,
            task_instructions=draft.task_instructions,
        )
        spec = TaskSpec(
            id=task_id,
            description={"purpose": pattern.title if pattern else "synthetic"},
            user_scenario=UserScenario(persona=draft.persona, instructions=instructions),
            evaluation_criteria=EvaluationCriteria(actions=actions, communicate_info=[]),
        )
        provenance = Provenance(
            origin=Origin.PROPOSED if pattern else Origin.SYNTHETIC,
            parent_trajectory_ids=pattern.example_trajectory_ids[-5:] if pattern else [],
            pattern_id=pattern.id if pattern else None,
            target_category=pattern.category if pattern else None,
            prompt_version=prompt.name,
            generation=1,
        )
        return Task(id=task_id, domain=self.domain.name, spec=spec, provenance=provenance)

    async def _mutation(self, pattern: ErrorPattern | None) -> TaskProposal | None:
        proposal = await self._mutate(pattern)
        if proposal is not None:  # its verdict counts for the pattern (version 0: no prompt)
            origin = ProposalOrigin(prompt_version=0, pattern_id=proposal.pattern_id)
            await self.book.remember(proposal.id, origin)
        return proposal

    async def _mutate(self, pattern: ErrorPattern | None) -> TaskProposal | None:
        """A seed train task transformed toward the pattern; None if nothing fits."""
        tools = set(pattern.tools) if pattern else set()
        seeds = [s for s in self.seeds if tools & _gold_tools(s)] or self.seeds
        rng = random.Random(self.rng.getrandbits(64))  # drawn before awaiting: deterministic
        for seed in rng.sample(seeds, k=min(len(seeds), 8)):
            task = await mutate(seed, self.domain, rng, sorted(tools) or None, envs=self.envs)
            if task is not None:
                update = {
                    "pattern_id": pattern.id if pattern else None,
                    "target_category": pattern.category if pattern else None,
                }
                task = task.model_copy(
                    update={"provenance": task.provenance.model_copy(update=update)}
                )
                return TaskProposal(
                    id=f"proposal-{task.id}", task=task, pattern_id=update["pattern_id"],
                    prompt_version=MUTATOR, proposer_model=MUTATOR,
                    rationale=f"mutated from {seed.id}",
                )  # fmt: skip
        log.warning("no seed task could be mutated", pattern=pattern.id if pattern else None)
        return None

    async def _proposal(
        self, task: Task, pattern: ErrorPattern | None, version: int, model: str
    ) -> TaskProposal:
        proposal = TaskProposal(
            id=f"proposal-{task.id}", task=task, pattern_id=pattern.id if pattern else None,
            prompt_version=f"v{version}", proposer_model=model,
        )  # fmt: skip
        origin = ProposalOrigin(prompt_version=version, pattern_id=proposal.pattern_id)
        await self.book.remember(proposal.id, origin)
        return proposal

    async def handle_pattern(self, envelope: Envelope[ErrorPattern]) -> None:
        pattern = envelope.payload
        proposals = await self.propose(pattern)
        if proposals:
            await self.bus.publish_many(Stream.PROPOSALS, proposals)
        log.info(
            "proposed",
            pattern=pattern.id,
            proposals=len(proposals),
            mutated=sum(p.proposer_model == MUTATOR for p in proposals),
        )

    async def handle_verdict(self, envelope: Envelope[ValidationResult]) -> None:
        await self.book.record(envelope.payload)

    async def run(self, stop: anyio.Event | None = None) -> None:
        """Patterns to proposals, and verdicts to prompt statistics, until `stop`."""
        verdicts = self.bus.consumer(
            Stream.VALIDATIONS, FEEDBACK_GROUP, ValidationResult, self.handle_verdict
        )
        patterns = self.bus.consumer(Stream.PATTERNS, GROUP, ErrorPattern, self.handle_pattern)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(verdicts.run, stop)
                await patterns.run(stop)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()


def _gold_tools(task: Task) -> set[str]:
    return {a.name for a in task.actions}


def _writes(task: Task, domain: Environment) -> bool:
    return bool(_gold_tools(task) & domain.write_tools)
