"""Deterministic failure signals: what went wrong in a trajectory, found without an LLM.

The Controller hands these to its LLM as evidence and narrows the LLM's answer to them, so the
pattern library stays useful with a weak model. Each signal names its step (an index into the
trajectory's messages; None for something that never happened) and a precise detail.

- MISSING_ACTION / WRONG_ARGUMENTS: a gold action (the agent's) that never happened; if the
  same tool was called with other arguments, the differing ones (compared like tau2's
  ActionEvaluator: only `compare_args` when the action has them).
- WRONG_ENTITY: an id argument (`*_id`, `*_ids`) that is nowhere in the database, or that
  belongs to another user than the task's.
- WRONG_TOOL: an unknown tool, or a write the task's gold actions never use.
- POLICY_VIOLATION: a write on an entity whose status at that moment its domain's state rules
  forbid (`DomainPack.rules`, the table the grounder reads too: say, a cancel that needs
  a pending order; a write that changes a status makes "only once per order" follow), and a
  transfer to a human when the gold has none.
- MISSING_CONFIRMATION: a write without a user message saying yes since the previous write.
- MISSING_COMMUNICATION, UNFINISHED, MALFORMED_OUTPUT: from the reward, the termination and
  the malformed turns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sentinel.envs.base import STOPPED, Entities, Environment, id_arguments
from sentinel.envs.pack import StatusWalk
from sentinel.schemas import (
    Action,
    FailureCategory,
    FailureSignal,
    Task,
    ToolCall,
    Trajectory,
)

MAX_VALUE_CHARS = 60
AFFIRMATION = re.compile(
    r"\b(yes|yeah|yep|sure|confirm(ed|s)?|go ahead|proceed|please do|correct|ok(ay)?)\b", re.I
)
PRIORITY = [  # the most informative category first
    FailureCategory.WRONG_ENTITY,
    FailureCategory.WRONG_ARGUMENTS,
    FailureCategory.POLICY_VIOLATION,
    FailureCategory.WRONG_TOOL,
    FailureCategory.MISSING_CONFIRMATION,
    FailureCategory.MISSING_ACTION,
    FailureCategory.MISSING_COMMUNICATION,
    FailureCategory.MALFORMED_OUTPUT,
    FailureCategory.UNFINISHED,
    FailureCategory.OTHER,
]


@dataclass
class _Call:
    step: int
    call: ToolCall
    error: bool


def _calls(trajectory: Trajectory) -> list[_Call]:
    errors = {m.tool_call_id: m.error for m in trajectory.messages if m.role == "tool"}
    return [
        _Call(step, call, errors.get(call.id, False))
        for step, m in enumerate(trajectory.messages)
        if m.role == "assistant"
        for call in m.tool_calls
    ]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _gold_signals(gold: list[Action], calls: list[_Call]) -> Iterator[FailureSignal]:
    used: set[int] = set()
    for action in gold:
        hit = next((c for c in calls if c.step not in used and action.matches(c.call)), None)
        if hit is None:
            hit = next((c for c in calls if action.matches(c.call)), None)
        if hit is not None:
            used.add(hit.step)
            continue
        near = next((c for c in calls if c.call.name == action.name and c.step not in used), None)
        if near is None:
            yield FailureSignal(
                category=FailureCategory.MISSING_ACTION, tool=action.name,
                detail=f"{action.name}({_short(action.arguments)}) never called",
            )  # fmt: skip
            continue
        used.add(near.step)
        diffs = [
            f"{k}: expected {_short(v)}, got {_short(near.call.arguments.get(k))}"
            for k, v in action.compared().items()
            if near.call.arguments.get(k) != v
        ]
        yield FailureSignal(
            category=FailureCategory.WRONG_ARGUMENTS, step=near.step, tool=action.name,
            detail=f"{action.name}: {'; '.join(diffs)}",
        )  # fmt: skip


def _task_user(gold: list[Action], index: Entities) -> str | None:
    for action in gold:
        if isinstance(user := action.arguments.get("user_id"), str):
            return user
        for value in action.arguments.values():
            if isinstance(value, str) and value in index.owner:
                return index.owner[value]
    return None


def _entity_signals(
    calls: list[_Call], index: Entities, user: str | None
) -> Iterator[FailureSignal]:
    for c in calls:
        for name, value in id_arguments(c.call.arguments):
            owner = index.owner.get(value)
            if value not in index.ids:
                detail = f"{c.call.name}: {name} {value!r} does not exist"
            elif user is not None and owner is not None and owner != user:
                detail = f"{c.call.name}: {name} {value!r} belongs to {owner}, not {user}"
            else:
                continue
            yield FailureSignal(
                category=FailureCategory.WRONG_ENTITY, step=c.step, tool=c.call.name, detail=detail
            )


def _tool_signals(
    calls: list[_Call], gold: list[Action], domain: Environment
) -> Iterator[FailureSignal]:
    gold_tools = {a.name for a in gold}
    for c in calls:
        name = c.call.name
        if name not in domain.tool_names:
            detail = f"unknown tool {name!r}"
        elif name in domain.write_tools and name not in gold_tools:
            detail = f"{name} is not among the task's actions"
        else:
            continue
        yield FailureSignal(
            category=FailureCategory.WRONG_TOOL, step=c.step, tool=name, detail=detail
        )


def _policy_signals(
    calls: list[_Call], gold: list[Action], domain: Environment, index: Entities
) -> Iterator[FailureSignal]:
    walk, transfer = StatusWalk(domain.pack.rules, index.status), domain.pack.transfer_tool
    for c in calls:
        name = c.call.name
        if name == transfer and all(a.name != transfer for a in gold):
            yield FailureSignal(
                category=FailureCategory.POLICY_VIOLATION, step=c.step, tool=name,
                detail="transferred to a human agent though the task is within scope",
            )  # fmt: skip
        if broken := walk.step(name, c.call.arguments, succeeded=not c.error):
            yield FailureSignal(
                category=FailureCategory.POLICY_VIOLATION, step=c.step, tool=name, detail=broken
            )


def _confirmation_signals(
    trajectory: Trajectory, calls: list[_Call], domain: Environment
) -> Iterator[FailureSignal]:
    since = 0
    for c in calls:
        if c.call.name not in domain.write_tools:
            continue
        said = trajectory.messages[since : c.step]
        if not any(m.role == "user" and AFFIRMATION.search(m.content or "") for m in said):
            yield FailureSignal(
                category=FailureCategory.MISSING_CONFIRMATION, step=c.step, tool=c.call.name,
                detail=f"{c.call.name} without the user's explicit yes",
            )  # fmt: skip
        since = c.step + 1


def _outcome_signals(trajectory: Trajectory) -> Iterator[FailureSignal]:
    if trajectory.malformed_turns:
        malformed = (
            i for i, m in enumerate(trajectory.messages) if m.role == "assistant" and m.error
        )
        first = next(malformed, None)
        yield FailureSignal(
            category=FailureCategory.MALFORMED_OUTPUT, step=first,
            detail=f"{trajectory.malformed_turns} malformed agent turns",
        )  # fmt: skip
    for info in trajectory.reward.missing_communication if trajectory.reward else []:
        yield FailureSignal(
            category=FailureCategory.MISSING_COMMUNICATION, detail=f"never told the user {info!r}"
        )
    if trajectory.termination not in STOPPED:
        yield FailureSignal(
            category=FailureCategory.UNFINISHED, step=len(trajectory.messages) - 1,
            detail=f"ended by {trajectory.termination.value}",
        )  # fmt: skip


def failure_signals(task: Task, trajectory: Trajectory, domain: Environment) -> list[FailureSignal]:
    """Every deterministic finding, by step; findings without a step last."""
    index, gold, calls = domain.entities, task.agent_actions, _calls(trajectory)
    signals = [
        *_gold_signals(gold, calls),
        *_entity_signals(calls, index, _task_user(gold, index)),
        *_tool_signals(calls, gold, domain),
        *_policy_signals(calls, gold, domain, index),
        *_confirmation_signals(trajectory, calls, domain),
        *_outcome_signals(trajectory),
    ]
    return sorted(signals, key=lambda s: (s.step is None, s.step or 0))


def first_wrong_step(signals: Sequence[FailureSignal]) -> int | None:
    return min((s.step for s in signals if s.step is not None), default=None)


def primary_category(signals: Sequence[FailureSignal]) -> FailureCategory:
    found = {s.category for s in signals}
    return next((c for c in PRIORITY if c in found), FailureCategory.OTHER)
