"""A tiny real `up`: two supervised children (one steady, one that keeps dying) under the
live view, on a real Redis; the tmux test watches it on a real terminal.

Run as: python -m tests.live_demo RUN_DIR URL_FILE PREFIX (the URL in a file: never in argv)
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from sentinel.config import BusSettings, LoopSettings, Settings
from sentinel.live import summary_console, watch
from sentinel.logs import configure_logging
from sentinel.orchestrator.bus import Bus, connect
from sentinel.supervisor import Component, RunFailed, Supervisor


class Demo(Supervisor):
    """Children that are plain Python one-liners instead of `sentinel` subcommands."""

    def argv(self, component: Component) -> list[str]:
        return [sys.executable, "-c", component.args[0]]


async def main(run_dir: Path, url: str, prefix: str) -> None:
    settings = Settings(
        run_dir=run_dir, redis_url=url, bus=BusSettings(prefix=prefix),
        loop=LoopSettings(max_groups=10, group_size=4),
    )  # fmt: skip
    configure_logging(fmt="console")
    children = [
        Component("steady", ["import time; time.sleep(120)"]),
        Component("flaky", ["import time; time.sleep(0.5); raise SystemExit(1)"]),
    ]
    # three restarts (backoffs of 1, 2 and 5 s): "restarting" stays up long enough to be seen
    supervisor = Demo(children, run_dir, run_dir / "config.yaml", max_restarts=3)
    bus = Bus(connect(url, settings), settings.bus)
    await bus.redis.sadd(f"{prefix}:loop:returned", "g1", "g2", "g3")
    supervisor.start_all()
    try:
        await watch(settings, supervisor, bus)
    except RunFailed as error:  # flaky's fourth exit: the run's end, as in `up`
        summary_console().print(f"run failed: {error}")
    finally:
        supervisor.stop_all()
        await bus.aclose()


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]), Path(sys.argv[2]).read_text().strip(), sys.argv[3])
