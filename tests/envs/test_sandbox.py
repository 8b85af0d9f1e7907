"""The replay sandbox against real retail tasks and a child that misbehaves on purpose."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from sentinel.envs.base import Environment
from sentinel.envs.process_pool import Namespaces
from sentinel.envs.registry import load, named
from sentinel.envs.sandbox import (
    DebugAction,
    LocalProcessSandbox,
    ReplayOutcome,
    ReplayRequest,
    SandboxLimits,
    SandboxUnavailable,
)
from sentinel.schemas import Action, RejectionCode, Task

pytestmark = pytest.mark.anyio

FAST = SandboxLimits(wall_s=3)  # for a child that never finishes


@pytest.fixture(scope="module")
def task(retail: Environment) -> Task:
    """retail-0: four reads, then an exchange that changes the database."""
    return next(t for t in retail.tasks("train") if t.id == "retail-0")


def sandbox_pids(sandbox_id: str) -> list[int]:
    """Live processes (children, grandchildren, orphans) started by one sandbox."""
    marker = f"SENTINEL_SANDBOX={sandbox_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


def zombie_children() -> list[int]:
    """Children of this process that exited and were never reaped."""
    zombies = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(int(stat.parent.name))
    return zombies


def unshare_works() -> bool:
    try:
        check = ["unshare", "--user", "--map-root-user", "--net", "true"]
        return subprocess.run(check, check=False).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def telecom() -> Environment:
    return load(named("telecom"))


def is_replay_child(pid: int) -> bool:
    try:
        return b"sentinel.envs.replay" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def limit_line(limits: str, name: str) -> list[str]:
    line = next(line for line in limits.splitlines() if line.startswith(name))
    return line[len(name) :].split()


@pytest.fixture
async def sandbox() -> AsyncIterator[LocalProcessSandbox]:
    """A sandbox that must leave no process behind, however its children ended."""
    async with LocalProcessSandbox() as sandbox:
        yield sandbox
    assert await gone(sandbox.id) == []
    assert zombie_children() == []


async def gone(sandbox_id: str, within_s: float = 5.0) -> list[int]:
    """The sandbox's processes still alive after `within_s`: a killed group's members take a
    moment to exit on a loaded machine (seen in CI), but none may outlive that."""
    with anyio.move_on_after(within_s):
        while sandbox_pids(sandbox_id):
            await anyio.sleep(0.1)
    return sandbox_pids(sandbox_id)


def with_actions(task: Task, actions: list[Action]) -> Task:
    criteria = task.spec.evaluation_criteria
    assert criteria is not None
    spec = task.spec.model_copy(
        update={"evaluation_criteria": criteria.model_copy(update={"actions": actions})}
    )
    return task.model_copy(update={"spec": spec})


def failure_code(outcome: ReplayOutcome) -> RejectionCode | None:
    return outcome.failure.code if outcome.failure else None


async def test_gold_replay_reaches_tau2s_gold_state(
    sandbox: LocalProcessSandbox, retail: Environment, task: Task
) -> None:
    outcome = await sandbox.replay(ReplayRequest(domain="retail", task=task))
    assert outcome.ok, outcome.failure
    assert outcome.failure is None
    assert [r.name for r in outcome.results] == [a.name for a in task.actions]
    assert not any(r.error for r in outcome.results)
    assert "exchange" in outcome.results[-1].content
    assert outcome.db_hash_before == retail.episode(task).db_hashes()[0]
    assert (outcome.db_hash_after, outcome.user_db_hash_after) == retail.gold_hashes(task)
    assert outcome.db_hash_after != outcome.db_hash_before
    assert outcome.network_isolated == unshare_works()
    assert outcome.duration_s > 0


async def test_read_only_task_leaves_the_database_alone(
    sandbox: LocalProcessSandbox, retail: Environment
) -> None:
    task = next(t for t in retail.tasks("train") if t.id == "retail-10")  # reads, then transfer
    outcome = await sandbox.replay(ReplayRequest(domain="retail", task=task))
    assert outcome.ok
    assert len(outcome.results) == 5
    assert not any(r.error for r in outcome.results)
    assert outcome.db_hash_before == outcome.db_hash_after == retail.gold_hashes(task)[0]


async def test_unknown_tool_is_an_error_result_not_a_crash(
    sandbox: LocalProcessSandbox, task: Task
) -> None:
    bogus = Action(action_id="x", name="delete_everything", arguments={"really": True})
    lookup = task.actions[0]
    outcome = await sandbox.replay(
        ReplayRequest(domain="retail", task=with_actions(task, [bogus, lookup]))
    )
    assert outcome.ok
    assert [(r.name, r.error) for r in outcome.results] == [
        ("delete_everything", True),
        (lookup.name, False),
    ]
    assert "delete_everything" in outcome.results[0].content
    assert outcome.db_hash_after == outcome.db_hash_before


async def test_results_are_truncated(sandbox: LocalProcessSandbox, task: Task) -> None:
    listing = Action(action_id="x", name="list_all_product_types", arguments={})
    limits = SandboxLimits(max_result_chars=100)
    outcome = await sandbox.replay(
        ReplayRequest(domain="retail", task=with_actions(task, [listing]), limits=limits)
    )
    assert outcome.ok
    assert len(outcome.results[0].content) == 100  # the full listing has ~1500


async def test_hang_is_killed_at_the_wall_limit(sandbox: LocalProcessSandbox, task: Task) -> None:
    with anyio.fail_after(15):  # fails rather than hangs if the wall limit does nothing
        outcome = await sandbox.replay(
            ReplayRequest(domain="retail", task=task, limits=FAST, debug_action="hang")
        )
    assert failure_code(outcome) == RejectionCode.SANDBOX_TIMEOUT
    assert not outcome.ok
    assert 3 <= outcome.duration_s < 6
    assert await gone(sandbox.id) == []  # the child and its `sleep` grandchild
    again = await sandbox.replay(ReplayRequest(domain="retail", task=task))
    assert again.ok


async def test_a_cancelled_caller_leaves_no_child(sandbox: LocalProcessSandbox, task: Task) -> None:
    request = ReplayRequest(domain="retail", task=task, debug_action="hang")
    with anyio.move_on_after(1.5) as scope:
        await sandbox.replay(request)
    assert scope.cancelled_caught
    assert await gone(sandbox.id) == []


async def test_cpu_limit_kills_a_spinning_child(sandbox: LocalProcessSandbox, task: Task) -> None:
    limits = SandboxLimits(cpu_s=1, wall_s=20)
    outcome = await sandbox.replay(
        ReplayRequest(domain="retail", task=task, limits=limits, debug_action="hang")
    )
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH
    assert outcome.failure is not None
    assert "SIGXCPU" in outcome.failure.detail


async def test_memory_limit_stops_a_hog(sandbox: LocalProcessSandbox, task: Task) -> None:
    limits = SandboxLimits(memory_mb=300)
    outcome = await sandbox.replay(
        ReplayRequest(domain="retail", task=task, limits=limits, debug_action="eat_memory")
    )
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH
    assert outcome.failure is not None
    assert "MemoryError" in outcome.failure.detail


async def test_segfault_is_a_crash(sandbox: LocalProcessSandbox, task: Task) -> None:
    outcome = await sandbox.replay(ReplayRequest(domain="retail", task=task, debug_action="crash"))
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH
    assert outcome.failure is not None
    assert "SIGSEGV" in outcome.failure.detail


async def test_oversized_outcome_is_too_large(sandbox: LocalProcessSandbox, task: Task) -> None:
    limits = SandboxLimits(max_output_bytes=200)
    outcome = await sandbox.replay(ReplayRequest(domain="retail", task=task, limits=limits))
    assert failure_code(outcome) == RejectionCode.TOO_LARGE


async def test_unknown_domain_is_a_crash_with_the_reason(
    sandbox: LocalProcessSandbox, task: Task
) -> None:
    outcome = await sandbox.replay(ReplayRequest(domain="mall", task=task))
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH
    assert outcome.failure is not None
    assert "unknown domain 'mall'" in outcome.failure.detail


async def test_hostile_calculation_hits_the_cpu_limit(
    sandbox: LocalProcessSandbox, task: Task
) -> None:
    """retail's calculate evals `**`: a real task, no debug hook, that would spin for ages."""
    limits = SandboxLimits(cpu_s=10, wall_s=60)  # start-up takes ~3-5 s of CPU
    outcomes: dict[str, ReplayOutcome] = {}

    async def calculate(expression: str) -> None:
        action = Action(action_id="x", name="calculate", arguments={"expression": expression})
        request = ReplayRequest(domain="retail", task=with_actions(task, [action]), limits=limits)
        outcomes[expression] = await sandbox.replay(request)

    with anyio.fail_after(90):
        async with anyio.create_task_group() as tg:
            tg.start_soon(calculate, "9**9**9**9")
            tg.start_soon(calculate, "2+2")  # the same limits let an honest task through
    assert outcomes["2+2"].ok
    assert outcomes["2+2"].results[0].content == "4.0"
    bomb = outcomes["9**9**9**9"]
    assert failure_code(bomb) == RejectionCode.SANDBOX_CRASH
    assert bomb.failure is not None
    assert "SIGXCPU" in bomb.failure.detail


