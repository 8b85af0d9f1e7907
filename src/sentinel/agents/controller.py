"""The Controller: failed trajectories in, diagnoses and error patterns out.

Deterministic failure signals (`agents.signals`) come first, and they also shape what the
LLM may answer: its JSON schema only offers the categories and steps the signals found
(any category when they found nothing) and the domain's tool names. A strong model picks the
root cause among the evidence and explains it; a weak one cannot invent a category, and when
the endpoint fails or answers nonsense the diagnosis falls back to the signals alone. Either
way the diagnosis joins the pattern library, so a failure is never lost.

The summary, the evidence and the signals' details become the pattern description that the
Proposer's LLM reads, so each is bounded in length and passed through the injection filter
(`sentinel.injection`) first: a hostile text in a trajectory cannot travel on that way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from sentinel import injection
from sentinel.agents.consolidator import Consolidator
from sentinel.agents.llm import ChatClient, LLMError, complete_structured
from sentinel.agents.signals import (
    PRIORITY,
    failure_signals,
    first_wrong_step,
    primary_category,
)
from sentinel.config import ControllerSettings
from sentinel.envs.base import Environment
from sentinel.logs import get_logger
from sentinel.orchestrator.bus import Bus, Reject
from sentinel.orchestrator.patterns import PatternLibrary
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.steering import Steering
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    ChatMessage,
    Envelope,
    FailureCategory,
    FailureDiagnosis,
    FailureSignal,
    Task,
    TerminationReason,
    Trajectory,
)
from sentinel.usersim.rules import simulator_fault

log = get_logger(__name__)

GROUP = "controller"
MAX_TOOLS = 3
LINE_CHARS = 300
SUMMARY_CHARS = 300  # what of the LLM's summary, each evidence quote and each signal's
EVIDENCE_CHARS = 160  # detail reaches the diagnosis, at most
DETAIL_CHARS = 300
EXCERPT_LINE_CHARS = 240  # each line of a diagnosis's excerpt
KIND_CHARS = 40
_NOT_KIND = re.compile(r"[^a-z0-9]+")  # word separators; digits stay, to be refused
WITHHELD = "[withheld: instruction-like text]"

SYSTEM = """You are the Controller of a training loop for a customer-service agent.
You read one conversation in which the agent failed its task, and you diagnose the root cause:
the category, the first wrong step (the [number] of a message), a one-sentence summary of the
mistake, short evidence quotes, and the tools involved. If no category names the mistake
well, choose "other" and name its kind in two to four words (e.g. "asks for known info");
otherwise leave kind empty. Answer with JSON only."""


class DiagnosisDraft(BaseModel):
    """What the LLM writes; the Controller checks it against the signals."""

    model_config = ConfigDict(extra="forbid")

    category: FailureCategory
    first_wrong_step: int | None = None
    summary: str = Field(max_length=400)
    evidence: list[str] = Field(default_factory=list, max_length=3)
    tools: list[str] = Field(default_factory=list, max_length=MAX_TOOLS)
    kind: str = Field("", max_length=KIND_CHARS)  # "": a category names it


def draft_schema(signals: Sequence[FailureSignal], tools: Sequence[str]) -> dict[str, Any]:
    """The draft's JSON schema, narrowed to what the evidence allows."""
    found = {s.category for s in signals} or set(FailureCategory)
    found.add(FailureCategory.OTHER)  # "none of these": then `kind` names it
    categories = [c.value for c in PRIORITY if c in found]  # weak models favour the first
    steps = sorted({s.step for s in signals if s.step is not None})
    step: dict[str, Any] = {"enum": steps} if steps else {"type": "null"}
    return {
        "type": "object",
        "properties": {
            "category": {"enum": categories},
            "first_wrong_step": step,
            "summary": {"type": "string", "maxLength": 300},
            "evidence": {
                "type": "array",
                "items": {"type": "string", "maxLength": 160},
                "maxItems": 3,
            },
            "tools": {"type": "array", "items": {"enum": sorted(tools)}, "maxItems": MAX_TOOLS},
            "kind": {"type": "string", "maxLength": KIND_CHARS},  # no `pattern`: see kind_of
        },
        "required": ["category", "first_wrong_step", "summary", "evidence", "tools", "kind"],
        "additionalProperties": False,
    }


def render_transcript(messages: Sequence[ChatMessage], max_chars: int) -> str:
    """One numbered line per message; the middle is cut when too long."""
    lines = [f"[{i}] {_line(m)}"[:LINE_CHARS] for i, m in enumerate(messages) if m.role != "system"]
    text = "\n".join(lines)
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[...]\n{text[-half:]}"


