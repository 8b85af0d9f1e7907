"""Replaying untrusted tasks in a child process, for the validator.

A proposed task is data written by an LLM: its gold actions name any tool with any arguments,
and its initial state is arbitrary JSON that tau2 loads into a live database. Replaying it can
hang, exhaust memory or crash the interpreter (retail's `calculate` evals `9**9**9**9`
happily), and a Celery worker that dies with it gets the same poison task redelivered forever
(FIELD_NOTES §6). So the replay runs in a child, `python -m sentinel.envs.sandbox`, which reads
a `ReplayRequest` as JSON on stdin and writes a `ReplayOutcome` on stdout. The parent never
trusts the child to end:

- The child caps its own CPU time and address space (RLIMIT_CPU, RLIMIT_AS) and asks to die
  with its parent (PR_SET_PDEATHSIG) before it reads the request; anyio has no `preexec_fn`,
  and nothing untrusted reaches the child before that point.
- It also caps processes (threads included), open files and the size of any file it writes
  (RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE).
- It gets a scrubbed environment (no proxies, no keys), a temporary working directory that is
  also its HOME, its own process group, and its own user and network namespaces
  (`unshare -Urn`, which needs no root where unprivileged user namespaces are allowed): no
  network, and no access to other processes' `/proc/<pid>/environ`, where the parent's secrets
  are. Without those namespaces the sandbox refuses to run (`SandboxUnavailable`), unless the
  isolation was waived explicitly; the outcome says whether it was isolated.
- The parent enforces the wall clock and an output cap, SIGKILLs the whole process group on
  timeout, overflow or exit (grandchildren too), and turns every way the child can end into a
  `ReplayOutcome` with a `RejectionReason`. Only a failure to start a child raises.

A fresh child costs seconds, nearly all of it importing tau2 (litellm is imported only for the
user simulator's prompt, never here); the replay itself takes ~0.2 s.
`warm=N` keeps N children that have done their imports waiting on stdin, which hides the
start-up latency but not its CPU. `Sandbox` is the seam for other backends (a Kubernetes Job,
a remote service).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import ConfigDict, Field, ValidationError

from sentinel.logs import configure_logging, get_logger
from sentinel.schemas import RejectionCode, RejectionReason, Task, ToolCall
from sentinel.schemas.message import Strict

if TYPE_CHECKING:
    from sentinel.envs.base import Environment, Episode

log = get_logger(__name__)

STDERR_TAIL_BYTES = 8192  # of the child's stderr, for crash reasons
STDERR_FILE = "stderr.log"  # in the child's directory
_PR_SET_PDEATHSIG = 1
UNPRIVILEGED = 65534  # nobody: what a root parent's children run as

# Tests only: misbehaviour the child performs before the replay, to prove the limits hold.
DebugAction = Literal[
    "hang", "eat_memory", "crash", "fork_bomb", "open_files", "big_file", "read_parent_env"
]
Isolation = Literal["require", "prefer", "off"]  # off: waived; prefer: when it works here


class SandboxLimits(Strict):
    """Per-replay limits.

    tau2 imports cachebox, whose allocator reserves 1 GB of address space up front when
    RLIMIT_AS allows it and makes do without when it does not.
    """

    model_config = ConfigDict(frozen=True)

    cpu_s: int = Field(default=20, gt=0)  # CPU time, the child's start-up (~3 s) included
    memory_mb: int = Field(default=1024, gt=0)  # address space; tau2 needs ~450 MB of it
    wall_s: float = Field(default=30.0, gt=0)
    max_output_bytes: int = Field(default=1_000_000, gt=0)  # the outcome JSON on stdout
    max_result_chars: int = Field(default=4096, gt=0)  # kept of each action's result
    # Counted in the child's own user namespace, so only when isolated (see `limit_args`).
    max_processes: int = Field(default=32, gt=0)  # RLIMIT_NPROC: threads count too
    max_open_files: int = Field(default=256, gt=0)  # RLIMIT_NOFILE
    max_file_mb: int = Field(default=16, gt=0)  # RLIMIT_FSIZE: any file, its stderr log too


class ReplayRequest(Strict):
    domain: str
    task: Task
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    debug_action: DebugAction | None = None  # tests only; see DebugAction


class ActionResult(Strict):
    name: str
    error: bool
    content: str  # at most limits.max_result_chars


class ReplayOutcome(Strict):
    """Agent and user DB hashes before, after the gold actions, and after only their reads
    (what a trajectory that looks things up but changes nothing would leave); and whether the
    task's env assertions hold in each of those states (None: it has none)."""

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
    duration_s: float = 0.0  # from taking a child to the outcome, start-up included
    network_isolated: bool = False
    failure: RejectionReason | None = None


