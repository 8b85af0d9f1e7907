"""Rollout episodes in a limited child process, so no tool call can freeze the caller.

A sampled tool call is untrusted input that tau2 runs: retail's `calculate` evals any string of
digits and operators, and `9**9**9` holds the GIL for minutes, in C, where neither a thread
nor a cancel scope can stop it. So episodes live in a child, `python -m sentinel.envs.episodes`,
made like the sandbox's (`envs.sandbox`: scrubbed environment, own process group, user and
network namespaces where they work, RLIMIT_AS/NOFILE/FSIZE/NPROC, death with the parent), and
the parent awaits each request with a wall clock:

- A child hosts many episodes and serves one request at a time (a JSON line each way): steps
  take milliseconds, and one child per rollout would cost ~180 MB each. `EnvPool` spreads
  episodes over `processes` children.
- A step that does not answer within `tool_timeout_s` (or that makes the child hit its CPU
  limit, renewed before every request) gets the child's whole process group SIGKILLed and
  raises `ToolStopped`: the rollout ends with `tool_timeout`. The other episodes of that
  child are rebuilt on a fresh one, by replaying their tool calls, at their next request.
- Opening an episode (its initial state, and for LEAFE the prefix's calls) and scoring it
  (tau2's reward: the gold replay, env assertions) run there too, under the same limits.

The child's start-up (importing tau2, ~1-3 s) is not charged to any request: it says when it is
ready.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anyio
from pydantic import Field, ValidationError

from sentinel.envs.base import UnsupportedTask
from sentinel.envs.process_pool import (
    ClosedOnExit,
    Namespaces,
    SandboxLimits,
    _Child,
    add_limit_arguments,
    apply_limits,
    claim_stdout,
    die_with_parent,
    dispose_child,
    limit_args,
    renew_cpu,
    spawn_child,
)
from sentinel.envs.registry import EnvSettings, load, named
from sentinel.logs import configure_logging, get_logger
from sentinel.schemas import ChatMessage, RewardBreakdown, Task, TerminationReason, ToolCall
from sentinel.schemas.message import Strict

if TYPE_CHECKING:
    from sentinel.envs.base import Environment, Episode

log = get_logger(__name__)

START_TIMEOUT_S = 120.0  # importing tau2 and loading the domain, on a loaded machine
STARTUP_CPU_S = 60
MAX_LINE_BYTES = 64 << 20  # a reward request carries the whole conversation


class EnvFailure(RuntimeError):
    """The environment child failed a request (crashed, unreadable, or an error): infra."""


class ToolStopped(EnvFailure):
    """A tool call ran past its wall-clock or CPU limit and its child was killed."""


class EnvRequest(Strict):
    op: Literal["open", "step", "reward", "hashes", "close"]
    episode: str
    cpu_s: int = Field(default=10, gt=0)  # CPU seconds this request may use
    domain: str = ""  # open: the environment this child serves
    task: Task | None = None  # open, reward
    calls: list[ToolCall] = Field(default_factory=list)  # open: replayed; step: the one call
    messages: list[ChatMessage] = Field(default_factory=list)  # reward
    termination: TerminationReason | None = None  # reward


class StepResult(Strict):
    content: str
    error: bool


class EnvResponse(Strict):
    ok: bool
    results: list[StepResult] = Field(default_factory=list)
    reward: RewardBreakdown | None = None
    error: str | None = None
    unsupported: bool = False  # tau2's reward cannot score this task (UnsupportedTask)
    hashes: tuple[str | None, str | None] | None = None  # agent and user DB hashes


# --- the parent ---------------------------------------------------------------------------


class EnvHost:
    """One child and the episodes it holds; `generation` counts its replacements."""

    def __init__(self, pool: EnvPool) -> None:
        self.pool = pool
        self.lock = anyio.Lock()
        self.child: _Child | None = None
        self.generation = 0
        self.episodes = 0

    async def request(self, request: EnvRequest, timeout_s: float) -> EnvResponse:
        """Send one request and read its response; on a timeout or a dead child, kill it
        and raise (`ToolStopped` for a step). Call with `lock` held."""
        child = await self._child()
        process = child.process
        assert process.stdin is not None
        stop = ToolStopped if request.op == "step" else EnvFailure
        line = b""
        try:
            with anyio.move_on_after(timeout_s) as deadline:
                await process.stdin.send(request.model_dump_json().encode() + b"\n")
                line = await child.stdout.receive_until(b"\n", MAX_LINE_BYTES)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError) as error:
            code = await process.wait()
            await self.discard()
            raise stop(f"the environment process died ({_ended(code, child)})") from error
        except BaseException:  # cancelled, or an oversized line: its answer would desync
            await self.discard()
            raise
        if deadline.cancelled_caught:
            await self.discard()
            raise stop(f"no answer to {request.op} within {timeout_s:g} s")
        try:
            return EnvResponse.model_validate_json(line)
        except ValidationError as error:
            await self.discard()
            raise EnvFailure(f"unreadable response: {error}"[:500]) from error

    async def discard(self) -> None:
        """Kill the child; its episodes are rebuilt on the next one."""
        child, self.child = self.child, None
        self.generation += 1
        if child is not None:
            await dispose_child(child)

    async def _child(self) -> _Child:
        if self.child is not None and self.child.process.returncode is None:
            return self.child
        if self.child is not None:  # died while idle
            await self.discard()
        pool = self.pool
        isolated = await pool.namespaces.isolated()
        args = [*limit_args(pool.limits, isolated), "--env", pool.env.model_dump_json()]
        namespaces = pool.namespaces
        prefix, owner = (namespaces.prefix, namespaces.owner) if isolated else ([], None)
        module = "sentinel.envs.episodes"
        child = await spawn_child(module, args, pool.limits, prefix, pool.id, owner)
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                ready = await child.stdout.receive_until(b"\n", MAX_LINE_BYTES)
            EnvResponse.model_validate_json(ready)
        except BaseException as error:
            code = child.process.returncode
            await dispose_child(child)
            if not isinstance(error, Exception):
                raise
            detail = _ended(code, child)
            raise EnvFailure(f"the environment process did not start ({detail})") from error
        self.child = child
        return child


class RemoteEpisode:
    """The parent's handle on an episode in a child: the task and the calls it ran, enough
    to rebuild it on another child."""

    def __init__(self, pool: EnvPool, host: EnvHost, task: Task) -> None:
        self.pool, self.host, self.task = pool, host, task
        self.id = uuid.uuid4().hex
        self.calls: list[ToolCall] = []
        self.generation = -1  # not open in any child yet
        self.closed = False

    async def step(self, call: ToolCall) -> StepResult:
        """Run one tool call; errors come back as results. Raises `ToolStopped` past the
        limits, `EnvFailure` if the environment failed otherwise."""
        request = EnvRequest(op="step", episode=self.id, calls=[call])
        [result] = (await self._request(request, 1)).results
        self.calls.append(call)
        return result

    async def reward(
        self, messages: Sequence[ChatMessage], termination: TerminationReason
    ) -> RewardBreakdown:
        """The environment's reward, computed in the child (`Environment.reward`)."""
        request = EnvRequest(
            op="reward", episode=self.id, task=self.task, messages=list(messages),
            termination=termination,
        )  # fmt: skip
        response = await self._request(request, 2 + len(self.task.actions))
        if response.unsupported:
            raise UnsupportedTask(response.error or self.task.id)
        assert response.reward is not None
        return response.reward

    async def db_hashes(self) -> tuple[str | None, str | None]:
        """The agent and user DB hashes of the episode now (`Episode.db_hashes`)."""
        response = await self._request(EnvRequest(op="hashes", episode=self.id), 1)
        assert response.hashes is not None
        return response.hashes

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.host.episodes -= 1
        async with self.host.lock:
            if self.generation == self.host.generation and self.host.child is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await self.host.request(EnvRequest(op="close", episode=self.id), 5)

    async def _request(self, request: EnvRequest, steps: int) -> EnvResponse:
        """`request` on this episode's child, opening (or rebuilding) it there first."""
        if self.closed:
            raise EnvFailure("the episode is closed")
        async with self.host.lock:
            if self.generation != self.host.generation:
                await self._open()
            timeout = self.pool.tool_timeout_s * steps
            request = request.model_copy(update={"cpu_s": _cpu(timeout)})
            response = await self.host.request(request, timeout)
        if not response.ok:
            raise EnvFailure(response.error or "the environment failed")
        return response

    async def _open(self) -> None:
        """The episode in the child: the task's initial state, then its calls so far."""
        opened = EnvRequest(op="open", episode=self.id, domain=self.pool.env.name, task=self.task,
                            calls=self.calls)  # fmt: skip
        timeout = self.pool.tool_timeout_s * (2 + len(self.calls))
        try:
            response = await self.host.request(
                opened.model_copy(update={"cpu_s": _cpu(timeout)}), timeout
            )
        except ToolStopped as error:  # a replayed call: it ran within the limit before
            raise EnvFailure(str(error)) from error
        if not response.ok:
            raise EnvFailure(response.error or "the episode did not open")
        self.generation = self.host.generation


