"""The replay child: a proposed task's gold actions, run in a limited process.

`python -m sentinel.envs.replay`, started by the validator's sandbox (`envs.sandbox`), reads
a `ReplayRequest` per line on stdin and writes a `ReplayOutcome` per line on stdout. It sets
its limits first (`envs.process_pool`), then loads the environments it replays in through the
registry (`load(named(domain))`), whatever their kind, and replays each task on a fresh
episode: every gold action in order, then the reads alone on another, the env assertions
checked before, after and on the reads.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from sentinel.envs import checks
from sentinel.envs.process_pool import (
    SandboxLimits,
    add_limit_arguments,
    apply_limits,
    claim_stdout,
    die_with_parent,
    renew_cpu,
)
from sentinel.logs import configure_logging
from sentinel.schemas import RejectionReason, StateCheck, Task
from sentinel.schemas.message import Strict

if TYPE_CHECKING:
    from sentinel.envs.base import Environment, Episode, State

# Tests only: misbehaviour the child performs before the replay, to prove the limits hold.
DebugAction = Literal[
    "hang", "eat_memory", "crash", "fork_bomb", "open_files", "big_file", "read_parent_env"
]


class ReplayRequest(Strict):
    domain: str
    task: Task
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    near_misses: int = Field(checks.MAX_NEAR_MISSES, ge=0, le=20)  # variants to try at most
    debug_action: DebugAction | None = None  # tests only; see DebugAction


class ActionResult(Strict):
    name: str
    error: bool
    content: str  # at most limits.max_result_chars


class NearMissResult(Strict):
    label: str  # the mistake: where, the gold value and the wrong one
    caught: bool  # whether one of the task's checks fails on it


class ReplayOutcome(Strict):
    """Agent and user DB hashes before, after the gold actions, and after only their reads
    (what a trajectory that looks things up but changes nothing would leave); whether the
    task's env assertions hold in each of those states (None: it has none); and, when every
    gold write succeeded, the task's checks (`envs.checks`) with their near misses."""

    ok: bool  # the replay ran to the end (its actions may still have failed)
    results: list[ActionResult] = Field(default_factory=list)
    db_hash_before: str | None = None
    user_db_hash_before: str | None = None
    db_hash_after: str | None = None
    user_db_hash_after: str | None = None
    read_only_db_hash: str | None = None
    read_only_user_db_hash: str | None = None
    assertions_before: bool | None = None
    assertions_after: bool | None = None
    assertions_read_only: bool | None = None
    assertion_error: str | None = None  # an assertion that could not be evaluated, and why
    checks: list[StateCheck] = Field(default_factory=list)  # the task's own, then derived
    check_failures: list[str] = Field(default_factory=list)  # its own that fail the gold run
    checks_hold_before: bool | None = None  # whether every check holds before any action
    near_misses: list[NearMissResult] = Field(default_factory=list)
    duration_s: float = 0.0  # from taking a child to the outcome, start-up included
    network_isolated: bool = False
    failure: RejectionReason | None = None


# --- the child ----------------------------------------------------------------------------


def _misbehave(action: DebugAction) -> None:
    """Tests only: what a hostile task could make the child do."""
    if action == "crash":
        ctypes.string_at(0)  # SIGSEGV
    elif action == "eat_memory":
        hog = [bytes(64 << 20) for _ in range(64)]  # 4 GB of address space, lazily zeroed
        del hog
    elif action == "hang":
        subprocess.Popen(["sleep", "600"])  # a grandchild, to prove the group is killed
        while True:  # spin: uses CPU, so the CPU limit applies too
            pass
    elif action == "fork_bomb":  # BlockingIOError at RLIMIT_NPROC
        for _ in range(200):
            subprocess.Popen(["sleep", "600"])
    elif action == "open_files":  # OSError EMFILE at RLIMIT_NOFILE
        held = [open(os.devnull, "rb") for _ in range(2000)]  # noqa: SIM115
        del held
    elif action == "big_file":  # OSError EFBIG at RLIMIT_FSIZE
        Path("big").write_bytes(bytes(64 << 20))
    elif action == "read_parent_env":  # PermissionError in its own user namespace
        Path(f"/proc/{os.getppid()}/environ").read_bytes()


def _domain(name: str, loaded: dict[str, Environment]) -> Environment:
    from sentinel.envs.registry import load, named  # tau2 is slow (~3 s): only in the child

    if name not in loaded:
        loaded[name] = load(named(name))
        _ = loaded[name].initial_hashes  # parses and hashes the database once, warming tau2
    return loaded[name]


