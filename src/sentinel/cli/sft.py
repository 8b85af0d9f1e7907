"""`sentinel sft`: agent SFT before RL (EigenData's warm start), and `up`'s hook for it.

Registered by `sentinel.cli` on import; the logic is `sentinel.training.warm_start`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer
from rich.console import Console
from rich.progress import Progress

from sentinel.cli.base import app, fail, open_bus, out, require_keys_or_exit, settings_of
from sentinel.config import Settings
from sentinel.logs import get_logger

if TYPE_CHECKING:
    from sentinel.envs.base import Environment
    from sentinel.schemas import Task
    from sentinel.training.warm_start import Row, WarmStartResult

log = get_logger(__name__)


@app.command()
def sft(
    ctx: typer.Context,
    run: Annotated[
        Path | None,
        typer.Option(help="A run directory whose accepted proposed tasks train as well."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most N train tasks (default sft.max_tasks).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Synthesise and write the dialogues only.")
    ] = False,
    announce: Annotated[
        bool, typer.Option(help="Tell the run's orchestrator of the new policy (the bus).")
    ] = True,
) -> None:
    """Fine-tune the Solver before RL: tool-grounded dialogues from the train tasks' gold
    actions (real tool results, scripted user turns, verified to earn reward 1), rendered as
    the Solver prompts the server, then TRL's SFTTrainer (assistant-only loss, LoRA or full by
    trainer.full_finetune); published as policy-v1, which the trainer resumes RL from.
    Dialogues and the result go to <run_dir>/warm_start/."""
    from sentinel.envs.registry import load
    from sentinel.training.warm_start import started

    settings = settings_of(ctx)
    if started(settings) and not dry_run:
        fail(f"{settings.run_dir} has trainer checkpoints: the warm start is before RL", 1)
    domain = load(settings.env)
    tasks = domain.tasks("train")[: limit or settings.sft.max_tasks]
    if run is not None:
        tasks += _accepted(run)
    try:
        rows, dropped = _dialogues(settings, domain, tasks)
    except ValueError as error:
        fail(str(error))
    if dry_run:
        return
    require_keys_or_exit(settings.llm.policy)  # the servers' key, for loading the adapter
    result = anyio.run(_train_and_publish, settings, rows, dropped, announce)
    out.print(
        f"loss {result.loss_before:.4f} -> {result.loss_after:.4f} over {result.steps} steps "
        f"on {result.dialogues} dialogues; served as "
        f"{result.version.served_name if result.version else '-'}"
    )


def _accepted(run: Path) -> list[Task]:
    from sentinel.training.warm_start import accepted_tasks

    try:
        return accepted_tasks(run)
    except FileNotFoundError as error:
        fail(str(error))


def _dialogues(
    settings: Settings, domain: Environment, tasks: list[Task]
) -> tuple[list[Row], list[str]]:
    """Synthesise with a progress bar, render, and write them as JSON lines; and the tasks
    dropped (their dialogue did not earn reward 1)."""
    import json

    from sentinel.training.warm_start import render, solver_for, synthesise

    with Progress(console=Console(stderr=True), transient=True) as bar:
        job = bar.add_task("dialogues", total=len(tasks))
        kept, dropped = synthesise(domain, tasks, lambda: bar.advance(job))
    solver = solver_for(domain, settings.rollout)
    rows = [render(solver, g) for g in kept]
    directory = settings.run_dir / "warm_start"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dialogues.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out.print(f"{len(rows)} dialogues in {path}; {len(dropped)} dropped (reward below 1)")
    if not rows:
        fail("no dialogue earned reward 1: nothing to train on", 1)
    return rows, dropped


async def _train_and_publish(
    settings: Settings, rows: list[Row], dropped: list[str], announce: bool
) -> WarmStartResult:
    from sentinel.orchestrator.streams import Stream
    from sentinel.serving.model import ModelUnavailable, prepare_model
    from sentinel.training.policy import Policy, keep_to_threads
    from sentinel.training.publisher import LoRAPublisher, PublishError, served_name
    from sentinel.training.warm_start import WarmStartResult, checkpoints_dir, fine_tune, publish

    t = settings.trainer
    try:
        model_dir = t.model_dir or prepare_model(settings.cache_dir)
    except ModelUnavailable as error:
        fail(str(error), code=3)
    keep_to_threads(t)
    policy = await anyio.to_thread.run_sync(Policy, t, model_dir)
    directory = settings.run_dir / "warm_start"
    fit = await anyio.to_thread.run_sync(fine_tune, policy, rows, settings, directory / "trl")
    adapters = t.adapter_dir or settings.run_dir / "adapters"
    # An earlier attempt that failed to publish left its weights there, unannounced and never
    # sampled (no checkpoint yet): the publisher would refuse other weights under its name.
    shutil.rmtree(adapters / served_name(1), ignore_errors=True)
    publisher = LoRAPublisher(  # as the trainer's (cli.stages.trainer)
        adapters,
        t.publish_endpoints or [settings.llm.policy.base_url],
        settings.serve.served_model_name,
        headers=settings.llm.policy.auth_headers(),
    )
    try:
        version = await publish(policy, publisher, checkpoints_dir(settings), fit)
    except PublishError as error:
        fail(str(error), code=3)
    if announce:
        async with open_bus(settings) as bus:
            await bus.publish(Stream.POLICY_VERSIONS, version)
    result = WarmStartResult(
        dialogues=len(rows), dropped=dropped, loss_before=fit.loss_before,
        loss_after=fit.loss_after, steps=fit.steps, version=version,
    )  # fmt: skip
    (directory / "result.json").write_text(result.model_dump_json(indent=2))
    return result


def warm_start_before_rl(settings: Settings, config: Path, env: dict[str, str]) -> None:
    """`up`'s hook: `sentinel sft` in a child process (its model leaves with it), once per
    run: a resumed run, whose trainer has checkpoints, skips it."""
    from sentinel.training.warm_start import started

    if settings.loop.warm_start != "sft" or started(settings):
        return
    log.info("warm start: agent SFT before RL", run_dir=str(settings.run_dir))
    command = [sys.executable, "-m", "sentinel", "--config", str(config), "sft"]
    done = subprocess.run(command, env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        fail(f"the warm start (sentinel sft) failed with exit code {done.returncode}", 1)
