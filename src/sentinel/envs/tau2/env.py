"""tau2-bench domains as SENTINEL environments (`base.Environment`).

A `Tau2Env` loads a domain's tasks and splits, exposes its tools as OpenAI tool schemas
with its policy, starts a fresh `Episode` per rollout, replays a prefix of tool calls to
rebuild any intermediate state, and scores a finished conversation by tau2's own rules:
no reward unless the agent or the user ended it; otherwise the product of the parts in the
task's reward_basis (DB hash against the gold replay, env assertions, gold actions, required
communication). The gold hashes are computed once per task (the most recent
`gold_cache_size` tasks are kept).

Tasks name environment functions outside the tool lists too: initial-state actions and env
assertions go through tau2's `getattr` dispatch, which would call anything the toolkit object
has (`__init__`, `update_db`, ...). `functions` and `assertion_functions` are the allow-lists,
read from the domain's own toolkit classes, and `call_problems` checks a task against them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, Literal

from loguru import logger as _tau2_logger

from sentinel.envs import checks
from sentinel.envs.base import (
    STOPPED,
    Entities,
    Interaction,
    Split,
    State,
    ToolResult,
    UnsupportedTask,
    partial_credit,
    unscored,
)
from sentinel.envs.registry import Tau2EnvSettings, pack
from sentinel.logs import get_logger

log = get_logger(__name__)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import


def _quiet_tau2() -> None:
    """tau2 logs through loguru at DEBUG; keep its warnings, in our structured logs."""
    _tau2_logger.remove()
    _tau2_logger.add(
        lambda m: log.warning("tau2", message=m.record["message"], source=m.record["name"]),
        level="WARNING",
    )


_quiet_tau2()  # before tau2's modules log at import

from tau2.data_model import message as tau2_message
from tau2.data_model import tasks as tau2_tasks
from tau2.environment.environment import Environment
from tau2.environment.toolkit import ToolKitBase
from tau2.evaluator.evaluator_action import ActionEvaluator
from tau2.evaluator.evaluator_communicate import CommunicateEvaluator

from sentinel.schemas import (
    ChatMessage,
    Origin,
    Provenance,
    RewardBasis,
    RewardBreakdown,
    Task,
    TaskSpec,
    TerminationReason,
    ToolCall,
)

GOLD_CACHE_SIZE = 1024  # tasks whose gold hashes a domain keeps
EnvType = Literal["assistant", "user"]


def to_tau2_task(task: Task) -> tau2_tasks.Task:
    return tau2_tasks.Task.model_validate(task.spec.model_dump(mode="json"))


def to_tau2_messages(messages: Sequence[ChatMessage]) -> list[tau2_message.Message]:
    """Our conversation in tau2's message classes, for its evaluators."""
    requestors: dict[str, Literal["assistant", "user"]] = {}
    converted: list[tau2_message.Message] = []
    for m in messages:
        calls = [
            tau2_message.ToolCall(
                id=c.id, name=c.name, arguments=c.arguments, requestor=c.requestor
            )
            for c in m.tool_calls
        ]
        requestors.update((c.id, c.requestor) for c in m.tool_calls)
        if m.role == "system":
            converted.append(tau2_message.SystemMessage(role="system", content=m.content))
        elif m.role == "assistant":
            converted.append(
                tau2_message.AssistantMessage(
                    role="assistant", content=m.content, tool_calls=calls or None
                )
            )
        elif m.role == "user":
            converted.append(
                tau2_message.UserMessage(role="user", content=m.content, tool_calls=calls or None)
            )
        else:
            call_id = m.tool_call_id or ""
            converted.append(
                tau2_message.ToolMessage(
                    id=call_id, role="tool", content=m.content, error=m.error,
                    requestor=requestors.get(call_id, "assistant"),
                )
            )  # fmt: skip
    return converted


