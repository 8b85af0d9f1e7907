"""What the pools of limited child processes share: limits, namespaces, spawning, reaping.

Two pools run untrusted work this way: the validator's replay sandbox (`envs.sandbox`, its
child `envs.replay`) and the rollouts' environment pool (`envs.episodes`). Each child:

- caps its own CPU time and address space (RLIMIT_CPU, RLIMIT_AS) and asks to die with its
  parent (PR_SET_PDEATHSIG) before it reads a request (`die_with_parent`, `apply_limits`);
  anyio has no `preexec_fn`, and nothing untrusted reaches the child before that point;
- also caps processes (threads included), open files and the size of any file it writes
  (RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_FSIZE);
- gets a scrubbed environment (no proxies, no keys), a temporary working directory that is
  also its HOME, its own process group, and its own user and network namespaces
  (`unshare -Urn`, which needs no root where unprivileged user namespaces are allowed): no
  network, and no access to other processes' `/proc/<pid>/environ`, where the parent's
  secrets are. Without those namespaces a pool refuses to run (`SandboxUnavailable`), unless
  the isolation was waived explicitly (`Namespaces`).

The parent side (`spawn_child`, `dispose_child`) starts a child behind that prefix and kills
its whole process group (grandchildren too) when done with it. What the child computes, and
the protocol on its stdin and stdout, belong to each pool.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import ConfigDict, Field

from sentinel.logs import get_logger
from sentinel.schemas.message import Strict

log = get_logger(__name__)

STDERR_TAIL_BYTES = 8192  # of the child's stderr, for crash reasons
STDERR_FILE = "stderr.log"  # in the child's directory
_PR_SET_PDEATHSIG = 1
UNPRIVILEGED = 65534  # nobody: what a root parent's children run as

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


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox requires does not work on this machine: infrastructure, not
    a verdict on the task."""


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
