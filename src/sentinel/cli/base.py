"""The root `sentinel` command and what its subcommands share: settings, the bus, exits."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import anyio
import typer
import yaml
from rich.console import Console

from sentinel.config import (
    ConfigError,
    LLMEndpoint,
    MissingKey,
    Settings,
    load_settings,
    record_dump,
    require_keys,
    write_private,
)
from sentinel.logs import Format, configure_logging, get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.redis_server import RedisUnavailable, resolve_url

if TYPE_CHECKING:  # heavy (tau2, litellm, torch): imported by the commands that need them
    from sentinel.agents.llm import ClosableChatClient


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


log = get_logger("sentinel.cli")


out = Console(width=None if sys.stdout.isatty() else 200)  # tables stay whole in pipes


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML or TOML settings file (or $SENTINEL_CONFIG)."),
]


def fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def settings_of(ctx: typer.Context) -> Settings:
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
        fail(str(error))
    level = (log_level or settings.log.level).upper()
    fmt = log_format or settings.log.format
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"} or fmt not in {"auto", "json", "console"}:
        fail(f"bad logging options: level {level!r}, format {fmt!r}")
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


def require_keys_or_exit(*endpoints: LLMEndpoint | None) -> None:
    """Fail closed at start, exit 2, when an endpoint's required key is unset."""
    try:
        require_keys(*endpoints)
    except MissingKey as error:
        fail(str(error))


@asynccontextmanager
async def open_bus(settings: Settings) -> AsyncIterator[Bus]:
    try:
        url = resolve_url(settings)
    except RedisUnavailable as error:
        fail(str(error), code=3)
    bus = Bus(connect(url, settings), settings.bus)
    try:
        yield bus
    finally:
        await bus.aclose()


def run_until_signal(fn: Callable[[], Awaitable[None]]) -> None:
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


NoLLMOption = Annotated[
    bool, typer.Option("--no-llm", help="Deterministic only: no LLM endpoint is called.")
]


@asynccontextmanager
async def agent_client(
    endpoint: LLMEndpoint, enabled: bool
) -> AsyncIterator[ClosableChatClient | None]:
    """An agent's LLM client (None with --no-llm), closed before the event loop ends: the
    openai SDK or litellm, as `endpoint.client` says."""
    from sentinel.agents.llm import open_chat_client

    client = open_chat_client(endpoint) if enabled else None
    try:
        yield client
    finally:
        if client is not None:
            await client.aclose()


ConcurrencyOption = Annotated[
    int | None, typer.Option(help="Worker processes (default: workers.concurrency).")
]


def write_config(settings: Settings) -> Path:
    """The effective settings, which every child process loads: the run's config record.
    0600, and without a password-bearing redis_url (record_dump)."""
    path = settings.run_dir / "config.yaml"
    write_private(path, yaml.safe_dump(record_dump(settings), sort_keys=False))
    return path