class Episode:
    """The live environment of one rollout."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.calls: list[ToolCall] = []

    def step(self, call: ToolCall) -> ToolResult:
        """Run one tool call; errors (unknown tool, bad arguments) come back as results."""
        self.calls.append(call)
        response = self.env.get_response(
            tau2_message.ToolCall(
                id=call.id, name=call.name, arguments=call.arguments, requestor=call.requestor
            )
        )
        return ToolResult(content=response.content or "", error=response.error)

    def db_hashes(self) -> tuple[str | None, str | None]:
        return self.env.get_db_hash(), self.env.get_user_db_hash()

    def db_state(self) -> State:
        agent, user = self.env.tools.db, self.env.user_tools
        return (
            agent.model_dump(mode="json") if agent is not None else {},
            user.db.model_dump(mode="json") if user is not None and user.db is not None else None,
        )


class Tau2Env:
    """One tau2-bench domain: tasks, tools, policy, episodes and tau2's reward."""

    def __init__(
        self, settings: Tau2EnvSettings | None = None, gold_cache_size: int = GOLD_CACHE_SIZE
    ) -> None:
        self.settings = settings or Tau2EnvSettings()
        self.name = name = self.settings.domain
        self.pack = pack(name)
        module = importlib.import_module(f"tau2.domains.{name}.environment")
        self._make_env: Callable[..., Environment] = module.get_environment
        self._get_tasks: Callable[..., list[tau2_tasks.Task]] = module.get_tasks
        self._get_split: Callable[[], dict[str, list[str]]] = module.get_tasks_split
        self._gold: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()  # LRU
        self.gold_cache_size = gold_cache_size

    @cached_property
    def _template(self) -> Environment:
        return self._make_env()

    @cached_property
    def _snapshot(self) -> tuple[Any, str] | None:
        """The parsed database's class and JSON: new environments copy it, not the file."""
        db = self._template.tools.db
        return (type(db), db.model_dump_json()) if db is not None else None

    def _fresh_env(self) -> Environment:
        if self._snapshot is None:
            return self._make_env()
        db_class, raw = self._snapshot
        return self._make_env(db=db_class.model_validate_json(raw))

    @cached_property
    def initial_hashes(self) -> tuple[str | None, str | None]:
        """Agent and user DB hashes of a fresh environment (a task without initial state)."""
        return Episode(self._fresh_env()).db_hashes()

    @cached_property
    def policy(self) -> str:
        return str(self._template.get_policy())

    @cached_property
    def tool_schemas(self) -> list[dict[str, Any]]:
        """The agent's tools in OpenAI's function-calling format."""
        return [tool.openai_schema for tool in self._template.get_tools()]

    @cached_property
    def tool_names(self) -> frozenset[str]:
        return frozenset(schema["function"]["name"] for schema in self.tool_schemas)

    @cached_property
    def tool_kinds(self) -> dict[str, str]:
        """Each agent tool's kind as tau2 declares it: read, write, think or generic."""
        tools = self._template.tools
        return {name: str(tools.tool_type(name).value) for name in self.tool_names}

    @cached_property
    def interaction(self) -> Interaction:
        return Interaction(user_simulator=True, user_tools=frozenset(self.user_tool_schemas))

    @cached_property
    def user_tool_schemas(self) -> dict[str, dict[str, Any]]:
        """The user's tools (telecom's phone), name -> parameters schema; {} if it has none."""
        tools = self._template.user_tools
        if tools is None:
            return {}
        schemas = [tool.openai_schema["function"] for tool in tools.get_tools().values()]
        return {s["name"]: s.get("parameters", {}) for s in schemas}

    def functions(self, env_type: EnvType) -> frozenset[str]:
        """What a task's initial-state actions may call on one side: the public methods the
        domain's toolkit class defines (its tools, setters and assertions), not those of
        tau2's base class or anything private."""
        return self._allowed[env_type][0]

    def assertion_functions(self, env_type: EnvType) -> frozenset[str]:
        """What an env assertion may call: those of `functions` declared to return a bool."""
        return self._allowed[env_type][1]

    @cached_property
    def _allowed(self) -> dict[EnvType, tuple[frozenset[str], frozenset[str]]]:
        allowed: dict[EnvType, tuple[frozenset[str], frozenset[str]]] = {}
        sides: list[tuple[EnvType, Any]] = [
            ("assistant", self._template.tools), ("user", self._template.user_tools),
        ]  # fmt: skip
        for env_type, toolkit in sides:
            names: set[str] = set()
            for cls in type(toolkit).__mro__ if toolkit is not None else ():
                if cls is ToolKitBase or not issubclass(cls, ToolKitBase):
                    continue
                names.update(
                    name for name, value in vars(cls).items()
                    if not name.startswith("_") and inspect.isfunction(value)
                )  # fmt: skip
            checks = {
                name for name in names
                if inspect.signature(getattr(toolkit, name)).return_annotation in (bool, "bool")
            }  # fmt: skip
            allowed[env_type] = (frozenset(names), frozenset(checks))
        return allowed

    def spec_problems(self, task: Task) -> list[str]:
        """Why tau2 cannot load `task` as a task of its own; [] if it can."""
        try:
            to_tau2_task(task)
        except (ValueError, TypeError) as error:  # pydantic's ValidationError too
            return [str(error)[:500]]
        return []

    def call_problems(self, task: Task) -> list[str]:
        """Each function a task names that it may not call: initial-state actions, env
        assertions and the user's gold actions, against the allow-lists above."""
        problems: list[str] = []
        state = task.spec.initial_state or {}
        for i, action in enumerate(state.get("initialization_actions") or []):
            problems += self._disallowed(f"initial_state action {i}", action, self.functions)
        criteria = task.spec.evaluation_criteria
        for i, check in enumerate((criteria.env_assertions or []) if criteria else []):
            problems += self._disallowed(
                f"env_assertion {i}", check.model_dump(), self.assertion_functions
            )
        for i, gold in enumerate(task.actions):
            if gold.requestor == "user" and gold.name not in self.user_tool_schemas:
                allowed = ", ".join(sorted(self.user_tool_schemas)) or "none in this domain"
                problems.append(f"action {i} ({gold.name}): not a user tool; use one of {allowed}")
        return problems

    @staticmethod
    def _disallowed(
        where: str, call: Any, allowed: Callable[[EnvType], frozenset[str]]
    ) -> list[str]:
        if not isinstance(call, dict):
            return [f"{where}: not an object"]
        env_type, name = call.get("env_type"), call.get("func_name")
        if env_type not in ("assistant", "user"):
            return [f"{where}: env_type must be 'assistant' or 'user', not {env_type!r}"]
        names = allowed(env_type)
        if not isinstance(name, str) or name not in names:
            choices = ", ".join(sorted(names)) or "none"
            return [f"{where}: {str(name)[:80]!r} is not a {env_type} function; use one of "
                    f"{choices}"]  # fmt: skip
        if not isinstance(call.get("arguments", {}), dict):
            return [f"{where}: arguments must be an object"]
        return []

    @cached_property
    def write_tools(self) -> frozenset[str]:
        return frozenset(name for name, kind in self.tool_kinds.items() if kind == "write")

    @cached_property
    def database(self) -> dict[str, Any]:
        """The agent-side database in its initial state, as plain JSON data (do not mutate)."""
        db = self._template.tools.db
        return dict(db.model_dump(mode="json")) if db is not None else {}

    @cached_property
    def entities(self) -> Entities:
        return Entities.index(
            self.database, *self.pack.entity_fields, null_status=self.pack.null_status
        )

    @cached_property
    def splits(self) -> dict[str, frozenset[str]]:
        return self.pack.splits({name: frozenset(ids) for name, ids in self._get_split().items()})

    def tasks(self, split: Split | None = None) -> list[Task]:
        """The domain's tasks (all, or one split, as the pack defines it), with seed
        provenance."""
        if split is not None and split not in self.splits:
            raise ValueError(f"{self.name} has no {split!r} split; it has {sorted(self.splits)}")
        wanted = self.splits[split] if split else frozenset().union(*self.splits.values())
        chosen = [t for t in self._all_tasks if t.id in wanted]
        test_ids = self.splits.get("test", frozenset())
        return [
            Task(
                id=f"{self.name}-{t.id}",
                domain=self.name,
                spec=TaskSpec.model_validate(t.model_dump(mode="json")),
                provenance=Provenance(
                    origin=Origin.SEED, split="test" if t.id in test_ids else "train"
                ),
            )
            for t in chosen
        ]

    @cached_property
    def _all_tasks(self) -> list[tau2_tasks.Task]:
        return self._get_tasks(task_split_name=None)

    def episode(self, task: Task) -> Episode:
        """A fresh environment in the task's initial state."""
        env = self._fresh_env()
        spec = to_tau2_task(task)
        state = spec.initial_state
        env.set_state(
            initialization_data=state.initialization_data if state else None,
            initialization_actions=state.initialization_actions if state else None,
            message_history=(state.message_history or []) if state else [],
        )
        return Episode(env)

    def user_prompt(self, task: Task) -> str:
        """tau2's user-simulator system prompt: its guidelines plus the task's scenario."""
        from tau2.user.user_simulator import UserSimulator  # imports litellm: only when needed

        scenario = str(to_tau2_task(task).user_scenario)
        tools = self._template.get_user_tools() if self.user_tool_schemas else None
        return str(UserSimulator(tools=tools, instructions=scenario).system_prompt)  # tau2's

    def replay(self, task: Task, calls: Sequence[ToolCall]) -> Episode:
        """Rebuild the state after `calls` (a trajectory's prefix) on a fresh environment."""
        episode = self.episode(task)
        for call in calls:
            episode.step(call)
        return episode

    def gold_hashes(self, task: Task) -> tuple[str | None, str | None]:
        """Agent and user DB hashes after tau2's gold replay (errors ignored), cached."""
        key = hashlib.sha256(task.spec.model_dump_json().encode()).hexdigest()
        if key in self._gold:
            self._gold.move_to_end(key)
        else:
            episode = self.episode(task)
            for action in task.actions:
                try:
                    episode.env.make_tool_call(
                        tool_name=action.name, requestor=action.requestor, **action.arguments
                    )
                except Exception as error:  # tau2 ignores failing gold actions too
                    log.debug("gold action failed", action=action.name, error=str(error))
            self._gold[key] = episode.db_hashes()
            while len(self._gold) > self.gold_cache_size:
                self._gold.popitem(last=False)
        return self._gold[key]

    def reward(
        self,
        task: Task,
        episode: Episode,
        messages: Sequence[ChatMessage],
        termination: TerminationReason,
    ) -> RewardBreakdown:
        """tau2's reward for a finished conversation whose tool calls ran in `episode`, with
        the share of gold actions done (`partial`) beside it."""
        partial = partial_credit(task, messages)
        # the task's own checks measure progress in the state, where the actions' credit
        # measures it in the calls: partial credit takes the better of the two
        checked = checks.passed(task.checks, episode.db_state()) if task.checks else None
        if termination not in STOPPED:
            unended = unscored(task, messages, termination)
            return unended.model_copy(
                update={"checks": checked, "partial": max(unended.partial, checked or 0.0)}
            )
        criteria = task.spec.evaluation_criteria
        if criteria is None:
            return RewardBreakdown(reward=1.0, partial=1.0, info={"note": "no evaluation criteria"})
        basis = set(criteria.reward_basis)
        if RewardBasis.NL_ASSERTION in basis:
            raise UnsupportedTask(f"{task.id}: NL assertions need an LLM judge")
        components: dict[str, float] = {}
        db_match: bool | None = None
        if basis & {RewardBasis.DB, RewardBasis.ENV_ASSERTION} and (
            criteria.actions is not None or criteria.env_assertions is not None
        ):
            db_match = episode.db_hashes() == self.gold_hashes(task)
            if RewardBasis.DB in basis:
                components["DB"] = 1.0 if db_match else 0.0
            if RewardBasis.ENV_ASSERTION in basis:
                components["ENV_ASSERTION"] = self._assertions(task, episode)
        tau2_task, tau2_messages = to_tau2_task(task), to_tau2_messages(messages)
        if RewardBasis.ACTION in basis:
            components["ACTION"] = ActionEvaluator.calculate_reward(tau2_task, tau2_messages).reward
        missing: list[str] = []
        if RewardBasis.COMMUNICATE in basis:
            result = CommunicateEvaluator.calculate_reward(tau2_task, tau2_messages)
            components["COMMUNICATE"] = result.reward
            missing = [c.info for c in result.communicate_checks or [] if not c.met]
        reward = 1.0
        for value in components.values():
            reward *= value
        return RewardBreakdown(
            reward=reward, components=components, db_match=db_match, checks=checked,
            missing_communication=missing, partial=max(partial, reward, checked or 0.0),
        )  # fmt: skip

    def _assertions(self, task: Task, episode: Episode) -> float:
        return 0.0 if self.assertions_met(task, episode) is False else 1.0

    def assertions_met(self, task: Task, episode: Episode) -> bool | None:
        """Whether the task's env assertions hold in `episode`; None if it has none. Raises
        what tau2 raises for one it cannot evaluate (run it where limits apply)."""
        spec = to_tau2_task(task)
        assertions = spec.evaluation_criteria.env_assertions if spec.evaluation_criteria else None
        if not assertions:
            return None
        env = episode.env
        return all(env.run_env_assertion(a, raise_assertion_error=False) for a in assertions)
