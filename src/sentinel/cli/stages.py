"""One command per stage process: the trainer, the Controller, the Proposer, the Celery
workers and the orchestrator (each a child of `up`, and a Deployment in Kubernetes)."""

from __future__ import annotations

from pathlib import Path

import anyio
import typer

from sentinel.cli.base import (
    ConcurrencyOption,
    NoLLMOption,
    agent_client,
    app,
    fail,
    open_bus,
    require_keys_or_exit,
    run_until_signal,
    settings_of,
    worker_app,
    write_config,
)
from sentinel.config import (
    Settings,
)
from sentinel.orchestrator.redis_server import RedisUnavailable, resolve_url
from sentinel.serving.model import ModelUnavailable, prepare_model
from sentinel.supervisor import LOOP_STOPPED


@app.command()
def trainer(ctx: typer.Context) -> None:
    """Consume rollout groups, run GRPO steps (and SFT steps on LEAFE's corrections, by
    loop.training), checkpoint, and publish each new policy as a LoRA adapter to the vLLM
    endpoints (then to the `policy_versions` stream).

    Under `torchrun --nproc-per-node N -m sentinel trainer` the N processes shard the model
    (FSDP2): rank 0 reads the groups and publishes; the others make each step, checkpoint and
    adapter save with it (`Policy.follow`)."""
    from sentinel.training.distributed import World
    from sentinel.training.policy import Policy, keep_to_threads
    from sentinel.training.publisher import LoRAPublisher
    from sentinel.workers.trainer import TrainerWorker

    settings = settings_of(ctx)
    t = settings.trainer
    world = World.from_env(t.device)
    model_dir = t.model_dir
    try:  # rank 0 converts the model once; the others then read its cache
        if model_dir is None and world.main:
            model_dir = _model(settings)
        world.barrier()
        model_dir = model_dir or _model(settings)
    except ModelUnavailable as error:
        fail(str(error), code=3)
    keep_to_threads(t)
    policy = Policy(t, model_dir, world)
    if not world.main:
        policy.follow()
        return
    policy.lead()
    require_keys_or_exit(settings.llm.policy)  # the servers' key, for loading adapters
    publisher = LoRAPublisher(
        t.adapter_dir or settings.run_dir / "adapters",
        t.publish_endpoints or [settings.llm.policy.base_url],
        settings.serve.served_model_name,
        headers=settings.llm.policy.auth_headers(),
        keep_versions=t.max_staleness + 1,  # what rollouts of an allowed staleness use
        keep_every=settings.loop.eval_every,  # held-out evaluations sample these
    )

    async def work() -> None:
        async with open_bus(settings) as bus:
            worker = TrainerWorker(settings, bus, policy, publisher)
            await anyio.to_thread.run_sync(worker.resume)
            await worker.run()

    try:
        run_until_signal(work)
    finally:
        policy.dismiss()


def _model(settings: Settings) -> Path:
    return prepare_model(settings.cache_dir, settings.serve.model)


@app.command()
def controller(ctx: typer.Context, no_llm: NoLLMOption = False) -> None:
    """Diagnose failed trajectories (signals + LLM) into the error-pattern library, and
    publish patterns for the Proposer."""
    from sentinel.agents.controller import Controller
    from sentinel.envs.registry import load
    from sentinel.orchestrator.patterns import PatternLibrary
    from sentinel.orchestrator.pool import TaskPool

    settings = settings_of(ctx)
    enabled = settings.controller.use_llm and not no_llm
    if enabled:
        require_keys_or_exit(settings.llm.controller)
    domain = load(settings.env)

    async def work() -> None:
        async with open_bus(settings) as bus:
            prefix = settings.bus.prefix
            pool = TaskPool(bus.redis, prefix, domain.tasks("train"))
            library = PatternLibrary(bus.redis, prefix, settings.controller.merge_similarity)
            async with agent_client(settings.llm.controller, enabled) as client:
                targets = settings.loop.mode == "failure_driven"
                await Controller(
                    domain, pool, library, bus, settings.controller, client, targets=targets
                ).run()

    run_until_signal(work)