def failing_turns(messages: Sequence[ChatMessage], step: int | None) -> str | None:
    """The first wrong step and the message it answered, one short line each: the evidence
    the Proposer writes from. None without a step, or where the Solver's or the user's words
    read as instructions (they would reach the Proposer's prompt)."""
    if step is None or not 0 <= step < len(messages):
        return None
    lines = [_line(m)[:EXCERPT_LINE_CHARS] for m in messages[max(0, step - 1) : step + 1]]
    lines[-1] = f"wrong step: {lines[-1]}"
    excerpt = "\n".join(lines)
    return injection.bounded(excerpt, 2 * EXCERPT_LINE_CHARS + 20)


def _line(message: ChatMessage) -> str:
    if message.tool_calls:
        calls = ", ".join(f"{c.name}({json.dumps(c.arguments)})" for c in message.tool_calls)
        return f"{message.role} calls {calls}"
    flag = " (error)" if message.error else ""
    return f"{message.role}{flag}: {(message.content or '').strip()}"


def render_prompt(
    task: Task, trajectory: Trajectory, signals: Sequence[FailureSignal], max_chars: int
) -> str:
    scenario = task.spec.user_scenario.instructions
    goal = scenario if isinstance(scenario, str) else scenario.task_instructions
    gold = [f"{a.name}({json.dumps(a.arguments)})" for a in task.actions]
    reward = trajectory.reward.model_dump(exclude={"info"}) if trajectory.reward else None
    findings = [f"- {s.category.value} at step {s.step}: {s.detail}" for s in signals]
    return "\n".join(
        [
            f"Task: {goal}",
            "Expected actions:", *(f"- {g}" for g in gold),
            f"Ended by: {trajectory.termination.value}; reward: {json.dumps(reward)}",
            "Automatic findings:", *(findings or ["- none"]),
            "Conversation:", render_transcript(trajectory.messages, max_chars),
        ]
    )  # fmt: skip


