"""Where should the Solver's next tasks come from? Three sources, one budget, one judge.

1. **Evidence.** The current Solver (the base policy, version 0) runs `--seed-tasks` train
   tasks once each, with the scripted user; the Controller's signals diagnose each failure
   and the pattern library groups them: real error patterns, each with its failing turns.
2. **Proposals.** `--proposals` tasks from each source, round-robin over its patterns:
   - `llm`: the Proposer's LLM writes tasks from the patterns and their evidence (SENTINEL);
   - `mutation`: seed tasks transformed toward the same patterns (the fallback, no LLM);
   - `synthetic`: the Proposer's LLM writes general tasks, one pattern per write tool, tied
     to no failure (the paper's baseline).
3. **Judgement.** The sandboxed validator judges each as the CPU profile does (no difficulty
   gate: SmolLM2-135M solves almost nothing, so the gate would reject every task as too
   hard); then `--probe` rollouts of the same Solver run each accepted task, concurrently.

Per source, the last line's figures:
- `acceptance`: accepted ÷ proposals asked for (an unparseable draft counts as rejected);
- `targeting_precision`: accepted tasks the Solver then failed with the targeted pattern's
  category ÷ accepted. A synthetic task targets no pattern, so for it any category among the
  observed patterns counts: the generous reading, in its favour;
- `checker_discrimination`: near-miss variants of the gold runs (a wrong id, value or count;
  a write left out) that the tasks' checks, as derived from the gold diff, fail ÷ tried,
  over every proposal whose gold run replayed (`envs.checks`);
- `novelty`: the mean distance of an accepted task's scenario from its nearest train task
  (1 - Jaccard similarity of word 3-shingles).

`--model` picks the model the local vLLM serves, to the Solver and the Proposer alike:
SmolLM2-135M by default, or a larger CPU model (`qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`).

The last line printed is `{"llm": {...}, "mutation": {...}, "synthetic": {...}}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from functools import partial
from itertools import cycle, islice
from pathlib import Path
from typing import get_args

import anyio
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.agents.controller import Controller
from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.prompts import PromptBook
from sentinel.agents.proposer import MUTATOR, Proposer
from sentinel.agents.rollout import RolloutRunner
from sentinel.config import PolicyModel, Settings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.patterns import PatternLibrary, general_patterns
from sentinel.orchestrator.pool import TaskPool
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.schemas import (
    ErrorPattern,
    FailureCategory,
    PolicyVersion,
    Task,
    TaskProposal,
    ValidationResult,
)
from sentinel.serving.server import ensure_policy_server
from sentinel.validator import (
    Probed,
    RedisTaskIndex,
    RolloutProbe,
    Validator,
    local_sandbox,
    scenario_shingles,
    similarity,
)

SOURCES = ("llm", "mutation", "synthetic")


async def observed_patterns(
    settings: Settings, domain: Environment, bus: Bus, tasks: int, progress: Progress
) -> list[ErrorPattern]:
    """The base Solver on `tasks` train tasks, its failures diagnosed into patterns."""
    runner = RolloutRunner.from_settings(settings, domain)
    pool = TaskPool(bus.redis, settings.bus.prefix)
    library = PatternLibrary(bus.redis, settings.bus.prefix)
    controller = Controller(domain, pool, library, bus, settings.controller)  # the signals
    job = progress.add_task("evidence: the Solver's failures", total=tasks)

    async def one(task: Task) -> None:
        group = await runner.run_group(task, 1)
        for trajectory in group.trajectories:
            if not trajectory.succeeded:
                await library.add(await controller.diagnose(task, trajectory))
        progress.advance(job)

    try:
        async with anyio.create_task_group() as tg:
            for task in domain.tasks("train")[:tasks]:
                tg.start_soon(one, task)
    finally:
        await runner.aclose()
    return sorted(await library.all(), key=lambda p: -sum(p.frequency.values()))


async def proposals_from(
    proposer: Proposer, patterns: Sequence[ErrorPattern], budget: int
) -> list[TaskProposal]:
    """`budget` proposals, one per pattern in turn, drafted concurrently (the server batches)."""
    made: list[TaskProposal] = []

    async def one(pattern: ErrorPattern) -> None:
        made.extend(await proposer.propose(pattern))

    async with anyio.create_task_group() as tg:
        for pattern in islice(cycle(patterns), budget):
            tg.start_soon(one, pattern)
    return made[:budget]


async def probe_all(
    probe: RolloutProbe, tasks: Sequence[Task], k: int, progress: Progress
) -> dict[str, Probed]:
    """`k` rollouts of the Solver on each task, four tasks at a time (the server batches)."""
    found: dict[str, Probed] = {}
    job = progress.add_task("probe: the Solver on the accepted tasks", total=len(tasks))
    limit = anyio.CapacityLimiter(4)

    async def one(task: Task) -> None:
        async with limit:
            found[task.id] = await probe.probe(task, k)
        progress.advance(job)

    async with anyio.create_task_group() as tg:
        for task in tasks:
            tg.start_soon(one, task)
    return found


def figures(
    source: str,
    asked: int,
    verdicts: Sequence[tuple[TaskProposal, ValidationResult]],
    probed: dict[str, Probed],
    observed: set[FailureCategory],
    train: Sequence[frozenset[str]],
) -> dict[str, object]:
    accepted = [(p, v) for p, v in verdicts if v.accepted]

    def targeted(p: TaskProposal) -> bool:
        found = probed.get(p.task.id)
        if found is None:
            return False
        wanted = {p.task.provenance.target_category} if source != "synthetic" else observed
        return bool(wanted & set(found.failures))

    tried = sum(v.near_misses for _, v in verdicts)
    caught = sum(v.near_misses_caught for _, v in verdicts)
    distances = [
        1 - max(similarity(scenario_shingles(p.task), seed) for seed in train) for p, _ in accepted
    ]
    reasons = Counter(r.code.value for _, v in verdicts for r in v.reasons)
    ids = [p.task.id for p, _ in verdicts]
    return {
        "acceptance": round(len(accepted) / max(1, asked), 3),
        "targeting_precision": round(sum(targeted(p) for p, _ in accepted) / len(accepted), 3)
        if accepted else None,
        "checker_discrimination": round(caught / tried, 3) if tried else None,
        "novelty": round(sum(distances) / len(distances), 3) if distances else None,
        "proposals": asked, "parsed": len(verdicts), "accepted": len(accepted),
        "near_misses": tried, "checks_per_task": round(
            sum(len(v.checks) for _, v in verdicts) / max(1, len(verdicts)), 1
        ),
        "solve_rate": _mean([probed[i].solve_rate for i in ids if i in probed]),
        "rejections": dict(reasons.most_common()),
    }  # fmt: skip


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


async def measure(
    settings: Settings, domain_name: str, seed_tasks: int, budget: int, probe_k: int
) -> dict[str, dict[str, object]]:
    domain = load(named(domain_name))
    assert settings.redis_url is not None
    bus = Bus(connect(settings.redis_url, settings), settings.bus)
    client = OpenAIChatClient(settings.llm.proposer)
    started = time.perf_counter()
    with Progress() as progress:
        patterns = await observed_patterns(settings, domain, bus, seed_tasks, progress)
        seen = [[p.title, sum(p.frequency.values())] for p in patterns]
        print(json.dumps({"patterns": seen}), flush=True)
        if not patterns:
            raise SystemExit("the Solver failed no task: no evidence to propose from")
        book = PromptBook(bus.redis, settings.bus.prefix, settings.proposer)
        writer = Proposer(domain, book, bus, settings.proposer, client)
        mutator = Proposer(domain, book, bus, settings.proposer, None)
        sources = {
            "llm": (writer, patterns),
            "mutation": (mutator, patterns),
            "synthetic": (writer, general_patterns(domain.write_tools)),
        }
        probe = RolloutProbe(
            lambda p: RolloutRunner.from_settings(settings, domain, p.served_name, p.version),
            _base_policy(settings.llm.policy.model),
        )
        train = [scenario_shingles(t) for t in domain.tasks("train")]
        observed = {p.category for p in patterns}
        verdicts: dict[str, list[tuple[TaskProposal, ValidationResult]]] = {}
        async with local_sandbox(settings.validation, domain.name) as sandbox:
            index = RedisTaskIndex(bus.redis, settings.bus.prefix, domain)
            validator = Validator(domain, sandbox, settings.validation, index)
            for name, (proposer, targets) in sources.items():
                job = progress.add_task(f"{name}: propose and validate", total=budget)
                made = await proposals_from(proposer, targets, budget)
                if name != "mutation":  # the fallback must not stand in for the LLM here
                    made = [p for p in made if p.proposer_model != MUTATOR]
                verdicts[name] = []
                for proposal in made:
                    verdicts[name].append((proposal, await validator.validate(proposal)))
                    progress.advance(job)
        accepted = [p.task for judged in verdicts.values() for p, v in judged if v.accepted]
        probed = await probe_all(probe, accepted, probe_k, progress)
        await probe.aclose()
        results = {
            name: figures(name, budget, judged, probed, observed, train)
            for name, judged in verdicts.items()
        }
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1)}), flush=True)
    await writer.aclose()
    await mutator.aclose()
    await client.aclose()
    await bus.aclose()
    return results


def _base_policy(model: str) -> Callable[[], Awaitable[PolicyVersion]]:
    async def current() -> PolicyVersion:
        return PolicyVersion(version=0, served_name=model, base_model=model)

    return current


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--domain", default="retail")
    parser.add_argument("--seed-tasks", type=int, default=8, help="train tasks the Solver runs")
    parser.add_argument("--proposals", type=int, default=8, help="tasks asked of each source")
    parser.add_argument("--probe", type=int, default=2, help="Solver rollouts per probed task")
    parser.add_argument("--llm-url", help="an OpenAI-compatible endpoint (default: local vLLM)")
    parser.add_argument(
        "--model", choices=get_args(PolicyModel), default="smollm2-135m",
        help="the model the local vLLM serves, to the Solver and the Proposer alike (the Qwen"
        " GGUFs are downloaded, verified by sha256 and converted once: docs/models.md)",
    )  # fmt: skip
    args = parser.parse_args()
    local = Settings.model_validate({"serve": {"model": args.model}})
    server = ensure_policy_server(local) if args.llm_url is None else nullcontext(args.llm_url)
    print(f"model: {args.llm_url or args.model}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis, server as url:
        endpoint = {"base_url": url}
        settings = Settings.model_validate({
            "redis_url": redis.url, "run_dir": tmp,
            "llm": {name: endpoint for name in ("policy", "user_sim", "controller", "proposer")},
            "rollout": {"user": "scripted"},
            "proposer": {"tasks_per_pattern": 1, "mutation_after": 0},
        })  # fmt: skip
        run = partial(measure, settings, args.domain, args.seed_tasks, args.proposals, args.probe)
        found = anyio.run(run)
    print(json.dumps({name: found[name] for name in SOURCES}))


if __name__ == "__main__":
    main()
