"""The environment seam: what the loop uses of an environment, whatever runs it.

Everything outside `sentinel.envs` takes an `Environment` (from `envs.load`), never a concrete
class: the Solver's rollouts, the Controller's signals, the Proposer's grounding and the
validator see tasks by split, tool schemas and write tools, the policy text, fresh episodes
with `step` and a state hash, replay and reward, and the interaction's shape. What one domain
knows (its entities, state rules, the Proposer's persona, how its users talk) is its
`DomainPack` (`envs.pack`), reached as `env.pack`.

A new environment is a class that satisfies this Protocol plus a settings model registered in
`envs.registry`; `envs/tau2/mock/` is the smallest complete example of a domain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sentinel.schemas import ChatMessage, RewardBreakdown, Task, TerminationReason, ToolCall

if TYPE_CHECKING:
    from sentinel.envs.pack import DomainPack
    from sentinel.envs.registry import EnvSettings

Split = Literal["train", "test"]
Hashes = tuple[str | None, str | None]  # agent-side and user-side database hashes
State = tuple[dict[str, Any], dict[str, Any] | None]  # agent-side and user-side databases


@dataclass(frozen=True)
class ToolResult:
    content: str
    error: bool


@dataclass(frozen=True)
class Interaction:
    """The shape of an episode's conversation."""

    user_simulator: bool = True  # a simulated user talks to the agent
    user_tools: frozenset[str] = frozenset()  # tools the user calls themselves (a phone)


class Episode(Protocol):
    """The live state of one rollout."""

    calls: list[ToolCall]

    def step(self, call: ToolCall) -> ToolResult:
        """Run one tool call (the agent's or, with a `requestor` of user, the user's)."""
        ...

    def db_hashes(self) -> Hashes: ...

    def db_state(self) -> State:
        """Both databases as plain JSON (the user's None where there is none)."""
        ...


class Environment(Protocol):
    """Tasks, tools, policy, episodes and reward of one environment."""

    name: str  # what its tasks carry as `Task.domain`
    settings: EnvSettings  # what `envs.load` built it from (child processes rebuild it)

    @property
    def pack(self) -> DomainPack: ...

    @property
    def interaction(self) -> Interaction: ...

    @property
    def policy(self) -> str: ...

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The agent's tools in OpenAI's function-calling format."""
        ...

    @property
    def tool_names(self) -> frozenset[str]: ...

    @property
    def write_tools(self) -> frozenset[str]: ...

    @property
    def user_tool_schemas(self) -> dict[str, dict[str, Any]]:
        """The user's tools, name -> parameters schema; {} if the user has none."""
        ...

    @property
    def database(self) -> dict[str, Any]:
        """The agent-side database in its initial state, as plain JSON (do not mutate)."""
        ...

    @property
    def entities(self) -> Entities: ...

    @property
    def initial_hashes(self) -> Hashes: ...

    def tasks(self, split: Split | None = None) -> list[Task]: ...

    def episode(self, task: Task) -> Episode:
        """A fresh episode in the task's initial state."""
        ...

    def replay(self, task: Task, calls: Sequence[ToolCall]) -> Episode:
        """The state after `calls` (a trajectory's prefix), on a fresh episode."""
        ...

    def reward(
        self,
        task: Task,
        episode: Episode,
        messages: Sequence[ChatMessage],
        termination: TerminationReason,
    ) -> RewardBreakdown: ...

    def user_prompt(self, task: Task) -> str:
        """The user simulator's system prompt for `task`."""
        ...

    def spec_problems(self, task: Task) -> list[str]:
        """Why the environment cannot run `task` as written; [] if it can."""
        ...

    def call_problems(self, task: Task) -> list[str]:
        """Each function `task` names that it may not call."""
        ...

    def assertions_met(self, task: Task, episode: Episode) -> bool | None:
        """Whether `task`'s state assertions hold in `episode`; None if it has none."""
        ...


@dataclass
class Entities:
    """Every id in a database, its owner (a user) and its status where it has them.

    Tables are dicts of records keyed by id; a record's `user_id` is its owner, its `status`
    its status, and every `*_id` string in it is an id too. `nested` names the fields whose
    dict keys are ids as well (retail's variants), `owned` those whose keys belong to the
    record itself (a user's payment methods).
    """

    ids: set[str] = field(default_factory=set)
    owner: dict[str, str] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    null_status: str | None = None

    @classmethod
    def index(
        cls,
        database: dict[str, Any],
        nested: frozenset[str] = frozenset(),
        owned: frozenset[str] = frozenset(),
        *,
        null_status: str | None = None,
    ) -> Entities:
        """`null_status`: the status of a record whose `status` is null (airline's live
        reservations), if the domain names one."""
        entities = cls(null_status=null_status)
        for table in database.values():
            if isinstance(table, dict):
                for key, record in table.items():
                    entities._add(str(key), record, nested, owned)
            elif isinstance(table, list):  # a list of records keyed by their first *_id field
                for record in table:
                    key = _first_id(record)
                    if key is not None:
                        entities._add(key, record, nested, owned)
        return entities

    def _add(self, key: str, record: Any, nested: frozenset[str], owned: frozenset[str]) -> None:
        self.ids.add(key)
        if not isinstance(record, dict):
            return
        if isinstance(owner := record.get("user_id"), str):
            self.owner[key] = owner
        status = record.get("status", ...)
        if isinstance(status, str):
            self.status[key] = status
        elif status is None and self.null_status is not None:
            self.status[key] = self.null_status
        for name, value in record.items():
            if name.endswith("_id") and isinstance(value, str):
                self.ids.add(value)
            elif name in nested | owned and isinstance(value, dict):
                self.ids.update(value)
                if name in owned:
                    self.owner.update((item, key) for item in value)


def _first_id(record: Any) -> str | None:
    """A list table's record key: its first `*_id` string (telecom's line_id, bill_id)."""
    if isinstance(record, dict):
        return next(
            (v for k, v in record.items() if k.endswith("_id") and isinstance(v, str)), None
        )
    return None


def id_arguments(arguments: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The entity ids among a tool call's arguments: `*_id` values and `*_ids` items."""
    for name, value in arguments.items():
        if name.endswith("_id") and isinstance(value, str):
            yield name, value
        elif name.endswith("_ids") and isinstance(value, list):
            yield from ((name, v) for v in value if isinstance(v, str))


STOPPED = {TerminationReason.AGENT_STOP, TerminationReason.USER_STOP}


class UnsupportedTask(ValueError):
    """A task this environment cannot score faithfully (e.g. natural-language assertions)."""


def unscored(
    task: Task, messages: Sequence[ChatMessage], termination: TerminationReason
) -> RewardBreakdown:
    """The reward of a conversation nobody ended (0), partial credit beside it: no episode."""
    note = {"note": f"terminated: {termination.value}"}
    return RewardBreakdown(reward=0.0, partial=partial_credit(task, messages), info=note)


def partial_credit(task: Task, messages: Sequence[ChatMessage]) -> float:
    """Progress toward the gold actions: each counts 1 when a successful agent call matched
    it, 1/2 when its tool was at least called; the mean over the task's gold actions."""
    gold = task.agent_actions
    if not gold:
        return 0.0
    failed = {m.tool_call_id for m in messages if m.role == "tool" and m.error}
    calls = [c for m in messages if m.role == "assistant" for c in m.tool_calls]
    done = [c for c in calls if c.id not in failed]
    called = {c.name for c in calls}
    credit = [
        1.0 if any(a.matches(c) for c in done) else 0.5 if a.name in called else 0.0 for a in gold
    ]
    return sum(credit) / len(gold)
