"""Proposer acceptance: SmolLM2 (or any endpoint) writes tasks for error patterns, the
sandboxed validator judges them, and the verdicts feed the self-evolving prompts.

One pattern per retail write tool, `--tasks` LLM-written proposals each (mutation only where
the LLM gives nothing parseable), over `--rounds` rounds so that prompt revisions can act.
Compares the LLM-written tasks' acceptance with the mutation fallback's on the same patterns.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
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
from sentinel.schemas import ErrorPattern, FailureCategory, ValidationResult
from sentinel.serving.server import ensure_policy_server
from sentinel.validator import RedisTaskIndex, Validator, local_sandbox


def patterns(domain: Environment) -> list[ErrorPattern]:
    return [
        ErrorPattern(
            id=f"pattern-{tool}",
            title=f"wrong arguments in {tool}",
            description=f"The agent calls {tool} with the wrong order, items or payment.",
            category=FailureCategory.WRONG_ARGUMENTS,
            tools=[tool],
        )
        for tool in sorted(domain.write_tools)
    ]


async def measure(redis_url: str, llm_url: str, tasks: int, rounds: int) -> dict[str, object]:
    domain = load(named("retail"))
    settings = Settings(redis_url=redis_url)
    bus = Bus(connect(redis_url, settings), settings.bus)
    proposer_settings = ProposerSettings(tasks_per_pattern=tasks, mutation_after=0, revise_after=8)
    book = PromptBook(bus.redis, "bench", proposer_settings)
    client = OpenAIChatClient(LLMEndpoint(base_url=llm_url))
    proposer = Proposer(domain, book, bus, proposer_settings, client)
    mutator = Proposer(domain, book, bus, proposer_settings, None)
    verdicts: dict[str, list[ValidationResult]] = {"llm": [], "mutation": []}
    started = time.perf_counter()
    async with local_sandbox(ValidationSettings(), domain.name) as sandbox:
        validator = Validator(
            domain, sandbox, ValidationSettings(), RedisTaskIndex(bus.redis, "bench", domain)
        )
        with Progress(transient=True) as progress:
            job = progress.add_task("patterns", total=rounds * len(patterns(domain)))
            for _ in range(rounds):
                for pattern in patterns(domain):
                    for p in [*await proposer.propose(pattern), *await mutator.propose(pattern)]:
                        result = await validator.validate(p)
                        await book.record(result)
                        kind = "mutation" if p.proposer_model == MUTATOR else "llm"
                        verdicts[kind].append(result)
                    progress.advance(job)
    await client.aclose()
    await proposer.aclose()  # each closes the env pool it made for mutation replays
    await mutator.aclose()
    versions = len(await book.versions())
    await bus.aclose()
    llm = verdicts["llm"]
    reasons = Counter(r.code.value for v in llm for r in v.reasons)
    requested = rounds * len(patterns(domain)) * tasks
    return {
        "llm_requested": requested,
        "llm_parsed": len(llm),
        "acceptance_rate": round(sum(v.accepted for v in llm) / requested, 3),
        "acceptance_rate_parsed": round(sum(v.accepted for v in llm) / max(1, len(llm)), 3),
        "mutation_acceptance_rate": round(
            sum(v.accepted for v in verdicts["mutation"]) / max(1, len(verdicts["mutation"])), 3
        ),
        "rejections": dict(reasons.most_common()),
        "prompt_versions": versions,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3, help="LLM proposals per pattern")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--llm-url", help="an OpenAI-compatible endpoint (default: local vLLM)")
    args = parser.parse_args()
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        if args.llm_url:
            figures = anyio.run(measure, redis.url, args.llm_url, args.tasks, args.rounds)
        else:
            with ensure_policy_server(settings) as url:
                figures = anyio.run(measure, redis.url, url, args.tasks, args.rounds)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
