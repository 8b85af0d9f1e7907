"""A domain pack: everything one domain knows, in one folder, behind one small class.

The loop is domain-blind. What it needs to know about a domain it asks the pack:

- `rules`, the table of state rules (which entity statuses each write tool accepts, and the
  status it leaves): the Controller's policy signals and the Proposer's grounder both read it,
  so they cannot disagree;
- `persona`, the Proposer's view of the business;
- `phrasing`, how users of the domain ask for things and identify themselves, for the user
  simulator's scripted dialogues and the fidelity checks;
- `grounder(env)`, which samples real entities for new tasks and moves seed tasks onto other
  entities (`GroundingUnsupported` where the domain has none);
- `entity_fields`, how its database's ids nest.

Packs live in `sentinel/envs/<kind>/<domain>/` and are found through `envs.registry`; the
mock pack (`envs/tau2/mock/`) is the smallest complete one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from sentinel.schemas import Task

if TYPE_CHECKING:
    from sentinel.envs.base import Environment
    from sentinel.envs.episodes import EnvPool

JSON = dict[str, Any]


class GroundingUnsupported(ValueError):
    """No grounding for this domain, or no entity fits the requested tools."""


@dataclass(frozen=True)
class StateRule:
    """A write tool's precondition on the status of the entity an argument names, and the
    status the write leaves behind (None: unchanged)."""

    tool: str
    argument: str  # e.g. "order_id"
    status: str  # the status required...
    match: Literal["equals", "contains"] = "equals"  # ...exactly, or as a substring
    after: str | None = None

    @property
    def noun(self) -> str:
        """What the argument names, in words: "order" for order_id."""
        return self.argument.removesuffix("_id").replace("_", " ")

    def allows(self, status: str) -> bool:
        return status == self.status if self.match == "equals" else self.status in status


@dataclass(frozen=True)
class Kind:
    """A kind of fact the agent may ask a user for: how the scenario mentions it, what a value
    of it looks like, and how a scripted agent asks for it."""

    name: str
    mention: re.Pattern[str]
    value: re.Pattern[str]
    question: str


@dataclass(frozen=True)
class Phrasing:
    """How the domain's users talk: for scripted dialogues and the user-simulator checks."""

    openings: Mapping[str, str] = field(default_factory=dict)  # write tool -> "I want to ..."
    default_opening: str = "get some help with my account"
    question: str = "Hi, I have a question about my account."  # a user who wants no write
    ask_identity: str = "Could you tell me who you are, so I can locate your account?"
    user_id: re.Pattern[str] = re.compile(r"\buser_\d+\b")  # a user id in scenario text
    kinds: tuple[Kind, ...] = ()  # facts a user may be asked for; the last is the fallback


class Grounding(Protocol):
    """The real entities one proposal may use."""

    tools: list[str]

    def describe(self) -> str:
        """A compact text block for the Proposer's prompt."""
        ...

    def identity(self) -> str:
        """What the user knows to identify themselves, as the scenario's first sentence."""
        ...


class Grounder(Protocol):
    def ground(self, tools: Sequence[str], rng: random.Random) -> Grounding:
        """Entities that fit `tools`; GroundingUnsupported if none do."""
        ...

    def actions_schema(
        self, grounding: Grounding, tools: Sequence[str], max_actions: int, lookups: bool
    ) -> JSON:
        """JSON schema of gold actions that use only the grounded ids."""
        ...

    async def mutate(
        self, seed: Task, rng: random.Random, tools: Sequence[str] | None, envs: EnvPool
    ) -> Task | None:
        """`seed` moved onto other entities, checked by replay in `envs`; None if none fit."""
        ...


class StatusWalk:
    """Entity statuses through a sequence of writes, by a pack's rules: the one reading of the
    rules table, for the Controller's signals (the agent's calls) and the validator (gold)."""

    def __init__(self, rules: Sequence[StateRule], status: Mapping[str, str]) -> None:
        self.rules = {r.tool: r for r in rules}
        self.status = dict(status)

    def step(self, tool: str, arguments: Mapping[str, Any], succeeded: bool = True) -> str | None:
        """Why the write breaks a rule (None: it does not, or no rule covers it); a write that
        succeeded within the rules moves its entity to the rule's `after` status."""
        rule = self.rules.get(tool)
        entity = arguments.get(rule.argument) if rule else None
        if rule is None or not isinstance(entity, str) or entity not in self.status:
            return None
        if not rule.allows(self.status[entity]):
            return f"{tool} on {rule.noun} {entity} whose status is {self.status[entity]!r}"
        if succeeded and rule.after is not None:
            self.status[entity] = rule.after
        return None


class DomainPack:
    """One domain's knowledge. Subclasses set the class attributes and may build a grounder."""

    name: ClassVar[str]
    persona: ClassVar[str] = "a customer-service agent"
    policy_name: ClassVar[str] = "the policy"
    rules: ClassVar[tuple[StateRule, ...]] = ()
    transfer_tool: ClassVar[str | None] = "transfer_to_human_agents"
    phrasing: ClassVar[Phrasing] = Phrasing()
    entity_fields: ClassVar[tuple[frozenset[str], frozenset[str]]] = (frozenset(), frozenset())
    null_status: ClassVar[str | None] = None  # a record's status when its `status` is null

    def grounder(self, env: Environment) -> Grounder:
        raise GroundingUnsupported(f"the {self.name} pack has no grounder")

    def splits(self, splits: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
        """The train and test splits from the environment's own (a pack may define them)."""
        return splits

    def rule(self, tool: str) -> StateRule | None:
        return next((r for r in self.rules if r.tool == tool), None)

    def lean_policy(self, policy: str) -> str:
        """The policy for a small-context Solver (`rollout.lean_prompt`); unchanged here."""
        return policy

    def lean_tools(self, schemas: list[JSON]) -> list[JSON]:
        """The agent's tool schemas for a small-context Solver; unchanged here."""
        return schemas