@app.command()
def proposer(ctx: typer.Context, no_llm: NoLLMOption = False) -> None:
    """Write grounded tasks for each error pattern (mutating seeds when that keeps failing),
    and learn from validation verdicts (self-evolving prompts)."""
    from sentinel.agents.lessons import lesson_writer
    from sentinel.agents.prompts import PromptBook
    from sentinel.agents.proposer import Proposer
    from sentinel.envs.episodes import EnvPool
    from sentinel.envs.registry import load
    from sentinel.envs.sandbox import SandboxLimits

    settings = settings_of(ctx)
    enabled = settings.proposer.use_llm and not no_llm
    if enabled:
        require_keys_or_exit(settings.llm.proposer)
    domain = load(settings.env)
    rollout = settings.rollout  # mutation replays run under the rollouts' limits
    limits = SandboxLimits(memory_mb=rollout.env_memory_mb)

    async def work() -> None:
        async with open_bus(settings) as bus:
            envs = EnvPool(domain.settings, tool_timeout_s=rollout.tool_timeout_s, limits=limits)
            async with agent_client(settings.llm.proposer, enabled) as client, envs:
                book = PromptBook(
                    bus.redis, settings.bus.prefix, settings.proposer,
                    lesson_writer(client, settings.proposer),
                )  # fmt: skip
                await Proposer(domain, book, bus, settings.proposer, client, envs).run()

    run_until_signal(work)


@worker_app.command("validate")
def worker_validate(ctx: typer.Context, concurrency: ConcurrencyOption = None) -> None:
    """Run a Celery worker on the `validate` queue (sandboxed replay and checks)."""
    from sentinel.workers.app import VALIDATE_QUEUE

    _celery_worker(settings_of(ctx), VALIDATE_QUEUE, concurrency)


@worker_app.command("rollout")
def worker_rollout(ctx: typer.Context, concurrency: ConcurrencyOption = None) -> None:
    """Run a Celery worker on the `rollout` queue (Solver rollout groups on the policy server)."""
    from sentinel.workers.app import ROLLOUT_QUEUE

    settings = settings_of(ctx)
    llm = settings.llm
    leafe = settings.leafe.use_llm and settings.loop.training != "grpo"
    require_keys_or_exit(llm.policy, llm.user_sim, llm.reflector if leafe else None)
    _celery_worker(settings, ROLLOUT_QUEUE, concurrency)


def _celery_worker(settings: Settings, queue: str, concurrency: int | None) -> None:
    from sentinel.workers.app import make_app

    try:
        url = resolve_url(settings)
    except RedisUnavailable as error:
        fail(str(error), code=3)
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
    from sentinel.envs.registry import load
    from sentinel.orchestrator.curriculum import Curriculum
    from sentinel.orchestrator.loop import Loop, LoopStopped, loop_progress
    from sentinel.orchestrator.pool import TaskPool
    from sentinel.orchestrator.recorder import RunDirError
    from sentinel.usersim.fidelity import FidelityTooLow, gate
    from sentinel.workers.app import make_app

    settings = settings_of(ctx)
    domain = load(settings.env)

    async def work() -> None:
        async with open_bus(settings) as bus:
            if (await loop_progress(bus.redis, settings.bus.prefix)).dispatched == 0:
                await gate(settings)  # before RL starts, not again on a resume
            celery = make_app(settings, resolve_url(settings))
            pool = TaskPool(bus.redis, settings.bus.prefix, domain.tasks("train"))
            curriculum = Curriculum(bus.redis, settings.bus.prefix, pool, settings.loop)
            # task lists only: rollouts and evaluations run on the workers
            tools = domain.write_tools if settings.loop.mode == "synthetic" else ()
            await Loop(settings, bus, celery, curriculum, domain.tasks("test"), tools).run()

    try:
        write_config(settings)
        run_until_signal(work)
    except LoopStopped as error:
        fail(f"the loop stopped: {error}", code=LOOP_STOPPED)
    except FidelityTooLow as error:
        fail(f"RL not started: {error}", code=LOOP_STOPPED)
    except (RunDirError, OSError) as error:
        fail(str(error), code=4)