async def test_the_child_is_confined(
    sandbox: LocalProcessSandbox, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Look at a live child: environment, limits, process group, directory, network."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-children")
    request = ReplayRequest(domain="retail", task=task, limits=FAST, debug_action="hang")
    seen: dict[str, Any] = {}

    async def inspect_child() -> None:
        while len(pids := sandbox_pids(sandbox.id)) < 2:  # the child, then its `sleep`
            await anyio.sleep(0.05)
        child = next(p for p in pids if is_replay_child(p))
        proc = Path(f"/proc/{child}")
        environ = (proc / "environ").read_bytes().split(b"\0")
        seen["env"] = {e.split(b"=", 1)[0].decode() for e in environ if e}
        seen["limits"] = (proc / "limits").read_text()
        seen["pgid"] = os.getpgid(child)
        seen["pid"] = child
        seen["cwd"] = os.readlink(proc / "cwd")
        seen["netns"] = os.readlink(proc / "ns/net")

    async with anyio.create_task_group() as tg:
        tg.start_soon(inspect_child)
        outcome = await sandbox.replay(request)
    assert failure_code(outcome) == RejectionCode.SANDBOX_TIMEOUT
    assert seen["env"] <= {
        "PATH", "HOME", "TMPDIR", "LANG", "LITELLM_LOCAL_MODEL_COST_MAP", "PYTHONPATH",
        "OPENBLAS_NUM_THREADS", "SENTINEL_SANDBOX",
    }  # fmt: skip
    limits = seen["limits"]
    assert limit_line(limits, "Max cpu time") == ["20", "21", "seconds"]
    assert limit_line(limits, "Max address space") == [str(1024 << 20)] * 2 + ["bytes"]
    assert limit_line(limits, "Max open files") == ["256", "256", "files"]
    assert limit_line(limits, "Max file size") == [str(16 << 20)] * 2 + ["bytes"]
    assert limit_line(limits, "Max processes") == ["32", "32", "processes"]  # where it counts
    assert seen["pgid"] == seen["pid"] != os.getpgid(0)
    tmp = await anyio.Path(tempfile.gettempdir()).resolve()
    assert seen["cwd"].startswith(str(tmp / "sentinel-sandbox-"))
    assert not await anyio.Path(seen["cwd"]).exists()
    if unshare_works():
        assert seen["netns"] != os.readlink("/proc/self/ns/net")
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # ours untouched