class Sandbox(Protocol):
    async def replay(self, request: ReplayRequest) -> ReplayOutcome: ...


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox requires does not work on this machine: infrastructure, not
    a verdict on the task."""


def _failed(code: RejectionCode, detail: str) -> ReplayOutcome:
    return ReplayOutcome(ok=False, failure=RejectionReason(code=code, detail=detail))


# --- the parent ---------------------------------------------------------------------------


@dataclass
class _Child:
    process: Process
    workdir: tempfile.TemporaryDirectory[str]
    stdout: BufferedByteReceiveStream
    limits: SandboxLimits
    replays: int = 0

    def stderr_tail(self) -> str:
        """The last line the child wrote to stderr (a traceback ends with the exception)."""
        try:
            with open(Path(self.workdir.name) / STDERR_FILE, "rb") as stream:
                stream.seek(0, os.SEEK_END)
                stream.seek(max(0, stream.tell() - STDERR_TAIL_BYTES))
                tail = stream.read().decode(errors="replace")
        except OSError:
            return ""
        lines = tail.strip().splitlines()
        return lines[-1][:500] if lines else ""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _judge(returncode: int, child: _Child) -> ReplayOutcome:
    """The outcome of a child that ended before answering."""
    if returncode < 0:  # stderr ends with unrelated logs: a signal leaves no last words
        name = signal.Signals(-returncode).name
        hint = {"SIGXCPU": " (CPU limit)", "SIGKILL": " (CPU hard limit or OOM killer)"}
        return _failed(RejectionCode.SANDBOX_CRASH, f"killed by {name}{hint.get(name, '')}")
    return _failed(RejectionCode.SANDBOX_CRASH, f"exit code {returncode}: {child.stderr_tail()}")


class Namespaces:
    """The user and network namespaces children run in: `unshare -Urn`, checked once.

    `require` (the default) raises `SandboxUnavailable` where they do not work, `prefer` runs
    without them and says so, `off` waives them (a setting must say so explicitly). A user
    namespace is what makes it work without root (`unshare --net` alone needs CAP_SYS_ADMIN)
    and what keeps a child from reading other processes' environments: the kernel grants
    that only with CAP_SYS_PTRACE in the target's namespace, which the child lacks. A root
    parent's children also become `nobody` first (`setpriv`) where nobody can run this
    Python: the kernel never applies RLIMIT_NPROC to root, and nobody cannot read root's
    files (the run directory's secrets). Where it cannot (an interpreter under /root), they
    stay root in their namespace, without a process limit; the deployment runs as non-root.
    """

    def __init__(self, mode: Isolation = "require") -> None:
        self.mode = mode
        self._unshare = shutil.which("unshare") or "unshare"
        self._setpriv = shutil.which("setpriv") or "setpriv"
        self._works: bool | None = None if mode != "off" else False
        self.owner: int | None = None  # the uid children run as, where it is not ours

    @property
    def prefix(self) -> list[str]:
        drop = [self._setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                "--clear-groups"] if self.owner is not None else []  # fmt: skip
        return [*drop, self._unshare, "--user", "--map-root-user", "--net", "--"]

    async def _probe(self) -> bool:
        """Whether a child can start behind `prefix` and import us there."""
        with contextlib.suppress(OSError):
            probe = [*self.prefix, sys.executable, "-s", "-P", "-c", "import sentinel"]
            check = await anyio.run_process(probe, check=False, cwd=tempfile.gettempdir())
            return check.returncode == 0
        return False

    async def isolated(self) -> bool:
        """Whether children get the namespaces; raises when required and impossible."""
        if self._works is None:
            if os.geteuid() == 0:
                self.owner = UNPRIVILEGED
                if not await self._probe():
                    self.owner = None
                    log.info("sandbox children stay root in their namespace: no NPROC limit")
            works = await self._probe()
            self._works = works
            if not works and self.mode == "prefer":
                log.warning("sandbox children will run without user and network namespaces")
        if not self._works and self.mode == "require":
            raise SandboxUnavailable(
                f"a child cannot start in its own namespaces here ({' '.join(self.prefix)}): "
                "are unprivileged user namespaces disabled, or is the code unreadable to "
                "nobody? Fix that, or waive the isolation explicitly "
                "(validation.allow_no_network_isolation)"
            )
        return self._works


def child_env(home: str, marker: str) -> dict[str, str]:
    """Only what a child needs: no proxies, no credentials, nothing inherited."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at import
        "OPENBLAS_NUM_THREADS": "1",  # numpy's thread pool, per child, is wasted here
        "SENTINEL_SANDBOX": marker,
    }
    if pythonpath := os.environ.get("PYTHONPATH"):  # a source checkout, not installed
        env["PYTHONPATH"] = pythonpath
    return env


