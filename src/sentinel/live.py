"""`sentinel up`'s live view on a terminal: progress, rates, held-out pass^k, components,
queue lags and an ETA in one rich `Live` panel, redrawn every second.

Only on a TTY stderr with console logs (`live_view_wanted`): JSON log lines stay exactly as
they are for jq and log shippers. Rendering is pure (`render` of `LiveFigures`), so it is
tested on rich's recording console; `watch` gathers the figures (the supervisor's
components, `loop_progress`, `take_snapshot`, the recorded evaluations) and drives the panel.
The closing figures (`summary_console`, `render_lags`) fit an 80-column terminal.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from sentinel import jsonl
from sentinel.config import Settings
from sentinel.logs import get_logger, logs_are_json
from sentinel.orchestrator.bus import Bus
from sentinel.orchestrator.loop import Progress, loop_progress
from sentinel.orchestrator.monitor import QueueSnapshot, take_snapshot
from sentinel.orchestrator.recorder import artifacts_dir
from sentinel.orchestrator.streams import Stream
from sentinel.schemas.training import EvalReport
from sentinel.supervisor import Component, Supervisor

log = get_logger(__name__)

SUMMARY_WIDTH = 80  # the closing summary fits a default terminal, and a pipe's reader
RATE_WINDOW_S = 60.0  # rollouts/s over the last minute: recent, yet not one group's jitter
PANEL_QUEUES = 8  # queue rows in the panel, the most behind first: it fits 40 lines
SLOW_EVERY_S = 5.0  # queue snapshots and evaluations: more Redis round trips, change slowly


def live_view_wanted(stream: object = None) -> bool:
    """A live panel only for a person at a terminal: stderr a TTY, logs not JSON."""
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return bool(isatty and isatty()) and not logs_are_json()


def summary_console(file: IO[str] | None = None) -> Console:
    """Where `up` prints its closing report: at most 80 columns (narrower on a narrow TTY),
    so no column is cut; rich wraps long cells instead."""
    probe = Console(file=file)
    width = min(probe.width, SUMMARY_WIDTH) if probe.is_terminal else SUMMARY_WIDTH
    return Console(file=file, width=width)


# -- the figures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentView:
    name: str
    state: str  # running, restarting in 2s, exited 1, not started
    pid: int | None
    restarts: int


@dataclass(frozen=True)
class HeldOut:
    version: int
    pass_hat_k: dict[int, float]


@dataclass
class LiveFigures:
    budget: int | None  # loop.max_groups; None: until stopped
    elapsed_s: float
    progress: Progress | None = None
    rollouts_per_s: float | None = None
    eta_s: float | None = None
    held_out: HeldOut | None = None
    components: list[ComponentView] = field(default_factory=list)
    queues: QueueSnapshot | None = None
    stale: str | None = None  # why the figures are old (Redis not answering)


def component_view(component: Component, now: float) -> ComponentView:
    """A component's state without touching its process (no poll: the supervisor reaps)."""
    process = component.process
    pid = process.pid if process is not None else None
    if component.restart_at is not None:
        state = f"restarting in {max(0.0, component.restart_at - now):.0f}s"
    elif process is None:
        state = "not started"
    elif process.returncode is not None:
        state = f"exited {process.returncode}"
    else:
        state = "running"
    return ComponentView(component.name, state, pid, component.restarts)


class RateMeter:
    """Groups back per second over a sliding window, as rollouts/s and an ETA."""

    def __init__(self, group_size: int, window_s: float = RATE_WINDOW_S) -> None:
        self.group_size = group_size
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, returned: int) -> None:
        self.samples.append((at, returned))
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def groups_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def rollouts_per_s(self) -> float | None:
        rate = self.groups_per_s()
        return None if rate is None else rate * self.group_size

    def eta_s(self, budget: int | None, returned: int) -> float | None:
        """Seconds to the budget at the current rate; None while unknown or unbounded."""
        rate = self.groups_per_s()
        if budget is None or not rate or rate <= 0:
            return None
        return max(0, budget - returned) / rate


def last_held_out(run_dir: Path) -> HeldOut | None:
    """The newest policy version's held-out pass^k, from the recorder's evaluations file."""
    newest: EvalReport | None = None
    for line in jsonl.lines(artifacts_dir(run_dir) / f"{Stream.EVALUATIONS.value}.jsonl"):
        try:
            report = EvalReport.model_validate_json(line)
        except ValidationError:  # a line torn by a crash
            continue
        if newest is None or (report.policy_version or 0) >= (newest.policy_version or 0):
            newest = report
    if newest is None:
        return None
    return HeldOut(newest.policy_version or 0, dict(sorted(newest.pass_hat_k.items())))


# -- rendering (pure) -----------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render_headline(f: LiveFigures) -> RenderableType:
    """Groups back against the budget, as a bar and as figures."""
    back = f.progress.returned if f.progress else 0
    total = f"/{f.budget}" if f.budget else ""
    rate = "-" if f.rollouts_per_s is None else f"{f.rollouts_per_s:.2f}"
    line = Text.assemble(
        ("groups ", "bold"), f"{back}{total}",
        ("  rollouts/s ", "bold"), rate,
        ("  ETA ", "bold"), duration(f.eta_s),
        ("  elapsed ", "bold"), duration(f.elapsed_s),
    )  # fmt: skip
    if f.progress is not None:
        line.append(
            f"\ntrained {f.progress.accounted}  in flight {f.progress.inflight}  "
            f"dropped {f.progress.dropped}"
        )
    if not f.budget:
        return line
    bar = Table.grid(expand=True, padding=(0, 1))
    bar.add_column(ratio=1)
    bar.add_column(justify="right")
    bar.add_row(ProgressBar(total=f.budget, completed=min(back, f.budget)),
                f"{min(back, f.budget) / f.budget:.0%}")  # fmt: skip
    return Group(bar, line)


