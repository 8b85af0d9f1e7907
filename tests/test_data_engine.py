"""The data engine as separate processes, as `sentinel up` and Kubernetes run it: Controller,
Proposer, orchestrator (dispatch) and a Celery validate worker on real Redis and vLLM, on
tau2's mock domain (every child loads it in a second; the Proposer's prompts are short)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from sentinel.agents.prompts import PromptBook
from sentinel.config import LOCAL_KEY_ENV, ProposerSettings, Settings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.patterns import PatternLibrary
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.streams import Stream
from sentinel.process import start_child, stop_child
from sentinel.schemas import (
    ChatMessage,
    Envelope,
    RewardBreakdown,
    TaskProposal,
    TerminationReason,
    ToolCall,
    Trajectory,
    ValidationResult,
)
from tests.factories import todo

pytestmark = pytest.mark.anyio
COMMANDS = (["controller"], ["proposer"], ["orchestrator"], ["worker", "validate"])


def failure(task_id: str, domain: Environment, i: int) -> Trajectory:
    """The task's reads done, its writes never: a real, typical failure."""
    task = next(t for t in domain.tasks("train") if t.id == task_id)
    criteria = task.spec.evaluation_criteria
    assert criteria is not None
    messages = [ChatMessage(role="user", content="Hi, I need help with my tasks.")]
    for j, action in enumerate(
        a for a in criteria.actions or [] if a.name not in domain.write_tools
    ):
        call = ToolCall(id=f"c{j}", name=action.name, arguments=action.arguments)
        messages += [
            ChatMessage(role="assistant", tool_calls=[call]),
            ChatMessage(role="tool", content="{}", tool_call_id=f"c{j}"),
        ]
    messages.append(ChatMessage(role="assistant", content="Done! ###STOP###"))
    return Trajectory(
        id=f"failure-{i}", task_id=task_id, domain=domain.name, policy_version=0,
        policy_model="smol", messages=messages, termination=TerminationReason.AGENT_STOP,
        reward=RewardBreakdown(reward=0.0, components={"DB": 0.0}),
    )  # fmt: skip


async def count(bus: Bus, stream: Stream) -> int:
    return int(await bus.redis.xlen(bus.keys.stream(stream)))


async def verdicts(bus: Bus) -> dict[str, ValidationResult]:
    entries = await bus.redis.xrange(bus.keys.stream(Stream.VALIDATIONS))
    found = [Envelope.from_wire(f, ValidationResult).payload for _, f in entries]
    return {v.proposal_id: v for v in found}


async def test_failures_become_patterns_proposals_verdicts_and_tasks(
    settings: Settings, bus: Bus, policy_url: str, tmp_path: Path
) -> None:
    keep = LOCAL_KEY_ENV  # the tests' server's key: the children call it
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_") or k == keep}
    env |= {
        "SENTINEL_REDIS_URL": settings.redis_url or "",
        "SENTINEL_RUN_DIR": str(tmp_path / "run"),
        "SENTINEL_BUS__PREFIX": settings.bus.prefix,
        "SENTINEL_ENV__DOMAIN": "mock",
        "SENTINEL_BUS__BLOCK_MS": "200",
        "SENTINEL_LOG__FORMAT": "json",
        "SENTINEL_LLM__CONTROLLER__BASE_URL": policy_url,
        "SENTINEL_LLM__PROPOSER__BASE_URL": policy_url,
        "SENTINEL_CONTROLLER__MAX_TOKENS": "160",
        "SENTINEL_PROPOSER__TASKS_PER_PATTERN": "2",
        "SENTINEL_PROPOSER__MAX_TOKENS": "384",  # mock's drafts are short
        "SENTINEL_VALIDATION__WARM": "1",
        "SENTINEL_WORKERS__CONCURRENCY": "1",
    }
    domain = load(named("mock"))
    [writer] = [
        t.id for t in domain.tasks("train")
        if [a.name for a in t.agent_actions] == ["create_task"]
    ]  # fmt: skip
    writers = [writer, writer]  # two failures of one task: one pattern
    processes = [
        start_child([sys.executable, "-m", "sentinel", *c], tmp_path / f"{c[0]}.log", env)
        for c in COMMANDS
    ]
    # beside the LLM's proposals (which a 135M model may all get wrong), a correct one: the
    # dispatcher, the worker, the pool and the tasks stream must accept it
    gold = todo(domain, "engine-gold")
    known = TaskProposal(id="p-gold", task=gold, prompt_version="v-test", proposer_model="test")
    try:
        await bus.publish_many(
            Stream.TRAJECTORIES, [failure(t, domain, i) for i, t in enumerate(writers)]
        )
        await bus.publish(Stream.PROPOSALS, known)
        with anyio.fail_after(300):
            while len(found := await verdicts(bus)) < 3 or known.id not in found:
                assert all(p.poll() is None for p in processes), "a process died"
                await anyio.sleep(1)
    finally:
        for process in processes:
            stop_child(process)
    logs = {c[0]: (tmp_path / f"{c[0]}.log").read_text() for c in COMMANDS}
    assert [p.returncode for p in processes] == [0] * len(processes), logs
    assert await count(bus, Stream.DIAGNOSES) == 2
    patterns = await PatternLibrary(bus.redis, settings.bus.prefix).all()
    assert patterns
    assert patterns[0].category.value == "missing_action"  # the writes never happened
    assert "create_task" in patterns[0].tools
    assert await count(bus, Stream.PROPOSALS) >= 2
    book = PromptBook(bus.redis, settings.bus.prefix, ProposerSettings())
    tallies = [await book.tally(f"pattern:{p.id}") for p in patterns]
    assert sum(t.verdicts for t in tallies) >= 2  # the verdicts came back to the Proposer
    found = await verdicts(bus)
    assert (found[known.id].accepted, found[known.id].reasons) == (True, [])
    stored = await TaskPool(bus.redis, settings.bus.prefix).get(gold.id)
    assert stored is not None
    assert stored.spec == gold.spec
    assert await count(bus, Stream.TASKS) == sum(v.accepted for v in found.values()) >= 1
    assert '"event": "validated"' in logs["worker"]
