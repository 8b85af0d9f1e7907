"""Grounding, whatever the domain: real entities for new tasks, seed tasks moved onto others.

The Proposer's LLM writes tasks around an error pattern's tools. `ground` asks the domain's
pack for entities that fit those tools (`Grounding.describe` shows them to the LLM), and
`actions_schema` narrows every id argument of the gold actions to an enum of the grounded ids,
so even a tiny model under constrained decoding writes actions that run. `mutate` moves a seed
train task onto other entities and keeps it only if its gold writes succeed on a replay in an
`EnvPool` (a call past the pool's limits costs one mutation, never a frozen Proposer).

The schema pieces below are shared by every pack's grounder.
"""

from __future__ import annotations

import hashlib
import json
import random
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvFailure, EnvPool
from sentinel.envs.pack import Grounder, Grounding, GroundingUnsupported
from sentinel.logs import get_logger
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

log = get_logger(__name__)

JSON = dict[str, Any]
_CACHE: weakref.WeakKeyDictionary[Any, Grounder] = weakref.WeakKeyDictionary()


def grounder(env: Environment) -> Grounder:
    """The env's grounder, built (its database indexed) once per environment instance;
    GroundingUnsupported if its pack has none."""
    if env not in _CACHE:
        _CACHE[env] = env.pack.grounder(env)
    return _CACHE[env]


def ground(env: Environment, tools: Sequence[str], rng: random.Random) -> Grounding:
    """Entities that fit `tools`; GroundingUnsupported if none fit."""
    return grounder(env).ground(tools, rng)


def actions_schema(
    env: Environment,
    grounding: Grounding,
    tools: Sequence[str],
    max_actions: int = 8,
    *,
    lookups: bool = True,
    min_actions: int = 1,
) -> JSON:
    """JSON schema of min..max_actions gold actions that use only the grounded ids: calls of
    `tools`, plus (with `lookups`) the reads an agent needs to find the entities."""
    schema = grounder(env).actions_schema(grounding, tools, max_actions, lookups)
    return {**schema, "minItems": min_actions}


async def mutate(
    seed: Task,
    env: Environment,
    rng: random.Random,
    tools: Sequence[str] | None = None,
    *,
    envs: EnvPool,
) -> Task | None:
    """`seed` (a train task with writes) moved onto other entities; None when nothing fits.

    With `tools`, gold writes of other tools are dropped if some write uses one of them, so
    the task focuses on the pattern's tools. A domain without a grounder gives None too, and
    so does a replay that `envs` (a pool of `env`) stopped or failed: the reason is logged.
    """
    try:
        chosen = grounder(env)
    except GroundingUnsupported as error:
        log.info("no mutation", reason=str(error))
        return None
    if envs.env.name != env.name:
        raise ValueError(f"a {envs.env.name!r} pool cannot replay {env.name!r} tasks")
    try:
        return await chosen.mutate(seed, rng, tools, envs)
    except EnvFailure as error:  # ToolStopped too: the seed's gold ran past the limits
        log.warning("no mutation: its replay failed", seed=seed.id, reason=str(error)[:300])
        return None


# --- mutated tasks --------------------------------------------------------------------------


def mutant(seed: Task, spec: TaskSpec, suffix: str, notes: str) -> Task:
    """`seed` moved onto other entities as `spec`: both ids end in `-mut-<suffix>`, the notes
    say from where, and the provenance is one generation on (a train task)."""
    spec = spec.model_copy(
        update={
            "id": f"{seed.spec.id}-mut-{suffix}",
            "description": {**(spec.description or {}), "notes": notes},
        }
    )
    provenance = Provenance(
        origin=Origin.MUTATED, split="train", generation=seed.provenance.generation + 1
    )
    return Task(id=f"{seed.id}-mut-{suffix}", domain=seed.domain, spec=spec, provenance=provenance)


def restated(
    seed: Task,
    gold: list[Action],
    instructions: UserInstructions,
    *,
    key: object,
    notes: str,
    communicate_info: list[str] | None = None,
) -> Task:
    """A mutant whose request is restated from its new gold: the seed's persona, initial state
    and reward basis; `key` (what the seed moved onto) and the gold name it."""
    body = json.dumps([seed.id, key, [a.model_dump(mode="json") for a in gold]], default=str)
    criteria = seed.spec.evaluation_criteria or EvaluationCriteria()
    spec = TaskSpec(
        id=seed.spec.id,
        description=seed.spec.description,
        user_scenario=UserScenario(
            persona=seed.spec.user_scenario.persona, instructions=instructions
        ),
        initial_state=seed.spec.initial_state,
        evaluation_criteria=EvaluationCriteria(
            actions=gold, communicate_info=communicate_info or [],
            reward_basis=criteria.reward_basis,
        ),
    )  # fmt: skip
    return mutant(seed, spec, hashlib.sha256(body.encode()).hexdigest()[:8], notes)


# --- JSON schema pieces ---------------------------------------------------------------------


def enum(values: Iterable[str]) -> JSON:
    return {"type": "string", "enum": list(dict.fromkeys(values))}


def text(limit: int) -> JSON:
    return {"type": "string", "maxLength": limit}


def ids(values: Iterable[str], most: int) -> JSON:
    return {"type": "array", "items": enum(values), "minItems": 1, "maxItems": most}


def obj(properties: JSON) -> JSON:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def branch(tool: str, arguments: JSON) -> JSON:
    """One gold action: this tool with these arguments."""
    return obj({"name": {"const": tool}, "arguments": obj(arguments)})


def empty(schema: Any) -> bool:
    """Whether a schema holds an enum with nothing to choose."""
    if isinstance(schema, dict):
        return schema.get("enum") == [] or any(empty(v) for v in schema.values())
    return isinstance(schema, list) and any(empty(v) for v in schema)


GENERIC_TEXT = 64  # a reason or a note: weak models fill every string up to its maxLength


def generic(parameter: JSON) -> JSON:
    """A parameter without entity ids, bounded so constrained decoding ends soon."""
    kind = parameter.get("type")
    if kind == "array":
        return {"type": "array", "items": generic(parameter.get("items", {})), "maxItems": 10}
    if kind in ("integer", "number", "boolean"):
        return {"type": kind}
    return text(GENERIC_TEXT)
