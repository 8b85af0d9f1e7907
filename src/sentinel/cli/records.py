"""Commands that read a run: its report, the pattern library, the prompt book, and the
validator's verdict on a proposal file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.table import Table

from sentinel.cli.base import (
    app,
    fail,
    open_bus,
    out,
    run_until_signal,
    settings_of,
)
from sentinel.config import (
    load_settings,
)
from sentinel.schemas import TaskProposal, ValidationResult


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (run_dir of the run).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    check: Annotated[
        bool, typer.Option(help="Also check the record is whole; exit 1 if not.")
    ] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the run's charts to this page.")
    ] = None,
) -> None:
    """Summarise a run from its record: patterns and their trend over policy versions, tasks
    proposed and accepted, rollouts, train steps, policy versions and held-out pass^k."""
    from sentinel.report import build_report, problems, render_report

    try:
        summary = build_report(run_dir)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    out.print_json(summary.model_dump_json()) if as_json else out.print(render_report(summary))
    if html is not None:
        from sentinel.report_html import write_html

        write_html(run_dir, html)
    if check:
        from sentinel.envs.registry import load

        settings = load_settings(run_dir / "config.yaml")
        seeds = {t.id for t in load(settings.env).tasks("train")}
        if found := problems(run_dir, seeds):
            fail("the record is not whole:\n  " + "\n  ".join(found[:20]), code=1)


@app.command()
def patterns(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Show the error-pattern library: each pattern's failures and share per policy version,
    its steering weight, the patterns retired because they vanished, and those the
    Controller merged into another."""
    from sentinel.orchestrator.patterns import PatternLibrary

    settings = settings_of(ctx)

    async def show() -> None:
        async with open_bus(settings) as bus:
            library = PatternLibrary(bus.redis, settings.bus.prefix)
            rows = [(p, await library.trend(p), "") for p in await library.all()]
            rows += [(p, await library.trend(p), "retired") for p in await library.retired()]
            merged = await library.merged()
        if as_json:
            for pattern, trend, state in rows:
                record = {**pattern.model_dump(mode="json"), "share": trend}
                print(json.dumps(record | {"retired": state == "retired"}))
            for other, into in merged.items():
                print(json.dumps({"id": other, "merged_into": into}))
            return
        table = Table("pattern", "title", "tools", "failures", "share by version", "weight")
        for pattern, trend, state in rows:
            shares = " ".join(f"v{v}:{share:.0%}" for v, share in trend.items())
            total = str(sum(pattern.frequency.values()))
            weight = state or f"{pattern.weight:g}"
            table.add_row(
                pattern.id, pattern.title, ", ".join(pattern.tools), total, shares, weight
            )
        out.print(table)
        for other, into in merged.items():
            out.print(f"merged by the Controller: {other} into {into}")

    anyio.run(show)


@app.command()
def prompts(ctx: typer.Context) -> None:
    """Show the Proposer's prompt versions: lessons, who wrote them, and acceptance by
    validation against the parent version's."""
    from sentinel.agents.prompts import PromptBook

    settings = settings_of(ctx)

    async def show() -> None:
        async with open_bus(settings) as bus:
            book = PromptBook(bus.redis, settings.bus.prefix, settings.proposer)
            lineage = {line.version: line for line in await book.lineage()}
            for version in await book.versions():
                tally = await book.tally(f"version:{version.version}")
                line = lineage[version.version]
                print(json.dumps({
                    **version.model_dump(mode="json"),
                    "accepted": tally.accepted, "verdicts": tally.verdicts,
                    "rejections": tally.codes, "acceptance": line.acceptance,
                    "parent_acceptance": line.parent_acceptance, "gain": line.gain,
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

    settings = settings_of(ctx)
    parsed = read_proposal(path, settings.validation.max_task_chars)
    if isinstance(parsed, str):
        fail(parsed)
    results = [parsed] if isinstance(parsed, ValidationResult) else []
    errors: list[str] = []

    async def work() -> None:
        async with open_bus(settings) as bus:
            assert isinstance(parsed, TaskProposal)
            try:
                results.append(await validate_file(settings, bus.redis, parsed))
            except Exception as error:  # infrastructure: Redis, the sandbox, the endpoint
                errors.append(f"{type(error).__name__}: {error}")

    if not results:
        run_until_signal(work)
    if errors or not results:
        fail(f"validation could not run: {errors[0] if errors else 'interrupted'}", code=3)
    [result] = results
    typer.echo(result.model_dump_json() if as_json else render_verdict(result))
    raise typer.Exit(2 if result is parsed else 0 if result.accepted else 1)