class EnvPool(ClosedOnExit):
    """Episodes of one environment in up to `processes` limited children; use as an async context
    manager (or call `aclose`) to stop them."""

    def __init__(
        self,
        env: EnvSettings | str,
        *,
        tool_timeout_s: float = 5.0,
        processes: int = 1,
        limits: SandboxLimits | None = None,
        isolation: Literal["require", "prefer", "off"] = "prefer",
    ) -> None:
        self.env = named(env) if isinstance(env, str) else env
        self.tool_timeout_s = tool_timeout_s
        self.limits = limits or SandboxLimits(memory_mb=2048)
        self.namespaces = Namespaces(isolation)
        self.id = uuid.uuid4().hex[:12]  # SENTINEL_SANDBOX in the children's environment
        self.hosts = [EnvHost(self) for _ in range(max(1, processes))]

    async def open(self, task: Task, calls: Sequence[ToolCall] = ()) -> RemoteEpisode:
        """A fresh episode of `task` in its initial state, with `calls` (a trajectory's
        prefix, for LEAFE) replayed; raises `EnvFailure` if that fails or times out."""
        host = min(self.hosts, key=lambda h: h.episodes)
        host.episodes += 1
        episode = RemoteEpisode(self, host, task)
        episode.calls = list(calls)
        try:
            async with host.lock:
                await episode._open()
        except BaseException:
            episode.closed = True
            host.episodes -= 1
            raise
        return episode

    async def aclose(self) -> None:
        for host in self.hosts:
            async with host.lock:
                await host.discard()


