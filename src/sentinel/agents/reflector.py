"""The Reflector (LEAFE): a failed trajectory in, an experience summary and a step to redo out.

It reads what the environment said back, the way an agent could: tool errors, the user's
replies, how the conversation ended, and the reward's breakdown. It never sees the gold
actions, so an experience is advice a policy could have learnt from feedback, not the
answer. The LLM writes the summary and picks the step under a JSON schema that only offers
the conversation's agent turns up to the first wrong step the Controller's deterministic
signals found (going back to after the mistake cannot fix it); with no LLM, or when it
fails, the experience is built from the feedback alone and the step is the signals' own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field

from sentinel.agents.controller import render_transcript
from sentinel.agents.llm import ChatClient, LLMError, complete_structured
from sentinel.agents.signals import failure_signals, first_wrong_step
from sentinel.config import LeafeSettings
from sentinel.envs.base import Environment
from sentinel.logs import get_logger
from sentinel.schemas import Reflection, Task, TerminationReason, Trajectory

log = get_logger(__name__)

MAX_EXPERIENCE = 400
FEEDBACK_LINES = 4

SYSTEM = """You coach a customer-service agent that failed a task. Read the conversation and
the feedback it got, then write an experience: one or two short sentences telling the agent
what to do differently next time (concrete: which tool, which information to ask or check).
Also pick the step to go back to: the [number] of the agent turn where it went wrong.
Answer with JSON only."""

ENDINGS = {
    TerminationReason.MAX_STEPS: "Ran out of turns: get to the needed action sooner.",
    TerminationReason.TOO_MANY_ERRORS: "Too many failed calls: check ids and arguments first.",
    TerminationReason.CONTEXT_LENGTH: "The conversation grew too long: be brief.",
}
COMPONENTS = {
    "DB": "The database did not end as the task requires: make exactly the requested change, "
    "with the user's own ids.",
    "ACTION": "Some required action was missing or had other arguments.",
    "ENV_ASSERTION": "The final state was wrong.",
    "COMMUNICATE": "Some required information was never told to the user.",
}


class ReflectionDraft(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experience: str = Field(max_length=MAX_EXPERIENCE)
    backtrack_step: int


def decision_points(trajectory: Trajectory) -> list[int]:
    """Indices of the agent's own turns: the greeting (message 0) is scripted, not decided."""
    return [i for i, m in enumerate(trajectory.messages) if i > 0 and m.role == "assistant"]


def allowed_steps(points: Sequence[int], first_wrong: int | None) -> list[int]:
    """Decision points at or before the first wrong step (all of them without one)."""
    if first_wrong is None:
        return list(points)
    return [p for p in points if p <= first_wrong] or list(points[:1])


def feedback(trajectory: Trajectory) -> list[str]:
    """What the environment told the agent, as advice lines (no gold actions in them)."""
    lines: list[str] = []
    calls = {c.id: c.name for m in trajectory.messages if m.role == "assistant"
             for c in m.tool_calls}  # fmt: skip
    for m in trajectory.messages:  # the user's own tools (a phone) are not the agent's doing
        if m.role == "tool" and m.error and m.tool_call_id in calls:
            name = calls[m.tool_call_id]
            lines.append(f"{name} failed with {(m.content or '').strip()[:120]!r}.")
    if trajectory.malformed_turns:
        lines.append("Some turns were not a valid tool call: call exactly one tool per turn.")
    if ending := ENDINGS.get(trajectory.termination):
        lines.append(ending)
    reward = trajectory.reward
    if reward is not None:
        lines += [COMPONENTS[k] for k, v in reward.components.items() if v < 1 and k in COMPONENTS]
        lines += [f"Tell the user {info!r}." for info in reward.missing_communication]
    return list(dict.fromkeys(lines))[:FEEDBACK_LINES] or ["The task failed: re-read the policy."]


def render_prompt(trajectory: Trajectory, lines: Sequence[str], max_chars: int) -> str:
    reward = trajectory.reward
    score = json.dumps(reward.components) if reward else "none"
    return "\n".join(
        [
            f"Ended by: {trajectory.termination.value}; reward parts: {score}",
            "Feedback:", *(f"- {line}" for line in lines),
            "Conversation:", render_transcript(trajectory.messages, max_chars),
        ]
    )  # fmt: skip


def draft_schema(steps: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """The draft's schema: the step among `steps`, the experience short enough that the JSON
    closes within `max_tokens` (weak models write up to the limit)."""
    length = max(16, min(MAX_EXPERIENCE - 100, 3 * (max_tokens - 24)))
    return {
        "type": "object",
        "properties": {
            "experience": {"type": "string", "maxLength": length},
            "backtrack_step": {"enum": list(steps)},
        },
        "required": ["experience", "backtrack_step"],
        "additionalProperties": False,
    }


class NothingToRedo(ValueError):
    """The trajectory has no agent turn to go back to."""


class Reflector:
    def __init__(
        self, domain: Environment, settings: LeafeSettings, client: ChatClient | None = None
    ) -> None:
        self.domain = domain
        self.settings = settings
        self.client = client  # None: feedback only

    async def reflect(self, task: Task, trajectory: Trajectory) -> Reflection:
        points = decision_points(trajectory)
        if not points:
            raise NothingToRedo(f"{trajectory.id} has no agent turn after the greeting")
        signals = await anyio.to_thread.run_sync(failure_signals, task, trajectory, self.domain)
        steps = allowed_steps(points, first_wrong_step(signals))
        lines = feedback(trajectory)
        draft = await self._ask(trajectory, lines, steps) if self.client else None
        advice = "\n".join(f"- {line}" for line in lines)
        if draft is None or not draft.experience.strip():
            return Reflection(experience=advice, backtrack_step=steps[-1], source="feedback")
        step = draft.backtrack_step if draft.backtrack_step in steps else steps[-1]
        experience = f"{draft.experience.strip()}\n{advice}"
        return Reflection(experience=experience, backtrack_step=step, source="llm")

    async def _ask(
        self, trajectory: Trajectory, lines: Sequence[str], steps: Sequence[int]
    ) -> ReflectionDraft | None:
        assert self.client is not None
        prompt = render_prompt(trajectory, lines, self.settings.max_prompt_chars)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        try:
            return await complete_structured(
                self.client, messages, ReflectionDraft,
                schema=draft_schema(steps, self.settings.reflect_max_tokens),
                max_tokens=self.settings.reflect_max_tokens,
            )  # fmt: skip
        except LLMError as error:  # includes MalformedOutput: the feedback still reflects
            log.warning("reflection without the LLM", trajectory=trajectory.id, error=str(error))
            return None
