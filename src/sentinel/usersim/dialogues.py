"""Gold-action dialogues: what a faithful user says, as SFT data for the user model.

The agent side is scripted from the task's gold actions (greet, ask for a fact the user does
not have, ask for identification, confirm each write, close); the user side from its scenario
(the request, "I don't know" for the unknown fact, the known identity, "yes" to each gold
write, ###STOP### at the end). The same dialogues give the fidelity probes their context.

Examples are rendered from the user simulator's point of view exactly as
`UserSimulator.render` renders a rollout (tau2's prompt, roles flipped), so the user model
learns the prompt it is served with. Test-split tasks are refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sentinel.agents.llm import Completion, Messages
from sentinel.agents.rollout import GREETING
from sentinel.agents.user import UserSimulator
from sentinel.config import RolloutSettings
from sentinel.envs.registry import pack
from sentinel.schemas import Action, ChatMessage, SFTExample, Task
from sentinel.usersim.scenario import Scenario, identify, opening, scenario_of

if TYPE_CHECKING:
    from sentinel.envs.base import Environment

Stage = Literal["greeting", "withhold", "identify", "confirm", "close"]
STOP = "###STOP###"

CLOSE = "Everything you asked for is done. Is there anything else I can help you with?"
AGREE = ("Yes, please go ahead.", "Yes, I confirm.", "Yes, that's right, please do it.")
THANKS = ("No, that's all. Thank you!", "That's everything, thanks for your help!")


@dataclass
class Dialogue:
    """A scripted conversation in rollout order (agent = assistant), and where to probe it:
    each stage names the agent message after which the user speaks."""

    task: Task
    scenario: Scenario
    messages: list[ChatMessage] = field(default_factory=list)
    stages: dict[Stage, int] = field(default_factory=dict)

    def agent(self, text: str, stage: Stage | None = None) -> None:
        if stage is not None and stage not in self.stages:
            self.stages[stage] = len(self.messages)
        self.messages.append(ChatMessage(role="assistant", content=text))

    def user(self, text: str) -> None:
        self.messages.append(ChatMessage(role="user", content=text))

    def prefix(self, stage: Stage) -> list[ChatMessage]:
        """The conversation up to and including the agent's message of `stage`."""
        return self.messages[: self.stages[stage] + 1]


def script(task: Task, write_tools: frozenset[str]) -> Dialogue:
    scenario, phrasing = scenario_of(task), pack(task.domain).phrasing
    pick = zlib.crc32(task.id.encode())  # stable variety across tasks
    writes = [a for a in task.agent_actions if a.name in write_tools]
    dialogue = Dialogue(task, scenario)
    dialogue.agent(GREETING, "greeting")
    dialogue.user(opening(writes, phrasing))
    dialogue.agent(scenario.withheld_kind.question, "withhold")
    dialogue.user(f"Sorry, I don't have my {scenario.withheld} with me.")
    dialogue.agent(phrasing.ask_identity, "identify")
    dialogue.user(identify(scenario))
    done = "Thanks, I found your account."
    steps: list[Action | None] = [*writes] or [None]  # no write: one generic step
    for action in steps:
        ask = f"I can {_describe(action)}. Do you confirm you want me to proceed (yes/no)?"
        dialogue.agent(f"{done} {ask}", "confirm")
        dialogue.user(AGREE[pick % len(AGREE)])
        done = "Done."
    dialogue.agent(CLOSE, "close")
    dialogue.user(f"{THANKS[pick % len(THANKS)]} {STOP}")
    return dialogue


def _describe(action: Action | None) -> str:
    """A gold write in the agent's words, with the ids the user should recognise."""
    if action is None:
        return "look into that for you now"
    args = action.arguments
    verb = action.name.replace("_", " ")
    order = f" for order {args['order_id']}" if "order_id" in args else ""
    items = args.get("item_ids")
    what = f" (items {', '.join(map(str, items))})" if isinstance(items, list) else ""
    return f"{verb}{order}{what}"


class _Offline:
    """A client that is never called: `UserSimulator.render` needs no endpoint."""

    model = "offline"

    async def complete(self, messages: Messages, **options: Any) -> Completion:
        raise RuntimeError("rendering only")


def user_view(system_prompt: str, history: list[ChatMessage]) -> Messages:
    """The conversation as the user simulator is prompted with it in a rollout."""
    return UserSimulator(_Offline(), RolloutSettings()).render(system_prompt, history)


def example(dialogue: Dialogue, system_prompt: str) -> SFTExample:
    """The dialogue as an SFT example whose trained messages are the user's turns."""
    messages = user_view(system_prompt, dialogue.messages)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return SFTExample(
        source="user_model", task_id=dialogue.task.id, messages=messages, trained=trained
    )


def build_examples(domain: Environment, tasks: Sequence[Task]) -> list[SFTExample]:
    """One user-model example per task (tau2 train tasks, accepted proposed tasks)."""
    if leaked := [t.id for t in tasks if t.provenance.split == "test"]:
        raise ValueError(f"test-split tasks cannot train the user model: {', '.join(leaked)}")
    return [example(script(t, domain.write_tools), domain.user_prompt(t)) for t in tasks]
