"""Validation throughput: the sandboxed validator against a naive in-process baseline.

Both judge the same proposals on tau2 retail with the same `Validator` code; they differ in
the `Sandbox` behind it. The baseline replays in this process, one proposal at a time, on a
freshly loaded tau2 environment per check (the database read from its file, every hash
computed). SENTINEL's replays run in limited child processes that keep tau2 imported, copy
a parsed database snapshot instead of reading the file, cache the initial hash, serve many
replays each, and run `max_concurrency` at once. The mix: new correct tasks (seed tasks moved
onto other users), copies of train and test tasks, and broken ones.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.config import Settings, ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.episodes import EnvPool
from sentinel.envs.grounding import mutate
from sentinel.envs.registry import load, named
from sentinel.envs.replay import ReplayOutcome, ReplayRequest, run_replay
from sentinel.orchestrator.bus import connect
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.schemas import Action, Origin, Provenance, Task, TaskProposal
from sentinel.validator import RedisTaskIndex, Validator, local_sandbox


class FreshEnvironmentPerCheck:
    """The baseline sandbox: in this process, a new tau2 domain (database from its file)."""

    async def replay(self, request: ReplayRequest) -> ReplayOutcome:
        start = time.perf_counter()
        outcome = run_replay(request, {request.domain: load(named(request.domain))})
        return outcome.model_copy(update={"duration_s": time.perf_counter() - start})


async def proposals(domain: Environment, count: int, seed: int) -> list[TaskProposal]:
    """About 70% new tasks, the rest copies and broken ones, shuffled."""
    rng = random.Random(seed)
    proposed = Provenance(origin=Origin.PROPOSED)
    seeds = [
        t for t in domain.tasks("train") if any(a.name in domain.write_tools for a in t.actions)
    ]
    tasks: list[Task] = []
    async with EnvPool(domain.settings) as envs:  # mutation replays seeds in limited children
        while len(tasks) < count * 7 // 10:
            mutated = await mutate(rng.choice(seeds), domain, rng, envs=envs)
            if mutated is not None and mutated.id not in {t.id for t in tasks}:
                tasks.append(mutated)
    for i, original in enumerate(rng.sample(domain.tasks(), count - len(tasks))):
        task = original.model_copy(update={"id": f"copy-{i}", "provenance": proposed})
        if i % 3 == 0:  # broken: an unknown tool
            actions = [*task.actions, Action(action_id="x", name="refund_all", arguments={})]
            criteria = task.spec.evaluation_criteria.model_copy(update={"actions": actions})  # type: ignore[union-attr]
            task = task.model_copy(
                update={"spec": task.spec.model_copy(update={"evaluation_criteria": criteria})}
            )
        tasks.append(task)
    rng.shuffle(tasks)
    return [
        TaskProposal(id=f"p-{t.id}", task=t, prompt_version="bench", proposer_model="bench")
        for t in tasks
    ]


async def judge(
    validator: Validator, batch: list[TaskProposal], concurrency: int, tick: Callable[[], None]
) -> tuple[float, dict[str, list[str]]]:
    verdicts: dict[str, list[str]] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(proposal: TaskProposal) -> None:
        async with limiter:
            result = await validator.validate(proposal)
        verdicts[proposal.id] = [f"{r.code.value}: {r.detail}" for r in result.reasons]
        tick()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for proposal in batch:
            tg.start_soon(one, proposal)
    return time.perf_counter() - start, verdicts


async def measure(url: str, count: int, seed: int, near_misses: int) -> dict[str, float]:
    domain = load(named("retail"))
    batch = await proposals(domain, count, seed)
    settings = ValidationSettings(near_misses=near_misses)
    redis = connect(url, Settings(redis_url=url))
    concurrency = 2 * (settings.max_concurrency or len(os.sched_getaffinity(0)))
    with Progress(transient=True) as progress:

        def bar(label: str) -> Callable[[], None]:
            job = progress.add_task(label, total=len(batch))
            return lambda: progress.advance(job)

        in_process = settings.model_copy(update={"allow_no_network_isolation": True})
        baseline = Validator(  # in this process: no namespaces, so isolation is waived
            domain, FreshEnvironmentPerCheck(), in_process, RedisTaskIndex(redis, "base", domain)
        )
        baseline_s, expected = await judge(baseline, batch, 1, bar("in-process"))
        async with local_sandbox(settings, domain.name) as sandbox:
            index = RedisTaskIndex(redis, "sentinel", domain)
            validator = Validator(domain, sandbox, settings, index)
            sentinel_s, verdicts = await judge(validator, batch, concurrency, bar("sandboxed"))
    await redis.aclose()
    differ = {p: (verdicts[p], expected[p]) for p in verdicts if verdicts[p] != expected[p]}
    assert not differ, f"both paths must reach the same verdicts: {differ}"
    accepted = sum(not reasons for reasons in verdicts.values())
    return {
        "proposals": len(batch),
        "validated_per_s": round(len(batch) / sentinel_s, 2),
        "baseline_per_s": round(len(batch) / baseline_s, 2),
        "speedup": round(baseline_s / sentinel_s, 2),
        "acceptance_rate": round(accepted / len(batch), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proposals", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--near-misses", type=int, default=ValidationSettings().near_misses,
        help="near misses per task's checks (0: none, as before per-instance checks)",
    )  # fmt: skip
    parser.add_argument("--redis-url", help="an existing server (default: embedded redis-server)")
    args = parser.parse_args()
    run: Callable[[str], Awaitable[dict[str, float]]] = lambda url: measure(  # noqa: E731
        url, args.proposals, args.seed, args.near_misses
    )
    if args.redis_url:
        figures = anyio.run(run, args.redis_url)
    else:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
            figures = anyio.run(run, server.url)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
