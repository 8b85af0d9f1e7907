"""The `sentinel` command: one subcommand per process kind, plus tools to look inside a run."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import anyio
import typer
from rich.console import Console

from sentinel import __version__
from sentinel.config import ConfigError, Settings, load_settings
from sentinel.logs import Format, configure_logging, get_logger
from sentinel.orchestrator.bus import Bus, connect
from sentinel.orchestrator.monitor import (
    render_table,
    run_monitor,
    take_snapshot,
    with_rates,
)
from sentinel.orchestrator.redis_server import RedisUnavailable, ensure_redis, resolve_url

app = typer.Typer(
    help="SENTINEL: failure-driven RL of tool-using LLM agents.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

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
    configure_logging(level, fmt_checked, process=ctx.invoked_subcommand or "")
    ctx.obj = settings


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
    """Print the effective settings as JSON (file, then SENTINEL_* variables, then defaults)."""
    print(_settings(ctx).model_dump_json(indent=2))


@app.command()
def redis(ctx: typer.Context) -> None:
    """Run the embedded Redis for this run directory in the foreground until Ctrl-C."""
    settings = _settings(ctx)
    if settings.redis_url:
        _fail(f"redis_url is set ({settings.redis_url}); nothing to start")
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
def up(
    ctx: typer.Context,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: until Ctrl-C).")
    ] = None,
) -> None:
    """Start the stack on this machine: embedded Redis (unless redis_url is set) and the queue
    monitor. The Solver, Controller, Proposer, workers and trainer join as they land."""
    settings = _settings(ctx)

    async def stack() -> None:
        async with _bus(settings) as bus:
            with anyio.move_on_after(duration):
                await run_monitor(bus, settings.monitor.interval_s, trim=settings.monitor.trim)
            out.print(render_table(await take_snapshot(bus)))

    try:
        with ensure_redis(settings) as url:
            log.info("stack up", redis=url, run_dir=str(settings.run_dir))
            _run(stack)
    except RedisUnavailable as error:
        _fail(str(error), code=3)


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