def _cpu(timeout_s: float) -> int:
    """The CPU budget of a request: its wall clock, rounded up, plus a second."""
    return math.ceil(timeout_s) + 1


def _ended(code: int | None, child: _Child) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}: {child.stderr_tail()}"


# --- the child ----------------------------------------------------------------------------


def serve(request: EnvRequest, domain: Environment, episodes: dict[str, Episode]) -> EnvResponse:
    """One request against this child's episodes."""

    if request.op == "open":
        if request.domain != domain.name or request.task is None:
            return EnvResponse(ok=False, error=f"this process serves {domain.name} episodes")
        episodes[request.episode] = domain.replay(request.task, request.calls)
        return EnvResponse(ok=True)
    if request.op == "close":
        episodes.pop(request.episode, None)
        return EnvResponse(ok=True)
    episode = episodes.get(request.episode)
    if episode is None:
        return EnvResponse(ok=False, error=f"no open episode {request.episode}")
    if request.op == "hashes":
        return EnvResponse(ok=True, hashes=episode.db_hashes())
    if request.op == "step":
        result = episode.step(request.calls[0])
        step = StepResult(content=result.content, error=result.error)
        return EnvResponse(ok=True, results=[step])
    if request.task is None or request.termination is None:
        return EnvResponse(ok=False, error="a reward request needs the task and termination")
    try:
        reward = domain.reward(request.task, episode, request.messages, request.termination)
    except UnsupportedTask as error:
        return EnvResponse(ok=False, unsupported=True, error=str(error))
    return EnvResponse(ok=True, reward=reward)


def main(argv: Sequence[str] | None = None) -> None:
    """The child: limits, then tau2 and the domain, a ready line, then requests."""
    parser = argparse.ArgumentParser(prog="python -m sentinel.envs.episodes")
    add_limit_arguments(parser)
    parser.add_argument("--env", required=True, help="the EnvSettings JSON to serve")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    apply_limits(args, STARTUP_CPU_S, STARTUP_CPU_S * 1000)
    out = claim_stdout()
    configure_logging("WARNING", "json")
    domain = load(EnvSettings.model_validate_json(args.env))
    _ = domain.initial_hashes, domain.write_tools  # parse and hash the database once
    episodes: dict[str, Episode] = {}
    with os.fdopen(out, "wb") as stream:
        stream.write(EnvResponse(ok=True).model_dump_json().encode() + b"\n")
        stream.flush()
        for line in sys.stdin.buffer:
            request = EnvRequest.model_validate_json(line)
            renew_cpu(request.cpu_s)
            try:
                response = serve(request, domain, episodes)
            except Exception as error:  # the task's data broke tau2: say so, keep serving
                response = EnvResponse(ok=False, error=f"{type(error).__name__}: {error}"[:1000])
            stream.write(response.model_dump_json().encode() + b"\n")
            stream.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
