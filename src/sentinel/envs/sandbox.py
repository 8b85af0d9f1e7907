"""Replaying untrusted tasks in a child process, for the validator.

A proposed task is data written by an LLM: its gold actions name any tool with any arguments,
and its initial state is arbitrary JSON that tau2 loads into a live database. Replaying it can
hang, exhaust memory or crash the interpreter (retail's `calculate` evals `9**9**9**9`
happily), and a Celery worker that dies with it gets the same poison task redelivered forever
(FIELD_NOTES §6). So the replay runs in a child, `python -m sentinel.envs.replay`, which reads
a `ReplayRequest` as JSON on stdin and writes a `ReplayOutcome` on stdout. The child is limited
and isolated as `envs.process_pool` says (CPU, memory, processes, files, a scrubbed
environment, its own process group and user and network namespaces, death with its parent).
The parent never trusts the child to end: it enforces the wall clock and an output cap,
SIGKILLs the whole process group on timeout, overflow or exit (grandchildren too), and turns
every way the child can end into a `ReplayOutcome` with a `RejectionReason`. Only a failure to
start a child raises.

A fresh child costs seconds, nearly all of it importing tau2 (litellm is imported only for the
user simulator's prompt, never here); the replay itself takes ~0.2 s.
`warm=N` keeps N children that have done their imports waiting on stdin, which hides the
start-up latency but not its CPU. `Sandbox` is the seam for other backends (a Kubernetes Job,
a remote service).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import anyio
from pydantic import ValidationError

from sentinel.envs.process_pool import (
    ClosedOnExit,
    Isolation,
    Namespaces,
    SandboxLimits,
    SandboxUnavailable,
    _Child,
    dispose_child,
    limit_args,
    spawn_child,
)
from sentinel.envs.replay import ActionResult, DebugAction, ReplayOutcome, ReplayRequest
from sentinel.logs import get_logger
from sentinel.schemas import RejectionCode, RejectionReason

__all__ = [
    "ActionResult",
    "DebugAction",
    "Isolation",
    "LocalProcessSandbox",
    "ReplayOutcome",
    "ReplayRequest",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailable",
]

log = get_logger(__name__)

CHILD_MODULE = "sentinel.envs.replay"


class Sandbox(Protocol):
    async def replay(self, request: ReplayRequest) -> ReplayOutcome: ...


def _failed(code: RejectionCode, detail: str) -> ReplayOutcome:
    return ReplayOutcome(ok=False, failure=RejectionReason(code=code, detail=detail))


def _judge(returncode: int, child: _Child) -> ReplayOutcome:
    """The outcome of a child that ended before answering."""
    if returncode < 0:  # stderr ends with unrelated logs: a signal leaves no last words
        name = signal.Signals(-returncode).name
        hint = {"SIGXCPU": " (CPU limit)", "SIGKILL": " (CPU hard limit or OOM killer)"}
        return _failed(RejectionCode.SANDBOX_CRASH, f"killed by {name}{hint.get(name, '')}")
    return _failed(RejectionCode.SANDBOX_CRASH, f"exit code {returncode}: {child.stderr_tail()}")


class LocalProcessSandbox(ClosedOnExit):
    """Each replay in a fresh, limited child process on this machine.

    `limits` are the defaults of the pool; a request with other limits gets a cold child.
    At most `max_concurrency` children run at once (default: one per CPU). A child serves up
    to `replays_per_child` requests, one JSON line each, then is replaced (1: a fresh process
    per replay); any failure (timeout, crash, oversized output) discards it. With `warm > 0`
    or reuse, use it as an async context manager (or call `aclose`) so idle children stop.
    `isolation`: see `Namespaces`.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        warm: int = 0,
        preload: Sequence[str] = (),
        max_concurrency: int | None = None,
        isolation: Isolation = "require",
        replays_per_child: int = 1,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.id = uuid.uuid4().hex[:12]  # SENTINEL_SANDBOX in the children's environment
        self.warm = warm
        self.preload = tuple(preload)
        self.replays_per_child = max(1, replays_per_child)
        self._limiter = anyio.CapacityLimiter(max_concurrency or os.cpu_count() or 1)
        self._pool: list[_Child] = []
        self.namespaces = Namespaces(isolation)

    async def replay(self, request: ReplayRequest) -> ReplayOutcome:
        async with self._limiter:
            network = await self.network_isolated()
            start = time.perf_counter()
            child = await self._take(request.limits, network)
            reusable = False
            try:
                outcome, reusable = await self._run(child, request)
            finally:
                if reusable:
                    self._pool.append(child)
                else:
                    await dispose_child(child)
            await self._refill(network)  # after the replay, so it does not compete for CPU
        outcome = outcome.model_copy(
            update={"duration_s": time.perf_counter() - start, "network_isolated": network}
        )
        log.info(
            "sandbox replay",
            task=request.task.id,
            ok=outcome.ok,
            failure=outcome.failure.code.value if outcome.failure else None,
            duration_s=round(outcome.duration_s, 3),
        )
        return outcome

    async def network_isolated(self) -> bool:
        """Whether children run in their own user and network namespaces (see `Namespaces`)."""
        return await self.namespaces.isolated()

    async def aclose(self) -> None:
        pool, self._pool = self._pool, []
        for child in pool:
            await dispose_child(child)

    async def _run(self, child: _Child, request: ReplayRequest) -> tuple[ReplayOutcome, bool]:
        """Send one request line, read one outcome line; and whether the child may go on."""
        process, limits = child.process, request.limits
        assert process.stdin is not None
        line = b""
        with anyio.move_on_after(limits.wall_s) as deadline:
            try:
                await process.stdin.send(request.model_dump_json().encode() + b"\n")
                line = await child.stdout.receive_until(b"\n", limits.max_output_bytes)
                if len(line) > limits.max_output_bytes:  # it arrived in one chunk
                    raise anyio.DelimiterNotFound(limits.max_output_bytes)
            except anyio.DelimiterNotFound:
                detail = f"outcome exceeds {limits.max_output_bytes} bytes"
                return _failed(RejectionCode.TOO_LARGE, detail), False
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                return _judge(await process.wait(), child), False
        if deadline.cancelled_caught:
            return _failed(
                RejectionCode.SANDBOX_TIMEOUT, f"no outcome within {limits.wall_s:g} s"
            ), False
        child.replays += 1
        try:
            outcome = ReplayOutcome.model_validate_json(line)
        except ValidationError as error:
            return _failed(RejectionCode.SANDBOX_CRASH, f"unreadable outcome: {error}"[:500]), False
        reusable = child.replays < self.replays_per_child and limits == self.limits
        return outcome, reusable and outcome.ok

    async def _take(self, limits: SandboxLimits, network: bool) -> _Child:
        """An idle child of the pool if these are its limits, else a fresh one."""
        pooled = limits == self.limits and (self.warm > 0 or self.replays_per_child > 1)
        if not pooled:
            return await self._spawn(limits, network, preload=(), replays=1)
        while self._pool:
            child = self._pool.pop()
            if child.process.returncode is None:
                return child
            await dispose_child(child)  # died while idle
        return await self._spawn(limits, network, self.preload, self.replays_per_child)

    async def _refill(self, network: bool) -> None:
        while len(self._pool) < self.warm:
            replays = self.replays_per_child
            self._pool.append(await self._spawn(self.limits, network, self.preload, replays))

    async def _spawn(
        self, limits: SandboxLimits, network: bool, preload: Sequence[str], replays: int
    ) -> _Child:
        args = [
            "--cpu-s", str(limits.cpu_s), *limit_args(limits, network),
            "--preload", ",".join(preload), "--replays", str(replays),
        ]  # fmt: skip
        namespaces = self.namespaces
        prefix, owner = (namespaces.prefix, namespaces.owner) if network else ([], None)
        return await spawn_child(CHILD_MODULE, args, limits, prefix, self.id, owner)
