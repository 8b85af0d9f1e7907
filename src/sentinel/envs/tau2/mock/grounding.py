"""Grounding for the mock domain: the smallest grounder, the one to copy for a new domain.

A grounder answers three questions for the Proposer (`envs.grounding` calls it; the
`Grounder` Protocol is in `envs.pack`):

- `ground(tools, rng)`: which real entities may a new task use? Here one user and their
  to-do tasks. `describe()` shows them to the LLM; `identity()` becomes the first sentence
  of what the simulated user knows.
- `actions_schema(...)`: which gold actions may the LLM write? One branch per tool: every id
  argument is an enum of the grounded ids, every free text is bounded, so constrained
  decoding ends, with actions that run.
- `mutate(seed, ...)`: a seed train task moved onto other values (another title for the task
  it creates, another task or status for the one it updates). A candidate is kept only if
  its gold writes succeed and change the database on a replay in the `EnvPool`, never in
  this process; None when nothing fits.

Mock's database holds one user with one task, so there is nothing to hold out for the test
split; a larger domain samples among the users that fit the tools and never uses those of
test tasks (`envs/tau2/retail/grounding.py`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import branch, empty, enum, generic, restated, text
from sentinel.envs.pack import Grounding, GroundingUnsupported
from sentinel.schemas import (
    Action,
    Task,
    ToolCall,
    UserInstructions,
)

JSON = dict[str, Any]
READS = ("get_users",)  # how an agent finds the user and their tasks
TITLES = (  # new titles for mutated tasks
    "Quarterly report", "Team offsite", "Code review", "Dentist appointment",
    "Renew passport", "Budget review", "Client call", "Update the roadmap",
)  # fmt: skip
TITLE_CHARS = 60  # a title the LLM writes
MAX_TASKS = 5  # tasks shown per grounding
MAX_REPLAYS = 4  # candidates replayed per mutation before giving up
INSTRUCTIONS = "Answer the agent's questions briefly, and confirm when it asks you to."


@dataclass(frozen=True)
class MockTask:
    task_id: str
    title: str
    status: str


@dataclass
class MockGrounding:
    """One user and their tasks: what one proposal may use."""

    tools: list[str]
    user_id: str
    name: str
    tasks: list[MockTask]

    def describe(self) -> str:
        lines = [f"User {self.name} (user id {self.user_id})", "Tasks:"]
        lines += [f'  {t.task_id} "{t.title}" [{t.status}]' for t in self.tasks] or ["  none"]
        return "\n".join(lines)

    def identity(self) -> str:
        return f"You are {self.name}; your user id is {self.user_id}."


class MockGrounder:
    def __init__(self, env: Environment) -> None:
        self.env = env
        self.users: dict[str, JSON] = env.database["users"]
        self.tasks: dict[str, JSON] = env.database["tasks"]
        self.parameters = {
            s["function"]["name"]: s["function"]["parameters"].get("properties", {})
            for s in env.tool_schemas
        }
        self.statuses: list[str] = self.parameters["update_task_status"]["status"]["enum"]

    # -- grounding and the actions schema

    def ground(self, tools: Sequence[str], rng: random.Random) -> MockGrounding:
        known = [t for t in dict.fromkeys(tools) if t in self.env.tool_names]
        needs_task = "update_task_status" in known
        users = [u for u in sorted(self.users) if self.users[u]["tasks"] or not needs_task]
        if not users:
            raise GroundingUnsupported("no mock user has a task to update")
        user_id = rng.choice(users)
        ids = self.users[user_id]["tasks"][:MAX_TASKS]
        tasks = [MockTask(i, self.tasks[i]["title"], self.tasks[i]["status"]) for i in ids]
        return MockGrounding(known, user_id, self.users[user_id]["name"], tasks)

    def actions_schema(
        self, grounding: Grounding, tools: Sequence[str], max_actions: int, lookups: bool
    ) -> JSON:
        if not isinstance(grounding, MockGrounding):
            raise GroundingUnsupported(f"not a mock grounding: {type(grounding).__name__}")
        wanted = [*tools, *READS] if lookups else list(tools)
        allowed = [t for t in dict.fromkeys(wanted) if t in self.env.tool_names]
        branches = [branch(t, self._arguments(grounding, t)) for t in allowed]
        items = {"anyOf": [b for b in branches if not empty(b)]}
        return {"type": "array", "items": items, "minItems": 1, "maxItems": max_actions}

    def _arguments(self, g: MockGrounding, tool: str) -> JSON:
        if tool == "create_task":
            return {"user_id": enum([g.user_id]), "title": text(TITLE_CHARS)}
        if tool == "update_task_status":
            return {"task_id": enum(t.task_id for t in g.tasks), "status": enum(self.statuses)}
        return {name: generic(p) for name, p in self.parameters[tool].items()}

    # -- mutation

    async def mutate(
        self, seed: Task, rng: random.Random, tools: Sequence[str] | None, envs: EnvPool
    ) -> Task | None:
        """`seed` with its one gold write moved onto other values (a seed with several writes
        or none is not mutated; with `tools`, only a write of one of them is)."""
        writes = [a for a in seed.agent_actions if a.name in self.env.write_tools]
        if len(writes) != 1 or (tools and writes[0].name not in tools):
            return None
        old = writes[0]
        candidates = list(self._alternatives(seed, old))
        rng.shuffle(candidates)
        for new in candidates[:MAX_REPLAYS]:
            gold = [new if a is old else a for a in seed.actions]
            if await _changes(envs, seed, gold, self.env.write_tools):
                return self._task(seed, gold, new)
        return None

    def _alternatives(self, seed: Task, old: Action) -> Iterator[Action]:
        """The write on other values: another title, or another task and status."""
        args = old.arguments
        if old.name == "create_task":
            used = {a.arguments.get("title") for t in self.env.tasks() for a in t.actions}
            for title in TITLES:
                if title not in used:
                    yield old.model_copy(update={"arguments": {**args, "title": title}})
        elif old.name == "update_task_status":
            named = [a.arguments.get("task_id") for a in seed.actions]  # e.g. one it created
            ids = dict.fromkeys([*self.tasks, *(i for i in named if isinstance(i, str))])
            for task_id in ids:
                for status in self.statuses:
                    if (task_id, status) != (args.get("task_id"), args.get("status")):
                        new = {**args, "task_id": task_id, "status": status}
                        yield old.model_copy(update={"arguments": new})

    def _task(self, seed: Task, gold: list[Action], write: Action) -> Task:
        """The mutated task: the seed's persona and initial state, a request for `write`."""
        user_id = self._owner(write)
        instructions = UserInstructions(
            domain=self.env.name,
            reason_for_call=_request(write),
            known_info=f"You are {self.users[user_id]['name']}; your user id is {user_id}.",
            task_instructions=INSTRUCTIONS,
        )
        return restated(seed, gold, instructions, key=None, notes=f"mutated from {seed.id}")

    def _owner(self, write: Action) -> str:
        """Whose task it is; one a seed's initial state created belongs to the first user."""
        if write.name == "create_task":
            return str(write.arguments["user_id"])
        task_id = write.arguments.get("task_id")
        return next((u for u, r in self.users.items() if task_id in r["tasks"]), min(self.users))


def _request(write: Action) -> str:
    args = write.arguments
    if write.name == "create_task":
        return f"You want a new task called '{args['title']}' on your to-do list."
    return f"You want task {args['task_id']} marked as {args['status']}."


async def _changes(envs: EnvPool, seed: Task, gold: list[Action], writes: frozenset[str]) -> bool:
    """Whether every gold write succeeds on the seed's initial state, and the database
    changes (a status set to the one it has is no task)."""
    episode = await envs.open(seed)
    try:
        before = await episode.db_hashes()
        for a in gold:
            call = ToolCall(id=a.action_id, name=a.name, arguments=a.arguments)
            if (await episode.step(call)).error and a.name in writes:
                return False
        return await episode.db_hashes() != before
    finally:
        await episode.close()
