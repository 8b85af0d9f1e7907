"""The user simulator: an LLM playing a task's user_scenario, by tau2-bench's conventions.

It gets tau2's own system prompt (simulation guidelines plus the scenario) and sees the
conversation with roles flipped: the agent's messages are its "user" turns. It never sees
tool calls, tool results or the agent's error observations. It ends the conversation with
tau2's tokens: ###STOP###, ###TRANSFER### or ###OUT-OF-SCOPE###. A reply too long to be a
turn, or not valid Unicode, is MalformedOutput: the rollout ends as an infra error (the
simulator failed, not the agent).
"""

from __future__ import annotations

from sentinel.agents.llm import ChatClient, Completion, MalformedOutput, Messages, check_text
from sentinel.config import RolloutSettings
from sentinel.schemas import ChatMessage

STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")


def is_stop(message: ChatMessage) -> bool:
    return any(token in (message.content or "") for token in STOP_TOKENS)


class UserSimulator:
    def __init__(self, client: ChatClient, settings: RolloutSettings) -> None:
        self.client = client
        self.settings = settings

    async def reply(self, system_prompt: str, history: list[ChatMessage]) -> ChatMessage:
        """The user's next message, given the task's prompt (tau2's guidelines + scenario)."""
        completion = await self.client.complete(
            self.render(system_prompt, history),
            max_tokens=self.settings.user_max_tokens,
            temperature=self.settings.user_temperature,
        )
        return parse_reply(completion)

    def render(self, system_prompt: str, history: list[ChatMessage]) -> Messages:
        rendered: Messages = [{"role": "system", "content": system_prompt}]
        for m in history:
            if m.error or m.tool_calls or m.role in ("tool", "system"):
                continue
            role = "user" if m.role == "assistant" else "assistant"
            rendered.append({"role": role, "content": m.content or ""})
        return rendered


def parse_reply(completion: Completion) -> ChatMessage:
    """The simulator's completion as the user's message; MalformedOutput says why it is not."""
    raw = completion.content or ""
    try:
        return ChatMessage(role="user", content=check_text(raw, "the user's reply").strip())
    except ValueError as error:
        raise MalformedOutput("user reply", str(error), raw, retry=False) from None