def limit_args(limits: SandboxLimits, isolated: bool) -> list[str]:
    """The child's command-line limits. RLIMIT_NPROC counts every process of the user, so it
    is only set in the child's own user namespace, where it counts the child's alone."""
    return [
        "--memory-mb", str(limits.memory_mb), "--parent-pid", str(os.getpid()),
        "--max-open-files", str(limits.max_open_files), "--max-file-mb", str(limits.max_file_mb),
        *(["--max-processes", str(limits.max_processes)] if isolated else []),
    ]  # fmt: skip


async def spawn_child(
    module: str,
    args: Sequence[str],
    limits: SandboxLimits,
    prefix: Sequence[str],
    marker: str,
    owner: int | None = None,
) -> _Child:
    """`python -m module args` in a fresh directory (`owner`'s, if given) and process group,
    behind `prefix`."""
    workdir = tempfile.TemporaryDirectory(prefix="sentinel-sandbox-")
    argv = [*prefix, sys.executable, "-s", "-P", "-m", module, *args]
    try:
        if owner is not None:
            os.chown(workdir.name, owner, owner)
        # shielded: a caller cancelled mid-spawn must still get the child, to kill it
        with (
            open(Path(workdir.name) / STDERR_FILE, "wb") as stderr,  # noqa: ASYNC230 (local, tiny)
            anyio.CancelScope(shield=True),
        ):
            process = await anyio.open_process(
                argv, cwd=workdir.name, env=child_env(workdir.name, marker), stderr=stderr,
                start_new_session=True,
            )  # fmt: skip
    except BaseException:
        workdir.cleanup()
        raise
    assert process.stdout is not None
    return _Child(process, workdir, BufferedByteReceiveStream(process.stdout), limits)


async def dispose_child(child: _Child) -> None:
    """Kill the child's group (a no-op once it is gone), reap it, remove its directory."""
    with anyio.CancelScope(shield=True):
        _kill_group(child.process.pid)
        await child.process.aclose()
        await anyio.to_thread.run_sync(child.workdir.cleanup)


class ClosedOnExit:
    """An async context manager that calls `aclose` on exit: the pools of child processes."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


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
        return await spawn_child("sentinel.envs.sandbox", args, limits, prefix, self.id, owner)


# --- the child ----------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _set_limit(kind: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:  # never ask for more than we are allowed
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(kind, (soft, hard))


def apply_limits(args: argparse.Namespace, cpu_s: int, cpu_hard: int) -> None:
    """The child's limits, from `limit_args` (see `add_limit_arguments`): RLIMIT_CPU soft at
    `cpu_s` (SIGXCPU), hard at `cpu_hard` (SIGKILL)."""
    _set_limit(resource.RLIMIT_CPU, cpu_s, cpu_hard)
    _set_limit(resource.RLIMIT_AS, args.memory_mb << 20, args.memory_mb << 20)
    _set_limit(resource.RLIMIT_CORE, 0, 0)
    _set_limit(resource.RLIMIT_NOFILE, args.max_open_files, args.max_open_files)
    fsize = args.max_file_mb << 20  # Python ignores SIGXFSZ: a write past it raises EFBIG
    _set_limit(resource.RLIMIT_FSIZE, fsize, fsize)
    if args.max_processes is not None:
        _set_limit(resource.RLIMIT_NPROC, args.max_processes, args.max_processes)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--max-open-files", type=int, required=True)
    parser.add_argument("--max-file-mb", type=int, required=True)
    parser.add_argument("--max-processes", type=int, default=None, help="only when isolated")


def renew_cpu(cpu_s: int) -> None:
    """`cpu_s` more seconds of CPU from now, for the next replay (within the hard budget)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = used + cpu_s if hard == resource.RLIM_INFINITY else min(used + cpu_s, hard - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def claim_stdout() -> int:
    """Keep stdout for the outcome alone: whatever else prints there goes to stderr."""
    sys.stdout.flush()
    out = os.dup(1)  # not inherited by grandchildren
    os.dup2(2, 1)
    return out


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
    errors: list[str] = []
    assertions_before = _assertions(domain, task, episode, errors)  # they only read
    calls = [
        ToolCall(id=f"gold-{i}", name=a.name, arguments=a.arguments, requestor=a.requestor)
        for i, a in enumerate(task.actions)
    ]
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
    )


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
    parser = argparse.ArgumentParser(prog="python -m sentinel.envs.sandbox")
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