async def test_concurrent_replays_from_one_event_loop(
    sandbox: LocalProcessSandbox, retail: Environment, task: Task
) -> None:
    outcomes: list[ReplayOutcome] = []

    async def one(debug: bool) -> None:
        action = "crash" if debug else None
        outcomes.append(
            await sandbox.replay(ReplayRequest(domain="retail", task=task, debug_action=action))
        )

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i == 0)
    assert sorted(failure_code(o) or "" for o in outcomes) == ["", "", "", "sandbox_crash"]
    gold = retail.gold_hashes(task)[0]
    assert [o.db_hash_after for o in outcomes if o.ok] == [gold] * 3


async def test_warm_pool_replays_and_stops_idle_children(retail: Environment, task: Task) -> None:
    async with LocalProcessSandbox(warm=1) as sandbox:
        outcomes = [await sandbox.replay(ReplayRequest(domain="retail", task=task))]
        outcomes.append(await sandbox.replay(ReplayRequest(domain="retail", task=task)))
        other = SandboxLimits(cpu_s=15)  # not the pool's limits: a cold child
        outcomes.append(
            await sandbox.replay(ReplayRequest(domain="retail", task=task, limits=other))
        )
        assert len(sandbox_pids(sandbox.id)) == 1  # the idle warm child
    assert [o.db_hash_after for o in outcomes] == [retail.gold_hashes(task)[0]] * 3
    assert sandbox_pids(sandbox.id) == []
    assert zombie_children() == []


