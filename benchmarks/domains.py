"""The data engine on every tau2 domain, with the same budget: does grounding work beyond retail?

For each domain, one error pattern per write tool (round-robin up to `--proposals`), the
Proposer's LLM (SmolLM2 on the local vLLM server, or `--llm-url`) writes a grounded task for
each, and where the LLM gives nothing usable the seed-mutation fallback writes one; the
sandboxed validator judges every proposal. Same budget everywhere: `--proposals` LLM attempts
per domain. The last line printed is one JSON object:
`{"retail": {...}, "airline": {...}, "telecom": {...}}`, each with `proposals` (made, LLM and
mutation), `accepted`, `grounded_accepted` (LLM-written on grounded entities, accepted),
`mutated_accepted`, `acceptance`, the rejection reasons and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from itertools import cycle, islice
from pathlib import Path

import anyio
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.agents.llm import OpenAIChatClient
from sentinel.agents.prompts import PromptBook
from sentinel.agents.proposer import MUTATOR, Proposer
from sentinel.config import LLMEndpoint, ProposerSettings, Settings, ValidationSettings
from sentinel.envs.base import Environment
from sentinel.envs.registry import load, named
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.redis_server import RedisServer
from sentinel.schemas import ErrorPattern, FailureCategory, TaskProposal, ValidationResult
from sentinel.serving.server import ensure_policy_server
from sentinel.validator import RedisTaskIndex, Validator, local_sandbox

DOMAINS = ("retail", "airline", "telecom")


def patterns(env: Environment, budget: int) -> list[ErrorPattern]:
    """`budget` patterns, one per write tool in turn."""
    return [
        ErrorPattern(
            id=f"pattern-{i}-{tool}",
            title=f"wrong arguments in {tool}",
            description=f"The agent calls {tool} on the wrong entity or with wrong arguments.",
            category=FailureCategory.WRONG_ARGUMENTS,
            tools=[tool],
        )
        for i, tool in enumerate(islice(cycle(sorted(env.write_tools)), budget))
    ]


async def measure_domain(
    bus: Bus, client: OpenAIChatClient, name: str, budget: int, progress: Progress
) -> dict[str, object]:
    env = load(named(name))
    settings = ProposerSettings(tasks_per_pattern=1, mutation_after=0)
    book = PromptBook(bus.redis, f"bench-{name}", settings)
    writer = Proposer(env, book, bus, settings, client)
    mutator = Proposer(env, book, bus, settings, None)
    verdicts: list[tuple[TaskProposal, ValidationResult]] = []
    started = time.perf_counter()
    job = progress.add_task(name, total=budget)
    async with local_sandbox(ValidationSettings(), name) as sandbox:
        index = RedisTaskIndex(bus.redis, f"bench-{name}", env)
        validator = Validator(env, sandbox, ValidationSettings(), index)
        for pattern in patterns(env, budget):
            made = await writer.propose(pattern) or await mutator.propose(pattern)
            for proposal in made:
                result = await validator.validate(proposal)
                await book.record(result)
                verdicts.append((proposal, result))
            progress.advance(job)
    await writer.aclose()
    await mutator.aclose()
    accepted = [p for p, r in verdicts if r.accepted]
    mutated = sum(p.proposer_model == MUTATOR for p in accepted)
    reasons = Counter(reason.code.value for _, r in verdicts for reason in r.reasons)
    return {
        "proposals": len(verdicts),
        "accepted": len(accepted),
        "grounded_accepted": len(accepted) - mutated,
        "mutated_accepted": mutated,
        "acceptance": round(len(accepted) / max(1, len(verdicts)), 3),
        "rejections": dict(reasons.most_common()),
        "seconds": round(time.perf_counter() - started, 1),
    }


async def measure(redis_url: str, llm_url: str, budget: int) -> dict[str, object]:
    settings = Settings(redis_url=redis_url)
    bus = Bus(connect(redis_url, settings), settings.bus)
    client = OpenAIChatClient(LLMEndpoint(base_url=llm_url, timeout_s=600))  # a busy CPU
    figures: dict[str, object] = {}
    with Progress(transient=True) as progress:
        for name in DOMAINS:
            figures[name] = await measure_domain(bus, client, name, budget, progress)
    await client.aclose()
    await bus.aclose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proposals", type=int, default=12, help="LLM attempts per domain")
    parser.add_argument("--llm-url", help="an OpenAI-compatible endpoint (default: local vLLM)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        if args.llm_url:
            figures = anyio.run(measure, redis.url, args.llm_url, args.proposals)
        else:
            with ensure_policy_server(Settings()) as url:
                figures = anyio.run(measure, redis.url, url, args.proposals)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
