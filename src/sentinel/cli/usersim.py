"""`sentinel usersim`: check the user simulator's fidelity, and fine-tune a user model.

Registered by `sentinel.cli` (`app.add_typer(usersim_app, name="usersim")`), whose callback
loads the settings into the context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import anyio
import typer

from sentinel import jsonl
from sentinel.agents.llm import LLMError, OpenAIChatClient
from sentinel.cli.base import fail, out, settings_of
from sentinel.config import Settings
from sentinel.schemas import Task

usersim_app = typer.Typer(
    help="Measure how faithful the user simulator is, and fine-tune a user model to fix it.",
    no_args_is_help=True,
)

TasksOption = Annotated[
    int | None,
    typer.Option(
        "--tasks", min=1, help="Held-out train tasks to probe (default usersim.check_tasks)."
    ),
]


@usersim_app.command()
def check(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="Served model or adapter (default llm.user_sim.model).")
    ] = None,
    tasks: TasksOption = None,
    scripted: Annotated[
        bool, typer.Option("--scripted", help="Probe the scripted user (rollout.user).")
    ] = False,
) -> None:
    """Probe the user simulator with scripted agent turns on retail train tasks: reveals known
    info, withholds unknown info, stops neither early nor never, stays the customer, does not
    recite its instructions, writes well-formed turns. Results go to <run_dir>/usersim/."""
    from sentinel.usersim.fidelity import check_fidelity, check_tasks, render_table

    settings = _with_tasks(settings_of(ctx), tasks)

    async def run() -> None:
        client = None if scripted else OpenAIChatClient(settings.llm.user_sim, model=model)
        try:
            report = await check_fidelity(settings, check_tasks(settings), client)
        finally:
            if client is not None:
                await client.aclose()
        out.print(render_table(report))
        out.print(f"results: {settings.run_dir / 'usersim'}")
        threshold = settings.usersim.min_fidelity
        if threshold is not None and report.score < threshold:
            fail(f"fidelity {report.score:.2f} is below usersim.min_fidelity {threshold:.2f}", 1)

    try:
        anyio.run(run)
    except LLMError as error:
        fail(f"the user simulator's endpoint failed: {error}", code=3)


@usersim_app.command()
def finetune(
    ctx: typer.Context,
    tasks: TasksOption = None,
    proposed: Annotated[
        Path | None,
        typer.Option(help="JSON lines of accepted proposed tasks to learn from as well."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Train on at most N tasks (default: all).")
    ] = None,
) -> None:
    """Fine-tune the user model (LoRA, the trainer's SFT mode) on gold-action dialogues of the
    train tasks not held out, serve it as user-v<N>, and compare fidelity before and after."""
    from sentinel.envs.registry import load
    from sentinel.serving.model import ModelUnavailable, prepare_model
    from sentinel.training.policy import keep_to_threads
    from sentinel.training.publisher import PublishError
    from sentinel.usersim.fidelity import check_tasks, render_table
    from sentinel.usersim.finetune import finetune as run_finetune

    settings = _with_tasks(settings_of(ctx), tasks)
    keep_to_threads(settings.trainer)
    domain = load(settings.env)
    holdout = check_tasks(settings)
    held = {t.id for t in holdout}
    train = [t for t in domain.tasks("train") if t.id not in held]
    try:
        train = (train + _proposed(proposed))[: limit or settings.usersim.max_examples]
        model_dir = settings.trainer.model_dir or prepare_model(settings.cache_dir)
        result = anyio.run(
            lambda: run_finetune(settings, domain, train, holdout, model_dir=model_dir)
        )
    except (ModelUnavailable, PublishError, LLMError) as error:
        fail(str(error), code=3)
    except ValueError as error:
        fail(str(error))
    out.print(render_table(result.before, result.after))
    out.print(
        f"adapter {result.name} at {result.adapter_path}, trained on {result.examples} dialogues"
    )
    out.print(f"improved: {', '.join(result.improved) or 'nothing'}")
    out.print(f"point the loop's user simulator at it with:  {result.config_line}")


def _with_tasks(settings: Settings, tasks: int | None) -> Settings:
    if tasks is None:
        return settings
    usersim = settings.usersim.model_copy(update={"check_tasks": tasks})
    return settings.model_copy(update={"usersim": usersim})


def _proposed(path: Path | None) -> list[Task]:
    """Accepted proposed tasks, one JSON `Task` per line; test-split tasks are refused later."""
    if path is None:
        return []
    return [Task.model_validate_json(line) for line in jsonl.lines(path)]