async def test_reused_children_serve_many_replays_and_die_with_a_failure(
    retail: Environment, task: Task
) -> None:
    limits = SandboxLimits(cpu_s=3, wall_s=20)
    request = ReplayRequest(domain="retail", task=task, limits=limits)
    async with LocalProcessSandbox(limits, replays_per_child=3) as sandbox:
        first = await sandbox.replay(request)
        [pid] = sandbox_pids(sandbox.id)  # the child stays, idle, for the next request
        second = await sandbox.replay(request)
        assert sandbox_pids(sandbox.id) == [pid]
        third = await sandbox.replay(request)  # its last: replaced afterwards
        assert await gone(sandbox.id) == []
        spin = await sandbox.replay(request.model_copy(update={"debug_action": "hang"}))
        after = await sandbox.replay(request)  # a new child, with a fresh CPU allowance
    gold = retail.gold_hashes(task)[0]
    assert [o.db_hash_after for o in (first, second, third, after)] == [gold] * 4
    assert third.duration_s < first.duration_s  # no start-up: the child was already there
    assert spin.failure is not None
    assert "SIGXCPU" in spin.failure.detail
    assert sandbox_pids(sandbox.id) == []
    assert zombie_children() == []


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("fork_bomb", "BlockingIOError"),  # RLIMIT_NPROC
        ("open_files", "Too many open files"),  # RLIMIT_NOFILE
        ("big_file", "File too large"),  # RLIMIT_FSIZE
    ],
)
async def test_process_file_and_size_limits_stop_a_child(
    sandbox: LocalProcessSandbox, task: Task, action: DebugAction, error: str
) -> None:
    limits = SandboxLimits(max_processes=16, max_open_files=64, max_file_mb=1)
    await sandbox.network_isolated()
    if action == "fork_bomb" and os.geteuid() == 0 and sandbox.namespaces.owner is None:
        pytest.skip("children stay root here (nobody cannot run this Python): no NPROC for root")
    outcome = await sandbox.replay(
        ReplayRequest(domain="retail", task=task, limits=limits, debug_action=action)
    )
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH, outcome
    assert outcome.failure is not None
    assert error in outcome.failure.detail


