"""A user that stays in role: it answers from the task's own scenario by rules, no LLM.

With SmolLM2 as the user simulator, 120 of 128 recorded failures were the user's: it greets
the agent back, offers help, recites its instructions (`usersim.rules`). On such a user the
Solver learns nothing about its own errors. `rollout.user: scripted` replaces the LLM with
this user, which says only what the scenario and the domain's phrasing (`DomainPack.phrasing`)
let it say:

- first, what it wants, in the pack's customer words, with the details a customer would give
  (the values of the gold writes' arguments); a task with nothing to write but facts to be
  told (`communicate_info`) asks the question its scenario quotes;
- asked who it is, the identity facts of its scenario; asked for a kind of fact (an order
  id, an email), the value its scenario holds, or that it does not have it (never made up);
- asked to confirm, yes;
- once every gold write has gone through (or it has been told every fact), or the agent
  asks if there is anything else, thanks and ###STOP###; after `max_turns` turns without
  that, ###STOP### too.

It cannot call the user's own tools (telecom's phone), so where a task needs them it ends
when its turns run out. Its replies are deterministic: a group's variance comes from the
Solver alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sentinel.envs.base import Environment
from sentinel.schemas import Action, ChatMessage, Task
from sentinel.usersim.scenario import Scenario, identify, opening, scenario_of, spoken

STOP = "###STOP###"
CONFIRM = re.compile(
    r"\b(confirm|proceed|go ahead|shall i|should i|do you want me|would you like me|"
    r"is that (?:right|correct|ok)|yes or no|yes/no)\b",
    re.I,
)
CLOSING = re.compile(r"\b(anything else|something else|all set)\b", re.I)
IDENTITY = re.compile(r"\b(who you are|your name|zip|identify|verify|locate your account)\b", re.I)
DONE = "Thank you, that's all I needed. " + STOP
QUOTED = re.compile(
    r"\"([^\"]{4,300})\""
)  # a question the scenario quotes, as the Proposer writes it
GIVE_UP = "I think we're stuck, so I'll leave it there. Thanks anyway. " + STOP


class ScriptedUser:
    """The user side of a rollout, from the task's scenario (see the module's docstring)."""

    client = None  # no endpoint: nothing to close

    def __init__(self, domain: Environment, max_turns: int = 8) -> None:
        self.domain = domain
        self.max_turns = max_turns

    async def reply(
        self, system_prompt: str, history: list[ChatMessage], task: Task
    ) -> ChatMessage:
        return ChatMessage(role="user", content=self.say(task, history))

    def say(self, task: Task, history: Sequence[ChatMessage]) -> str:
        scenario = scenario_of(task)
        writes = [a for a in task.agent_actions if a.name in self.domain.write_tools]
        criteria = task.spec.evaluation_criteria
        to_hear = list(criteria.communicate_info or []) if criteria else []
        turns = sum(m.role == "user" and not m.tool_calls for m in history)
        if turns == 0:
            return self._ask(scenario) if to_hear and not writes else self._request(writes)
        if writes and _done(writes, history):
            return DONE
        if to_hear and not writes and _told(to_hear, history):
            return DONE
        if turns >= self.max_turns:
            return GIVE_UP
        said = _last_agent_text(history)
        if CLOSING.search(said):  # the agent says it is done: the agent answers for that
            return DONE
        if CONFIRM.search(said):
            return "Yes, please go ahead."
        if answer := self._fact(scenario, said):
            return answer
        return self._request(writes)

    def _request(self, writes: Sequence[Action]) -> str:
        wanted = opening(writes, self.domain.pack.phrasing)
        details = list(dict.fromkeys(v for w in writes for v in spoken(w.arguments)))
        return f"{wanted} The details: {', '.join(details)}." if details else wanted

    @staticmethod
    def _ask(scenario: Scenario) -> str:
        """A question task's first words: the question its scenario quotes, else its reason."""
        quoted = QUOTED.search(scenario.reason)
        return quoted.group(1) if quoted else scenario.reason

    def _fact(self, scenario: Scenario, said: str) -> str | None:
        """The answer to a question for a fact, or None when none was asked. "Who are you"
        (or several kinds at once: "your name and zip code, or your user id") gets the
        identity facts the scenario has; one kind, its value or that the user lacks it."""
        asked = [k for k in self.domain.pack.phrasing.kinds if k.mention.search(said)]
        if scenario.identity and (IDENTITY.search(said) or len(asked) > 1):
            return identify(scenario)
        if not asked:
            return None
        kind = asked[0]
        value = kind.value.search(scenario.text)
        if value is None or kind.name == scenario.withheld:
            return f"Sorry, I don't have my {kind.name} with me."
        return f"Sure, my {kind.name} is {value.group(0)}."


def _last_agent_text(history: Sequence[ChatMessage]) -> str:
    for message in reversed(history):
        if message.role == "assistant" and not message.tool_calls:
            return message.content or ""
    return ""


def _told(facts: Sequence[str], history: Sequence[ChatMessage]) -> bool:
    """Every fact the task must communicate is in something the agent said (tau2 checks it
    the same way: a case-insensitive substring of an assistant message)."""
    said = " ".join((m.content or "").lower() for m in history if m.role == "assistant")
    return all(fact.lower() in said for fact in facts)


def _done(writes: Sequence[Action], history: Sequence[ChatMessage]) -> bool:
    """Every gold write was called with its arguments, and its result was no error."""
    failed = {m.tool_call_id for m in history if m.role == "tool" and m.error}
    made = [
        (call.name, call.arguments)
        for m in history if m.role == "assistant"
        for call in m.tool_calls if call.id not in failed
    ]  # fmt: skip
    return all((w.name, w.arguments) in made for w in writes)
