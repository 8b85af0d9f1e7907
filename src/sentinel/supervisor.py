"""`sentinel up`'s child processes: one per component, restarted when they die.

Each component runs as its own `sentinel` subcommand, exactly as a Kubernetes Deployment runs
it, with JSON logs in `<run_dir>/logs/<name>.log`. A component that dies (a crash, kill -9)
is restarted with backoff, up to `max_restarts` times. The orchestrator decides when the run
is over: its clean exit ends a bounded run, and an exit with a reason (the loop stopped, a bad
config, the run directory or Redis unusable) is the run's failure. An orchestrator that
crashes (an uncaught error, such as a Redis read timing out on a starved machine) is
restarted like any component: it resumes from Redis. `<run_dir>/pids.json` names each
component's current process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sentinel.logs import get_logger
from sentinel.process import start_child, stop_child

log = get_logger(__name__)

ORCHESTRATOR = "orchestrator"
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
CRASHED = 1  # Python's exit code after an uncaught error; every stop with a reason has its own
LOOP_STOPPED = 5  # the orchestrator's exit when the loop stops with a reason (LoopStopped)


class RunFailed(Exception):
    """A component cannot be kept up, or the orchestrator stopped the run with a reason."""


@dataclass
class Component:
    name: str
    args: list[str]  # after `sentinel`
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)  # exit codes


class Supervisor:
    def __init__(
        self,
        components: list[Component],
        run_dir: Path,
        config: Path,
        max_restarts: int = 5,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.components = components
        self.logs = run_dir / "logs"
        self.pids = run_dir / "pids.json"
        self.config = config
        self.max_restarts = max_restarts
        # Secrets for the children (SENTINEL_REDIS_URL): in their environment, which only
        # this user can read, never in their argv (`ps`) or the config file.
        self.env = dict(env or {})

    def argv(self, component: Component) -> list[str]:
        return [
            sys.executable, "-m", "sentinel", "--config", str(self.config),
            "--log-format", "json", *component.args,
        ]  # fmt: skip

    def start(self, component: Component) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        component.process = start_child(
            self.argv(component),
            self.logs / f"{component.name}.log",
            env={**os.environ, **self.env},
        )
        component.restart_at = None
        log.info("component started", component=component.name, pid=component.process.pid)
        self._write_pids()

    def start_all(self) -> None:
        for component in self.components:
            self.start(component)

    def stop_all(self) -> None:
        for component in reversed(self.components):  # the orchestrator first: no new work
            if component.process is not None:
                stop_child(component.process)
        self.pids.unlink(missing_ok=True)

    def poll(self) -> bool:
        """Restart what died; True once the orchestrator finished the run."""
        now = time.monotonic()
        for component in self.components:
            process = component.process
            if component.restart_at is not None and now >= component.restart_at:
                self.start(component)
            elif process is not None and component.restart_at is None:
                code = process.poll()
                if code is not None and self._exited(component, code, now):
                    return True
        return False

    def _exited(self, component: Component, code: int, now: float) -> bool:
        component.history.append(code)
        if component.name == ORCHESTRATOR and code == 0:
            return True
        if component.name == ORCHESTRATOR and code > 0 and code != CRASHED:
            raise RunFailed(f"the orchestrator stopped the run: {self.last_error(component)}")
        if component.restarts >= self.max_restarts:
            raise RunFailed(
                f"{component.name} exited {component.restarts + 1} times (last code {code}): "
                f"{self.last_error(component)}"
            )
        delay = BACKOFF_S[min(component.restarts, len(BACKOFF_S) - 1)]
        component.restarts += 1
        component.restart_at = now + delay
        log.warning(
            "component exited; restarting", component=component.name, code=code,
            restart=component.restarts, in_s=delay,
        )  # fmt: skip
        return False

    def last_error(self, component: Component) -> str:
        """The last error line of the component's log, for the message that ends the run."""
        path = self.logs / f"{component.name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for line in reversed(lines):
            if '"level": "error"' in line or line.startswith("error:"):
                try:
                    return str(json.loads(line).get("event", line))
                except ValueError:
                    return line
        return lines[-1] if lines else f"no output (see {path})"

    def _write_pids(self) -> None:
        pids = {c.name: c.process.pid for c in self.components if c.process is not None}
        self.pids.write_text(json.dumps(pids))