async def test_the_child_cannot_read_its_parents_environment(
    sandbox: LocalProcessSandbox, task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent holds the Redis password; its /proc/<pid>/environ is out of reach even to a
    child running as the same user (root included), from its own user namespace."""
    monkeypatch.setenv("SENTINEL_REDIS_URL", "redis://:hunter2@redis:6379/0")
    request = ReplayRequest(domain="retail", task=task, debug_action="read_parent_env")
    outcome = await sandbox.replay(request)
    assert outcome.network_isolated
    assert failure_code(outcome) == RejectionCode.SANDBOX_CRASH, outcome
    assert outcome.failure is not None
    assert "PermissionError" in outcome.failure.detail


async def test_isolation_is_required_unless_waived(
    task: Task, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare here: no namespaces
    with pytest.raises(SandboxUnavailable, match="allow_no_network_isolation"):
        await Namespaces("require").isolated()
    assert await Namespaces("prefer").isolated() is False
    async with LocalProcessSandbox() as sandbox:
        with pytest.raises(SandboxUnavailable):
            await sandbox.replay(ReplayRequest(domain="retail", task=task))
        assert sandbox_pids(sandbox.id) == []  # refused before any child started


def test_a_non_root_parent_gets_isolated_children(task: Task) -> None:
    """`unshare --net` alone needs root; the sandbox must isolate for anyone else too. Root
    plays a non-root parent from a user namespace where it is nobody, without capabilities
    (files are still reached as root, so the interpreter under /root runs)."""
    script = (
        "import anyio, sys\n"
        "from sentinel.envs.sandbox import LocalProcessSandbox, ReplayRequest\n"
        "from sentinel.schemas import Task\n"
        "async def main():\n"
        "    async with LocalProcessSandbox(preload=()) as box:\n"
        "        task = Task.model_validate_json(sys.stdin.read())\n"
        "        outcome = await box.replay(ReplayRequest(domain='retail', task=task))\n"
        "        print(outcome.ok, outcome.network_isolated, outcome.failure)\n"
        "anyio.run(main)\n"
    )
    nobody = ["unshare", "--user", "--map-user=65534", "--map-group=65534", "--"]
    if os.geteuid() != 0:
        nobody = []  # already not root
    else:  # the premise: as nobody, a network namespace alone is refused
        net_only = subprocess.run([*nobody, "unshare", "--net", "true"], check=False)
        assert net_only.returncode != 0
    done = subprocess.run(
        [*nobody, sys.executable, "-c", script], input=task.model_dump_json(),
        capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir(),
        env={**os.environ, "HOME": tempfile.gettempdir()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].split() == ["True", "True", "None"], done.stdout


async def test_env_assertions_are_evaluated_inside_the_replay(telecom: Environment) -> None:
    task = next(
        t for t in telecom.tasks("train")
        if t.spec.evaluation_criteria and t.spec.evaluation_criteria.env_assertions
    )  # fmt: skip
    criteria = task.spec.evaluation_criteria
    assert criteria is not None
    assert criteria.env_assertions is not None
    flipped = [
        a.model_copy(update={"assert_value": not a.assert_value}) for a in criteria.env_assertions
    ]
    broken = [
        a.model_copy(update={"arguments": {"no_such_argument": 1}}) for a in criteria.env_assertions
    ]
    outcomes = []
    async with LocalProcessSandbox(preload=("telecom",)) as sandbox:
        for assertions in (criteria.env_assertions, flipped, broken):
            changed = criteria.model_copy(update={"env_assertions": assertions})
            spec = task.spec.model_copy(update={"evaluation_criteria": changed})
            request = ReplayRequest(domain="telecom", task=task.model_copy(update={"spec": spec}))
            outcomes.append(await sandbox.replay(request))
    gold, inverted, bad = outcomes
    assert all(o.ok for o in outcomes), outcomes
    assert gold.assertions_after is True
    assert gold.assertion_error is None
    assert inverted.assertions_after is False
    assert bad.assertions_after is False
    assert bad.assertion_error is not None
    assert "no_such_argument" in bad.assertion_error


def test_the_parent_stays_light_and_the_child_is_a_module_of_its_own() -> None:
    """The validator imports the sandbox without tau2 or any environment; the replay child is
    `python -m sentinel.envs.replay`, and loads environments through the registry."""
    check = (
        "import sys, sentinel.envs.sandbox as s\n"
        "assert s.CHILD_MODULE == 'sentinel.envs.replay'\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'tau2'\n"
        "               or m.startswith(('sentinel.envs.tau2', 'sentinel.envs.episodes')))\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    replay = Path(sys.modules["sentinel.envs.sandbox"].__file__ or "").with_name("replay.py")
    assert "sentinel.envs.tau2" not in replay.read_text()
    assert "load(named(" in replay.read_text()