def render_held_out(held_out: HeldOut | None) -> Text:
    if held_out is None:
        return Text("held-out pass^k: not evaluated yet", style="dim")
    figures = "  ".join(f"pass^{k} {v:.3f}" for k, v in held_out.pass_hat_k.items())
    return Text.assemble(("held-out ", "bold"), f"v{held_out.version}: {figures}")


def render_components(components: list[ComponentView]) -> Table:
    table = Table(title="components", title_justify="left", expand=False, box=None)
    for name, justify in (("name", "left"), ("state", "left"), ("pid", "right"),
                          ("restarts", "right")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for c in components:
        style = "green" if c.state == "running" else "yellow"
        restarts = Text(str(c.restarts), style="red" if c.restarts else "")
        table.add_row(c.name, Text(c.state, style=style), str(c.pid or "-"), restarts)
    return table


def render_lags(snapshot: QueueSnapshot | None, limit: int | None = None) -> Table:
    """Per stream and consumer group: entries not yet read (lag), read and not acknowledged
    (pending), and the oldest pending one's age. Narrow: four columns. `limit`: only the
    most behind groups (the panel must fit a terminal's height), the rest counted."""
    table = Table(title="queues", title_justify="left", expand=False, box=None)
    for name in ("stream/group", "lag", "pending", "oldest"):
        table.add_column(name, justify="left" if name == "stream/group" else "right")
    rows = [(s.stream, g) for s in (snapshot.streams if snapshot else []) for g in s.groups]
    if limit is not None:
        rows.sort(key=lambda row: row[1].lag + row[1].pending, reverse=True)
    for stream, group in rows[:limit]:
        age = group.oldest_pending_age_s
        table.add_row(
            f"{stream}/{group.group}", str(group.lag), str(group.pending),
            "-" if age is None else f"{age:.0f}s",
        )  # fmt: skip
    if hidden := rows[limit:] if limit is not None else []:
        behind = sum(1 for _, g in hidden if g.lag or g.pending)
        table.add_row(Text(f"+{len(hidden)} more ({behind} behind)", style="dim"))
    return table


def render(f: LiveFigures) -> Panel:
    """The whole panel; components and queues side by side where they fit (Columns)."""
    lags = render_lags(f.queues, limit=PANEL_QUEUES)
    sides = Columns([render_components(f.components), lags], padding=(0, 4))
    subtitle = f"[yellow]stale: {f.stale}[/]" if f.stale else None
    body = Group(render_headline(f), render_held_out(f.held_out), Text(""), sides)
    return Panel(body, title="sentinel up", subtitle=subtitle, title_align="left")


# -- the driver -----------------------------------------------------------------------------


class Watcher:
    """Gathers `LiveFigures` for a run: fast figures every call, slow ones every few seconds."""

    def __init__(self, settings: Settings, supervisor: Supervisor, bus: Bus) -> None:
        self.settings, self.supervisor, self.bus = settings, supervisor, bus
        self.started = time.monotonic()
        self.meter = RateMeter(settings.loop.group_size)
        self.figures = LiveFigures(budget=settings.loop.max_groups, elapsed_s=0.0)
        self.slow_at = 0.0

    def components(self) -> LiveFigures:
        """The figures with the components' states now (no Redis round trip)."""
        now = time.monotonic()
        self.figures.elapsed_s = now - self.started
        self.figures.components = [component_view(c, now) for c in self.supervisor.components]
        return self.figures

    async def sample(self) -> LiveFigures:
        f = self.components()
        now = time.monotonic()
        try:  # a slow or restarting Redis leaves the last figures up, marked stale
            await self._sample_redis(now)
            f.stale = None
        except (RedisError, OSError) as error:
            log.debug("live view: no figures this second", error=repr(error))
            f.stale = "Redis did not answer"
        return f

    async def _sample_redis(self, now: float) -> None:
        f = self.figures
        f.progress = await loop_progress(self.bus.redis, self.settings.bus.prefix)
        self.meter.add(now, f.progress.returned)
        f.rollouts_per_s = self.meter.rollouts_per_s()
        f.eta_s = self.meter.eta_s(f.budget, f.progress.returned)
        if now >= self.slow_at:
            self.slow_at = now + SLOW_EVERY_S
            f.queues = await take_snapshot(self.bus)
            f.held_out = last_held_out(self.settings.run_dir)


async def watch(
    settings: Settings,
    supervisor: Supervisor,
    bus: Bus,
    console: Console | None = None,
    every_s: float = 1.0,
) -> None:
    """Poll the supervisor (restarts, the end of the run) every `every_s`, redrawing the
    panel, until the orchestrator finishes; RunFailed from the supervisor passes through.
    The last panel stays on screen, above the closing summary."""
    from rich.live import Live

    watcher = Watcher(settings, supervisor, bus)
    console = console or Console(stderr=True)
    with Live(render(watcher.figures), console=console, auto_refresh=False) as live:
        try:
            while not supervisor.poll():
                live.update(render(await watcher.sample()), refresh=True)
                await anyio.sleep(every_s)
        finally:  # the components as the run ended (no Redis: this may be a cancellation)
            live.update(render(watcher.components()), refresh=True)