class Controller:
    def __init__(
        self,
        domain: Environment,
        pool: TaskPool,
        library: PatternLibrary,
        bus: Bus,
        settings: ControllerSettings,
        client: ChatClient | None = None,
        *,
        targets: bool = True,
    ) -> None:
        self.targets = targets  # publish patterns for the Proposer (False in baseline modes)
        self.domain = domain
        self.pool = pool
        self.library = library
        self.bus = bus
        self.settings = settings
        self.client = client  # None: deterministic signals only
        steer = targets and settings.steering.enabled  # the baselines propose for no pattern
        self.steering = Steering(library, pool, settings.steering) if steer else None
        self.consolidator = Consolidator(library, bus.redis, settings, client)

    async def diagnose(self, task: Task, trajectory: Trajectory) -> FailureDiagnosis:
        signals = await anyio.to_thread.run_sync(failure_signals, task, trajectory, self.domain)
        draft: DiagnosisDraft | None = None
        if self.client is not None:
            draft = await self._ask(task, trajectory, signals)
        return self._decide(task, trajectory, signals, draft)

    async def _ask(
        self, task: Task, trajectory: Trajectory, signals: Sequence[FailureSignal]
    ) -> DiagnosisDraft | None:
        assert self.client is not None
        prompt = render_prompt(task, trajectory, signals, self.settings.max_prompt_chars)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        try:
            return await complete_structured(
                self.client,
                messages,
                DiagnosisDraft,
                schema=draft_schema(signals, sorted(self.domain.tool_names)),
                max_tokens=self.settings.max_tokens,
                temperature=self.settings.temperature,
            )
        except LLMError as error:  # includes MalformedOutput: the signals still diagnose
            log.warning("diagnosis without the LLM", trajectory=trajectory.id, error=str(error))
            return None

    def _decide(
        self,
        task: Task,
        trajectory: Trajectory,
        signals: Sequence[FailureSignal],
        draft: DiagnosisDraft | None,
    ) -> FailureDiagnosis:
        """The LLM's choice where the evidence allows it, the signals' otherwise."""
        signals = _clean_signals(signals)
        allowed = {s.category for s in signals}
        category = primary_category(signals)
        if draft is not None and (not allowed or draft.category in allowed):
            category = draft.category
        chosen = [s for s in signals if s.category == category] or list(signals)
        step = first_wrong_step(chosen)
        if draft is not None and draft.first_wrong_step in {s.step for s in chosen}:
            step = draft.first_wrong_step
        summary = injection.bounded(draft.summary, SUMMARY_CHARS) if draft else None
        quotes = [*(s.detail for s in chosen[:3]), *(draft.evidence if draft else [])]
        evidence = [q for q in (injection.bounded(q, EVIDENCE_CHARS) for q in quotes) if q]
        if draft and ((summary is None and draft.summary.strip()) or len(evidence) < len(quotes)):
            log.warning("diagnosis text withheld", trajectory=trajectory.id)
        return FailureDiagnosis(
            id=f"diagnosis-{trajectory.id}",
            trajectory_id=trajectory.id,
            task_id=task.id,
            policy_version=trajectory.policy_version,
            category=category,
            first_wrong_step=step,
            summary=summary or _summary(chosen),
            evidence=evidence,
            tools=self._tools(task, trajectory, chosen, draft),
            signals=list(signals),
            diagnoser_model=self.client.model if draft and self.client else None,
            excerpt=failing_turns(trajectory.messages, step),
            kind=kind_of(draft.kind) if draft and draft.category is FailureCategory.OTHER else None,
        )

    def _tools(
        self,
        task: Task,
        trajectory: Trajectory,
        chosen: Sequence[FailureSignal],
        draft: DiagnosisDraft | None,
    ) -> list[str]:
        """The signals' tools first; the LLM's only if the task or the agent used them."""
        used = {c.name for m in trajectory.messages for c in m.tool_calls}
        used |= {a.name for a in task.actions}
        tools = [s.tool for s in chosen if s.tool]
        tools += [t for t in (draft.tools if draft else []) if t in used]
        return list(dict.fromkeys(tools))[:MAX_TOOLS]

    async def handle(self, envelope: Envelope[Trajectory]) -> None:
        trajectory = envelope.payload
        if self.steering is not None:  # the first trajectory of a version judges the ones before
            await self.steering.on_version(trajectory.policy_version)
        if trajectory.succeeded or trajectory.termination == TerminationReason.INFRA_ERROR:
            return  # a success teaches nothing here; an infra error is not the Solver's fault
        if fault := simulator_fault(trajectory):
            excluded = self.settings.exclude_simulator_faults
            log.info(
                "user simulator blamed", trajectory=trajectory.id, why=fault, excluded=excluded
            )
            if excluded:
                return
        task = await self.pool.get(trajectory.task_id)
        if task is None:
            raise Reject(f"unknown task {trajectory.task_id!r}: not a seed nor in the pool")
        diagnosis = await self.diagnose(task, trajectory)
        await self.bus.publish(Stream.DIAGNOSES, diagnosis)
        added = await self.library.add(diagnosis, self.settings.max_examples)
        total = sum(added.pattern.frequency.values())
        due = added.created or total % self.settings.publish_every == 0
        if self.targets and added.counted and due:
            key = f"{added.pattern.id}:{total}"
            await self.bus.publish(Stream.PATTERNS, added.pattern, key=key)
        if added.counted and await self.consolidator.due():  # after: it may merge this one
            await self.consolidator.consolidate()
        log.info(
            "diagnosed",
            trajectory=trajectory.id,
            category=diagnosis.category.value,
            pattern=added.pattern.id,
            new_pattern=added.created,
            llm=diagnosis.diagnoser_model is not None,
        )

    async def run(self, stop: anyio.Event | None = None) -> None:
        await self.bus.consume(Stream.TRAJECTORIES, GROUP, None, Trajectory, self.handle, stop=stop)


def kind_of(text: str) -> str | None:
    """The LLM's new kind of error as a name (snake_case, at most 40 characters), or None:
    when it gave none, when it only restates a fixed category, when it is not two to four
    words of letters (a weak model's sentence or number is no name), or when it reads as an
    instruction. (The schema
    sends no regex `pattern`: xgrammar in vLLM-CPU fails some of them with a 500.)"""
    words = [w for w in _NOT_KIND.split(text.lower()) if w]
    name = "_".join(words)
    if not 2 <= len(words) <= 4 or len(name) > KIND_CHARS:
        return None
    if not all(w.isalpha() and len(w) >= 2 for w in words):  # "json string type 1000..."
        return None
    if name in set(FailureCategory) or injection.scan_text(text):
        return None
    return name


def _clean_signals(signals: Sequence[FailureSignal]) -> list[FailureSignal]:
    """Signals whose details are bounded, and withheld where they read as instructions:
    they quote the trajectory (the Solver's and the user's words)."""
    return [
        s if (detail := injection.bounded(s.detail, DETAIL_CHARS)) == s.detail
        else s.model_copy(update={"detail": detail or WITHHELD})
        for s in signals
    ]  # fmt: skip


def _summary(signals: Sequence[FailureSignal]) -> str:
    if not signals:
        return "The task failed without a detectable cause."
    return f"{signals[0].category.value.replace('_', ' ')}: {signals[0].detail}"[:400]
