"""Drafts made from an airline grounding, as a model under constrained decoding could write
them: each argument's first allowed value."""

from __future__ import annotations

import random
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.grounding import actions_schema, ground
from sentinel.schemas import (
    Action,
    EvaluationCriteria,
    Origin,
    Provenance,
    Task,
    TaskSpec,
    UserInstructions,
    UserScenario,
)


def first_choice(schema: dict[str, Any]) -> Any:
    """The value a schema admits when every choice takes its first option."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema:
        return first_choice(schema["anyOf"][0])
    if schema.get("type") == "object":
        return {k: first_choice(v) for k, v in schema["properties"].items()}
    if schema.get("type") == "array":
        if "prefixItems" in schema:
            return [first_choice(s) for s in schema["prefixItems"]]
        return [first_choice(schema["items"])] * max(1, schema.get("minItems", 1))
    return "a short text" if schema.get("type") == "string" else 1


def first_write(env: Environment, tool: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """A grounding for `tool` and the schema's first-choice call of it."""
    grounding = ground(env, [tool], random.Random(seed))
    schema = actions_schema(env, grounding, [tool], 2, lookups=False)
    return grounding, first_choice(schema["items"])


def grounded_task(env: Environment, tool: str, seed: int, task_id: str) -> Task:
    """A proposed task as the Proposer builds it from a first-choice draft."""
    grounding, call = first_write(env, tool, seed)
    lookup = Action(
        action_id="0", name="get_user_details", arguments={"user_id": grounding.user.user_id}
    )
    write = Action(action_id="1", name=call["name"], arguments=call["arguments"])
    instructions = UserInstructions(
        domain=env.name,
        reason_for_call=f"You want the agent to {tool.replace('_', ' ')}.",
        known_info=grounding.identity(),
        task_instructions="Confirm when the agent lists the details.",
    )
    spec = TaskSpec(
        id=task_id,
        user_scenario=UserScenario(instructions=instructions),
        evaluation_criteria=EvaluationCriteria(actions=[lookup, write], communicate_info=[]),
    )
    provenance = Provenance(origin=Origin.PROPOSED, generation=1)
    return Task(id=task_id, domain=env.name, spec=spec, provenance=provenance)
