"""A tiny verifiable task for the learning test: pick the colour the reward wants."""

from __future__ import annotations

import json
import random

import anyio

from sentinel.agents.llm import ChatClient
from sentinel.schemas import (
    ChatMessage,
    RewardBreakdown,
    RolloutGroup,
    TerminationReason,
    ToolCall,
    Trajectory,
    TurnTokens,
)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
TARGET = "green"
TOOL = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint the wall in one colour.",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": COLOURS}},
            "required": ["colour"],
            "additionalProperties": False,
        },
    },
}
PROMPTS = [
    "Paint the wall, please.",
    "The wall needs a new colour. Go ahead.",
    "Choose a colour and paint the wall.",
    "Time to repaint the wall!",
]


async def sample(client: ChatClient, prompt: str, version: int) -> Trajectory:
    completion = await client.complete(
        [{"role": "user", "content": prompt}], max_tokens=32, temperature=1.0,
        tools=[TOOL], tool_choice="required", record_tokens=True,
    )  # fmt: skip
    colour = (
        json.loads(completion.tool_calls[0].arguments).get("colour")
        if completion.tool_calls
        else None
    )
    reward = 1.0 if colour == TARGET else 0.0
    return Trajectory(
        task_id=prompt, domain="paint", policy_version=version, policy_model=client.model,
        messages=[
            ChatMessage(role="user", content=prompt),
            ChatMessage(
                role="assistant",
                tool_calls=[ToolCall(id="c", name="paint", arguments={"colour": colour})],
            ),
        ],
        turns=[TurnTokens(message_index=1, prompt_token_ids=completion.prompt_token_ids,
                          completion_token_ids=completion.completion_token_ids,
                          logprobs=completion.logprobs, finish_reason=completion.finish_reason)],
        termination=TerminationReason.AGENT_STOP,
        reward=RewardBreakdown(reward=reward),
    )  # fmt: skip


async def groups(
    client: ChatClient, version: int, size: int, prompts: int, seed: int
) -> list[RolloutGroup]:
    chosen = random.Random(seed).sample(PROMPTS, prompts)
    out: list[RolloutGroup] = []

    async def one(prompt: str) -> None:
        trajectories: list[Trajectory] = []

        async def draw() -> None:
            trajectories.append(await sample(client, prompt, version))

        async with anyio.create_task_group() as tg:
            for _ in range(size):
                tg.start_soon(draw)
        out.append(RolloutGroup(task_id=prompt, policy_version=version, trajectories=trajectories))

    async with anyio.create_task_group() as tg:
        for prompt in chosen:
            tg.start_soon(one, prompt)
    return out
