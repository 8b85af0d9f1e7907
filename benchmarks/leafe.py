"""LEAFE against GRPO at the same budget, on a fixed set of failed retail trajectories.

1. The failures: SmolLM2 rollouts of retail train tasks, kept once in the cache directory
   (`<cache_dir>/bench/leafe-failures.jsonl`) so that every run starts from the same set.
2. LEAFE: reflect on each failure (the real server), branch from the chosen step within the
   budget (`--interactions` agent turns in all), count the failures recovered (tau2 success)
   and the branches accepted, then one SFT round on the corrections.
3. GRPO: rollout groups on the same tasks until the same number of agent turns is spent, then
   GRPO steps on them (partial credit, as the CPU profile trains).
4. pass@k (k up to `--trials`) on the affected tasks, for the base policy and both adapters.

The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from sentinel import jsonl
from sentinel.agents.explorer import Explorer, is_failure
from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.reflector import Reflector
from sentinel.agents.rollout import RolloutRunner
from sentinel.config import LeafeSettings, LLMEndpoint, RolloutSettings, Settings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.evaluation import evaluate
from sentinel.schemas import RolloutGroup, SFTExample, Task, TrainStepReport, Trajectory
from sentinel.serving.model import prepare_model
from sentinel.serving.server import ensure_policy_server
from sentinel.training.policy import Policy
from sentinel.training.publisher import load_adapter

ROLLOUT = RolloutSettings(
    max_agent_turns=4, max_tokens=96, user_max_tokens=48, temperature=1.0, concurrency=8
)


def runner(settings: Settings, domain: Environment, url: str, model: str = "smol") -> RolloutRunner:
    endpoint = LLMEndpoint(base_url=url, model="smol")
    settings = settings.model_copy(
        update={"rollout": ROLLOUT, "llm": settings.llm.model_copy(
            update={"policy": endpoint, "user_sim": endpoint, "reflector": endpoint})}
    )  # fmt: skip
    return RolloutRunner.from_settings(settings, domain, model)


async def failures(made: RolloutRunner, tasks: list[Task], path: Path) -> list[Trajectory]:
    """The fixed set: read from `path`, or rolled out once (two tries per task) and kept."""
    kept = anyio.Path(path)
    if await kept.exists():
        return [Trajectory.model_validate_json(x) for x in jsonl.lines(path)]
    found: list[Trajectory] = []

    async def one(task: Task) -> None:
        for _ in range(2):
            trajectory = await made.run(task)
            if is_failure(trajectory) and len(trajectory.messages) > 3:
                found.append(trajectory)
                return

    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(one, task)
    await kept.parent.mkdir(parents=True, exist_ok=True)
    await kept.write_text("".join(t.model_dump_json() + "\n" for t in found))
    return found


async def leafe_arm(
    made: RolloutRunner, domain: Environment, by_id: dict[str, Task], failed: list[Trajectory],
    settings: LeafeSettings, url: str,
) -> tuple[dict[str, int], list[SFTExample]]:  # fmt: skip
    client = OpenAIChatClient(LLMEndpoint(base_url=url, model="smol"))
    explorer = Explorer(made, Reflector(domain, settings, client), settings)
    totals = {"failures": 0, "reflected": 0, "branches": 0, "interactions": 0, "recovered": 0}
    examples: list[SFTExample] = []
    for trajectory in failed:  # one group per failure: the budget is per group
        group = RolloutGroup(
            task_id=trajectory.task_id, policy_version=0, trajectories=[trajectory]
        )
        found = await explorer.explore(by_id[trajectory.task_id], group)
        for key in totals:
            totals[key] += getattr(found, key)
        examples += [c.example for c in found.corrections]
    await client.aclose()
    return totals, examples


async def grpo_groups(
    made: RolloutRunner, tasks: list[Task], budget: int, size: int
) -> tuple[list[RolloutGroup], int]:
    """Groups on the tasks, round robin, until `budget` agent turns are spent."""
    groups, spent, index = [], 0, 0
    while spent < budget:
        group = await made.run_group(tasks[index % len(tasks)], size)
        spent += sum(m.role == "assistant" for t in group.trajectories for m in t.messages[1:])
        groups.append(group)
        index += 1
    return groups, spent


async def pass_at_k(
    settings: Settings, domain: Environment, url: str, model: str, tasks: list[Task], trials: int,
    out: Path,
) -> dict[int, float]:  # fmt: skip
    made = runner(settings, domain, url, model)
    report = await evaluate(made, tasks, trials, out / "evals" / model)
    await made.aclose()
    return report.pass_at_k


def train_and_serve(
    settings: Settings, url: str, name: str,
    step: Callable[[Policy], list[TrainStepReport]], out: Path,
) -> dict[str, float]:  # fmt: skip
    """Train a fresh LoRA policy with `step` (a callable on the policy), serve it as `name`."""
    trainer = settings.trainer.model_copy(update={"device": "cpu", "learning_rate": 1e-4})
    policy = Policy(trainer, settings.trainer.model_dir or prepare_model(settings.cache_dir))
    started = time.perf_counter()
    reports = step(policy)
    seconds = time.perf_counter() - started
    path = policy.save_adapter(out / "adapters" / name)
    anyio.run(load_adapter, url, name, path)
    del policy
    gc.collect()
    return {"steps": len(reports), "tokens": sum(r.tokens for r in reports), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=6, help="retail train tasks to draw from")
    parser.add_argument("--interactions", type=int, default=6, help="LEAFE budget per failure")
    parser.add_argument("--branches", type=int, default=2, help="branches per failure")
    parser.add_argument("--depth", type=int, default=3, help="agent turns per branch")
    parser.add_argument("--accept", choices=["success", "improved"], default="improved")
    parser.add_argument("--trials", type=int, default=4, help="k of pass@k")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-leafe"))
    args = parser.parse_args()
    settings = Settings()
    domain = load(named("retail"))
    tasks = domain.tasks("train")[: args.tasks]
    by_id = {t.id: t for t in tasks}
    leafe = LeafeSettings(
        branches_per_failure=args.branches, max_depth=args.depth,
        max_interactions=args.interactions, accept=args.accept,
    )  # fmt: skip
    shutil.rmtree(args.out / "evals", ignore_errors=True)  # adapters change between runs
    started = time.perf_counter()
    with ensure_policy_server(settings) as url, Progress() as bar:
        step = bar.add_task("failures, LEAFE, GRPO, pass@k", total=5)
        made = runner(settings, domain, url)
        cache = settings.cache_dir / "bench" / "leafe-failures.jsonl"
        failed = anyio.run(failures, made, tasks, cache)
        affected = [by_id[i] for i in dict.fromkeys(t.task_id for t in failed)]
        bar.advance(step)
        totals, examples = anyio.run(leafe_arm, made, domain, by_id, failed, leafe, url)
        sft = train_and_serve(
            settings, url, "leafe-v1", lambda p: [p.sft_step(examples)] if examples else [],
            args.out,
        )  # fmt: skip
        bar.advance(step)
        groups, spent = anyio.run(
            grpo_groups, made, affected, totals["interactions"], args.group_size
        )
        grpo_settings = settings.model_copy(
            update={"trainer": settings.trainer.model_copy(update={"partial_credit": 0.5})}
        )
        grpo = train_and_serve(
            grpo_settings, url, "grpo-v1",
            lambda p: [p.grpo_step(groups[i : i + 4]) for i in range(0, len(groups), 4)],
            args.out,
        )  # fmt: skip
        bar.advance(step)
        evals = {
            name: anyio.run(pass_at_k, settings, domain, url, name, affected, args.trials, args.out)
            for name in ("smol", "leafe-v1", "grpo-v1")
        }
        bar.advance(step, 2)
    figures = {
        **totals, "failed_trajectories": len(failed), "affected_tasks": len(affected),
        "corrections": len(examples), "budget_interactions": totals["interactions"],
        "grpo_interactions": spent, "grpo_groups": len(groups),
        "grpo_informative_groups": sum(g.informative(0.5) for g in groups),
        "sft": sft, "grpo": grpo,
        "pass_at_k_base": evals["smol"], "pass_at_k_leafe": evals["leafe-v1"],
        "pass_at_k_grpo": evals["grpo-v1"], "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