def run_replay(request: ReplayRequest, loaded: dict[str, Environment]) -> ReplayOutcome:
    """The replay itself, in this process: every gold action in order on a fresh environment,
    then only the reads on another; the env assertions checked before, after and on the reads."""
    domain, task = _domain(request.domain, loaded), request.task
    before = domain.initial_hashes if task.spec.initial_state is None else None
    episode = domain.episode(task)
    before = before or episode.db_hashes()
    state_before = episode.db_state()
    errors: list[str] = []
    assertions_before = _assertions(domain, task, episode, errors)  # they only read
    calls = checks.gold_calls(task)
    results = []
    for call in calls:
        result = episode.step(call)  # errors come back as results
        content = result.content[: request.limits.max_result_chars]
        results.append(ActionResult(name=call.name, error=result.error, content=content))
    after = episode.db_hashes()
    assertions_after = _assertions(domain, task, episode, errors)
    reads = [c for c in calls if c.name not in domain.write_tools]
    read_only, assertions_read_only = after, assertions_after
    if len(reads) < len(calls):
        read_episode = domain.replay(task, reads)
        read_only = read_episode.db_hashes()
        assertions_read_only = _assertions(domain, task, read_episode, errors)
    return ReplayOutcome(
        ok=True,
        results=results,
        db_hash_before=before[0],
        user_db_hash_before=before[1],
        db_hash_after=after[0],
        user_db_hash_after=after[1],
        read_only_db_hash=read_only[0],
        read_only_user_db_hash=read_only[1],
        assertions_before=assertions_before,
        assertions_after=assertions_after,
        assertions_read_only=assertions_read_only,
        assertion_error=errors[0][:500] if errors else None,
        **(
            _checked(request, domain, state_before, episode) if _writes_ran(domain, results) else {}
        ),
    )


def _writes_ran(domain: Environment, results: Sequence[ActionResult]) -> bool:
    return not any(r.error and r.name in domain.write_tools for r in results)


def _checked(
    request: ReplayRequest, domain: Environment, before: State, episode: Episode
) -> dict[str, object]:
    """The task's checks (its own, then derived from what the gold run changed), the gold
    run's failures of its own, and the near misses they were tried on."""
    task, after = request.task, episode.db_state()
    derived = checks.derive(before, after, task.checks)
    siblings = _SIBLINGS.get(domain.name)
    if siblings is None:
        siblings = _SIBLINGS[domain.name] = checks.Siblings(domain.database, domain.entities)
    gold = (after, episode.db_hashes())
    found = checks.discriminate(task, domain, siblings, derived, gold, request.near_misses)
    return {
        "checks": found.checks,
        "check_failures": [c.describe() for c in checks.failing(task.checks, after)],
        "checks_hold_before": not checks.failing(derived, before) if derived else None,
        "near_misses": [
            NearMissResult(label=label[:300], caught=caught) for label, caught in found.tried
        ],
    }


_SIBLINGS: dict[str, checks.Siblings] = {}  # per domain, in this child


def _assertions(
    domain: Environment, task: Task, episode: Episode, errors: list[str]
) -> bool | None:
    """Whether the task's env assertions hold in `episode` (None: it has none); one that
    raises counts as not holding, and its error is kept."""
    try:
        return domain.assertions_met(task, episode)
    except Exception as error:  # bad arguments, a non-bool result: the task's fault
        errors.append(f"{type(error).__name__}: {error}")
        return False


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sentinel.envs.replay")
    parser.add_argument("--cpu-s", type=int, required=True)
    add_limit_arguments(parser)
    parser.add_argument("--preload", default="", help="domains to load before reading stdin")
    parser.add_argument("--replays", type=int, default=1, help="requests to serve, one per line")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """The child: limits first, then (warm) imports, then requests from stdin, one per line."""
    args = _arguments(argv)
    die_with_parent(args.parent_pid)
    # a reused child gets a budget for all its replays as the hard limit; `renew_cpu` moves
    # the soft one before each
    replays = args.replays
    apply_limits(args, args.cpu_s, args.cpu_s * (replays + 1 if replays > 1 else 1) + 1)
    out = claim_stdout()
    configure_logging("WARNING", "json")
    loaded: dict[str, Environment] = {}
    for name in filter(None, args.preload.split(",")):
        _domain(name, loaded)
    with os.fdopen(out, "wb") as stream:
        for served, line in enumerate(sys.stdin.buffer):
            if args.replays > 1:  # each replay gets cpu_s, whatever start-up took
                renew_cpu(args.cpu_s)
            request = ReplayRequest.model_validate_json(line)
            if request.debug_action:
                _misbehave(request.debug_action)
            stream.write(run_replay(request, loaded).model_dump_json().encode() + b"\n")
            stream.flush()
            if served + 1 >= args.replays:
                break
    sys.stderr.flush()
    os._exit(0)  # skip tearing down litellm & co (~0.3 s): the outcomes are out


if __name__ == "__main__":
    main()
