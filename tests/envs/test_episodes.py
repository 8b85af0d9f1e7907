"""Episodes in limited children (`envs.episodes`) against tau2 retail: the same results as
in-process, and a hostile tool call stopped without freezing the caller or its neighbours."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest

from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvFailure, EnvPool, ToolStopped
from sentinel.schemas import ChatMessage, Task, TerminationReason, ToolCall
from tests.envs.test_sandbox import sandbox_pids, zombie_children
from tests.ticking import ticking

pytestmark = pytest.mark.anyio
BOMB = ToolCall(id="bomb", name="calculate", arguments={"expression": "9**9**9"})
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def task(retail: Environment) -> Task:
    """retail-0: four reads, then an exchange that changes the database."""
    return next(t for t in retail.tasks("train") if t.id == "retail-0")


@pytest.fixture
async def pool() -> AsyncIterator[EnvPool]:
    """A pool that must leave no process behind."""
    async with EnvPool("retail", tool_timeout_s=TIMEOUT_S) as pool:
        yield pool
    assert sandbox_pids(pool.id) == []
    assert zombie_children() == []


def gold_calls(task: Task) -> list[ToolCall]:
    return [
        ToolCall(id=f"g{i}", name=a.name, arguments=a.arguments) for i, a in enumerate(task.actions)
    ]


async def test_remote_steps_and_reward_equal_in_process_ones(
    pool: EnvPool, retail: Environment, task: Task
) -> None:
    episode, local = await pool.open(task), retail.episode(task)
    messages: list[ChatMessage] = [ChatMessage(role="assistant", content="Hi!")]
    for call in gold_calls(task):
        remote, here = await episode.step(call), local.step(call)
        assert (remote.content, remote.error) == (here.content, here.error)
        messages += [
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content=remote.content, tool_call_id=call.id),
        ]
    stop = TerminationReason.AGENT_STOP
    reward = await episode.reward(messages, stop)
    assert reward == retail.reward(task, local, messages, stop)
    assert reward.db_match is True
    await episode.close()


async def test_a_hostile_call_is_stopped_and_the_event_loop_keeps_going(
    pool: EnvPool, task: Task
) -> None:
    """`9**9**9` holds the GIL for minutes in C; here it costs its own child, not the loop."""
    episode = await pool.open(task)

    async def bomb() -> None:
        with pytest.raises(ToolStopped, match="within 2 s"):
            await episode.step(BOMB)

    _, ticks = await ticking(bomb)
    assert TIMEOUT_S <= ticks.elapsed_s < TIMEOUT_S + 3
    assert ticks.kept_up()  # the loop ran on while the child spun
    assert sandbox_pids(pool.id) == []  # that child is gone
    await episode.close()


async def test_neighbours_of_a_stopped_call_are_rebuilt_by_replay(
    pool: EnvPool, retail: Environment, task: Task
) -> None:
    """Episodes sharing the killed child carry on, in the state their own calls left."""
    calls = gold_calls(task)
    exchange = calls[-1]
    assert exchange.name in retail.write_tools
    neighbour, hostile = await pool.open(task), await pool.open(task)
    assert neighbour.host is hostile.host
    for call in calls:
        assert not (await neighbour.step(call)).error
    with pytest.raises(ToolStopped):
        await hostile.step(BOMB)
    again = await neighbour.step(exchange)  # on a fresh child, after replaying its calls
    assert again.error  # the exchange already happened: its items are no longer delivered
    reward = await neighbour.reward([], TerminationReason.AGENT_STOP)
    assert reward.db_match is True
    await neighbour.close()
    await hostile.close()


async def test_a_cancelled_request_does_not_desync_the_child(
    pool: EnvPool, retail: Environment, task: Task
) -> None:
    first, second = await pool.open(task), await pool.open(task)
    with anyio.move_on_after(0.5):
        await first.step(BOMB)  # cancelled mid-request: its answer must not reach `second`
    call = gold_calls(task)[0]
    result, expected = await second.step(call), retail.episode(task).step(call)
    assert (result.content, result.error) == (expected.content, False)
    await first.close()
    await second.close()


async def test_a_prefix_that_cannot_be_replayed_fails_the_open(pool: EnvPool, task: Task) -> None:
    """LEAFE's resume replays a prefix: a hostile call there is stopped the same way."""
    started = time.monotonic()
    with pytest.raises(EnvFailure, match="no answer to open"):
        await pool.open(task, [BOMB])
    assert time.monotonic() - started < TIMEOUT_S * 3 + 3
