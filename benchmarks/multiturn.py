"""Multi-turn rows: the same rollout groups as re-rendered rows (the chat path) and as
token-in/token-out rows.

Rollout groups are sampled once, on the token path (`rollout.token_io`), against the real
server. The baseline is what the chat path records for the same turns: each turn's prompt is
the conversation so far rendered again by the server's chat template (`/tokenize` with the
tools and a generation prompt, what `/v1/chat/completions` renders), followed by the same
sampled tokens; batch.pack joins turns into one row only where a prompt extends the previous
row token for token. Both sets of rows then go through one GRPO step of the real trainer
(LoRA on CPU). So that no group is filtered for equal rewards (SmolLM2 rarely solves a task),
the step trains with rewards 1, 0, 1, 0... in each group; the rows do not depend on them.

Figures: rows and trained tokens (row tokens the trainer runs) per group, trainer seconds
per group, the largest |trainer - vLLM| logprob over the sampled tokens of the token rows,
and a trajectory's size as JSON on the bus (one copy; the chat path records `turns`, the
token path `tokens`). With `--action-format guided`, vLLM's logprobs are after the grammar's
mask, so max_logprob_abs_diff measures the grammar, not the rows (tests/agents/
test_transcript.py). The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import torch

from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.solver import Solver
from sentinel.agents.user import UserSimulator
from sentinel.config import LLMEndpoint, RolloutSettings, Settings, TrainerSettings
from sentinel.envs.registry import load, named
from sentinel.schemas import RewardBreakdown, RolloutGroup, Trajectory, TurnTokens
from sentinel.serving.model import prepare_model
from sentinel.training.batch import Sample, pack
from sentinel.training.grpo import collate, policy_logprobs
from sentinel.training.policy import Policy


async def sample_groups(
    url: str, domain: str, settings: RolloutSettings, groups: int, size: int
) -> tuple[list[RolloutGroup], Solver]:
    env = load(named(domain))
    endpoint = LLMEndpoint(base_url=url, model="smol")
    solver_client, user_client = OpenAIChatClient(endpoint), OpenAIChatClient(endpoint)
    solver = Solver(solver_client, env.policy, env.tool_schemas, settings)
    runner = RolloutRunner(env, solver, UserSimulator(user_client, settings), settings=settings)
    try:
        made = [await runner.run_group(task, size) for task in env.tasks("train")[:groups]]
    finally:
        await runner.aclose()
    return made, solver


async def rerendered(url: str, solver: Solver, trajectory: Trajectory) -> Trajectory:
    """The trajectory as the chat path records it: each turn's prompt rendered again."""
    client = OpenAIChatClient(LLMEndpoint(base_url=url, model="smol"))
    turns = []
    try:
        for segment in trajectory.tokens:
            for span in segment.turns:
                history = trajectory.messages[: span.message_index]
                prompt = await client.tokenize(solver.render(history), tools=solver.tools)
                completion = segment.token_ids[span.start : span.end]
                turns.append(TurnTokens(
                    message_index=span.message_index, prompt_token_ids=prompt,
                    completion_token_ids=completion, logprobs=span.logprobs,
                    finish_reason=span.finish_reason, temperature=segment.temperature,
                ))  # fmt: skip
    finally:
        await client.aclose()
    return trajectory.model_copy(update={"turns": turns, "tokens": []})


def rewarded(group: RolloutGroup) -> RolloutGroup:
    """The group with rewards 1, 0, 1, 0...: informative, so the step trains on every row."""
    trajectories = [
        t.model_copy(update={"reward": RewardBreakdown(reward=float(i % 2 == 0))})
        for i, t in enumerate(group.trajectories)
    ]
    return group.model_copy(update={"trajectories": trajectories})


def trainer_seconds(policy: Policy, groups: list[RolloutGroup]) -> float:
    started = time.perf_counter()
    for group in groups:
        report = policy.grpo_step([rewarded(group)])
        assert report.trained_groups, report.dropped_groups
    return (time.perf_counter() - started) / len(groups)


def max_gap(model: torch.nn.Module, trajectories: list[Trajectory]) -> float:
    gap = 0.0
    for trajectory in trajectories:
        for ids, mask, behaviour, temperature in pack(trajectory):
            if not any(mask):
                continue
            sample = Sample(ids, mask, behaviour, 0.0, 0.0, trajectory.id, temperature=temperature)
            tensors = collate([sample], pad_id=0, device=torch.device("cpu"))
            with torch.no_grad():
                logp = policy_logprobs(model, tensors)[tensors.loss_mask]
            diff = (logp - tensors.behaviour[tensors.loss_mask]).abs().max()
            gap = max(gap, float(diff))
    return gap


def rows_and_tokens(groups: list[RolloutGroup]) -> tuple[float, float]:
    rows = [[p for t in g.trajectories for p in pack(t)] for g in groups]
    return (
        statistics.fmean(len(r) for r in rows),
        statistics.fmean(sum(len(p.ids) for p in r) for r in rows),
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    action_format: Literal["guided", "tau2"] = args.action_format
    settings = RolloutSettings(
        max_agent_turns=args.max_agent_turns, max_tokens=args.max_tokens, user_max_tokens=48,
        temperature=1.0, token_io=True, action_format=action_format, concurrency=args.size,
    )  # fmt: skip
    groups, solver = await sample_groups(args.url, args.domain, settings, args.groups, args.size)
    baseline = [
        g.model_copy(update={"trajectories": [await rerendered(args.url, solver, t)
                                              for t in g.trajectories]})
        for g in groups
    ]  # fmt: skip
    trajectories = [t for g in groups for t in g.trajectories]
    model_dir = prepare_model(Settings().cache_dir)
    trainer = TrainerSettings(device="cpu", max_staleness=4)
    policy = Policy(trainer, model_dir)
    seconds = trainer_seconds(policy, groups)
    baseline_seconds = trainer_seconds(Policy(trainer, model_dir), baseline)
    base = Policy(trainer.model_copy(update={"full_finetune": True}), model_dir).model
    rows, tokens = rows_and_tokens(groups)
    baseline_rows, baseline_tokens = rows_and_tokens(baseline)
    return {
        "rows_per_group": rows,
        "baseline_rows_per_group": baseline_rows,
        "trained_tokens": tokens,
        "baseline_trained_tokens": baseline_tokens,
        "trainer_s_per_group": seconds,
        "baseline_trainer_s_per_group": baseline_seconds,
        "max_logprob_abs_diff": max_gap(base, trajectories),
        "bytes_per_trajectory": statistics.fmean(len(t.model_dump_json()) for t in trajectories),
        "baseline_bytes_per_trajectory": statistics.fmean(
            len(t.model_dump_json()) for g in baseline for t in g.trajectories
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("SENTINEL_TEST_POLICY_URL", ""))
    parser.add_argument("--domain", default="mock")
    parser.add_argument("--action-format", choices=["guided", "tau2"], default="tau2")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--size", type=int, default=4)
    parser.add_argument("--max-agent-turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    arguments = parser.parse_args()
    if not arguments.url:
        parser.error("--url or SENTINEL_TEST_POLICY_URL: a vLLM server serving SmolLM2 as smol")
    figures = anyio.run(main, arguments)
    print(json.dumps(figures))
