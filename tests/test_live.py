"""`sentinel up`'s live view: pure rendering on rich's recording console, the figures behind
it, and the 80-column closing summary."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console, RenderableType

from sentinel.live import (
    ComponentView,
    HeldOut,
    LiveFigures,
    RateMeter,
    component_view,
    last_held_out,
    live_view_wanted,
    render,
    summary_console,
)
from sentinel.logs import configure_logging
from sentinel.orchestrator.loop import Progress
from sentinel.orchestrator.monitor import GroupFigures, QueueSnapshot, StreamFigures
from sentinel.report import LeafeFigures, PatternTrend, RunReport, render_report
from sentinel.schemas.training import EvalReport
from sentinel.supervisor import Component


def recorded(renderable: RenderableType, width: int = 80) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, record=True)
    console.print(renderable)
    return console.export_text()


def lines_fit(text: str, width: int = 80) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, too_wide


def snapshot() -> QueueSnapshot:
    group = GroupFigures(
        group="trainer", consumers=1, pending=3, lag=17, oldest_pending_age_s=42.0,
        totals={"read": 1, "acked": 1, "dead": 0},
    )  # fmt: skip
    stream = StreamFigures(
        stream="rollout_groups", length=5, published=20, dead_letters=0,
        dead_letters_dropped=0, groups=[group],
    )  # fmt: skip
    return QueueSnapshot(at=datetime.now(UTC), monotonic=0.0, streams=[stream])


def figures() -> LiveFigures:
    return LiveFigures(
        budget=40,
        elapsed_s=125.0,
        progress=Progress(dispatched=14, returned=12, accounted=10, inflight=2, dropped=1),
        rollouts_per_s=2.0,
        eta_s=200.0,
        held_out=HeldOut(version=2, pass_hat_k={1: 0.5, 2: 0.25}),
        components=[
            ComponentView("orchestrator", "running", 4242, 0),
            ComponentView("worker-rollout", "restarting in 2s", 4250, 3),
        ],
        queues=snapshot(),
    )


def test_the_panel_shows_every_figure_within_80_columns() -> None:
    text = recorded(render(figures()))
    lines_fit(text)
    for expected in (
        "groups 12/40", "rollouts/s 2.00", "ETA 3m20s", "elapsed 2m05s", "trained 10",
        "held-out v2: pass^1 0.500  pass^2 0.250", "orchestrator", "running",
        "worker-rollout", "restarting in 2s", "rollout_groups/trainer", "42s",
    ):  # fmt: skip
        assert expected in text, expected
    restarts = next(line for line in text.splitlines() if "worker-rollout" in line)
    assert " 3 " in restarts or restarts.rstrip(" │").endswith("3")
    assert " 17 " in next(line for line in text.splitlines() if "rollout_groups" in line)


def test_the_panel_shows_the_most_behind_queues_and_counts_the_rest() -> None:
    many = snapshot()
    template = many.streams[0]
    for i in range(12):  # caught-up groups, then one far behind
        group = template.groups[0].model_copy(update={"group": f"g{i}", "lag": 0, "pending": 0})
        many.streams.append(template.model_copy(update={"stream": f"s{i}", "groups": [group]}))
    behind = template.groups[0].model_copy(update={"group": "late", "lag": 99})
    many.streams.append(template.model_copy(update={"stream": "z", "groups": [behind]}))
    text = recorded(render(LiveFigures(budget=4, elapsed_s=1.0, queues=many)))
    assert "z/late" in text
    assert "rollout_groups/trainer" in text
    assert "+6 more (0 behind)" in text  # 14 groups, 8 shown
    assert len(text.splitlines()) <= 24


def test_the_panel_before_any_figure_and_when_redis_is_slow() -> None:
    empty = LiveFigures(budget=None, elapsed_s=0.0, stale="Redis did not answer")
    text = recorded(render(empty))
    assert "groups 0 " in text  # no budget: no "/N" and no bar
    assert "not evaluated yet" in text
    assert "stale: Redis did not answer" in text
    assert "ETA -" in text


def test_the_rate_is_over_a_sliding_window_and_gives_an_eta() -> None:
    meter = RateMeter(group_size=4, window_s=10.0)
    assert meter.rollouts_per_s() is None
    meter.add(0.0, 0)
    meter.add(5.0, 10)  # 2 groups/s
    assert meter.rollouts_per_s() == pytest.approx(8.0)
    assert meter.eta_s(budget=30, returned=10) == pytest.approx(10.0)
    assert meter.eta_s(budget=None, returned=10) is None
    meter.add(30.0, 10)
    meter.add(40.0, 10)  # stalled for a whole window: no progress, no ETA
    assert meter.rollouts_per_s() == 0.0
    assert meter.eta_s(budget=30, returned=10) is None


def test_component_states_come_from_the_supervisor_without_reaping() -> None:
    component = Component("trainer", ["trainer"])
    assert component_view(component, 0.0).state == "not started"
    component.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert component_view(component, 0.0).state == "running"  # not polled yet
    component.process.wait()
    assert component_view(component, 0.0).state == "exited 3"
    component.restarts, component.restart_at = 2, 5.0
    view = component_view(component, 1.0)
    assert (view.state, view.restarts) == ("restarting in 4s", 2)


def test_the_last_held_out_figures_are_the_newest_versions(tmp_path: Path) -> None:
    assert last_held_out(tmp_path) is None
    path = tmp_path / "artifacts" / "evaluations.jsonl"
    path.parent.mkdir()
    reports = [
        EvalReport(
            policy="smol", policy_version=v, tasks=2, trials=2, pass_hat_k={1: p},
            pass_at_k={1: p}, mean_reward=p, terminations={},
        ).model_dump_json()
        for v, p in ((3, 0.75), (0, 0.25))
    ]  # fmt: skip
    path.write_text(f"{reports[0]}\n{{torn\n{reports[1]}\n")
    assert last_held_out(tmp_path) == HeldOut(3, {1: 0.75})


def test_the_view_is_only_for_a_terminal_with_console_logs() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    try:
        configure_logging(fmt="console")
        assert live_view_wanted(Tty())
        assert not live_view_wanted(io.StringIO())
        configure_logging(fmt="json")  # --log-format json on a terminal: JSON lines stay
        assert not live_view_wanted(Tty())
    finally:
        configure_logging()


def long_report() -> RunReport:
    return RunReport(
        run_dir="runs/a-rather-long-run-directory-name/with/several/levels/of/nesting",
        patterns=[
            PatternTrend(
                id=f"p{i}", title="Agent cancels the wrong reservation after the user "
                "changes their mind about which flight", category="wrong_action",
                share={0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}, trained_groups=12,
            )
            for i in range(3)
        ],
        categories={}, proposals=40, accepted=31,
        top_rejections={"duplicate_scenario": 4, "ungrounded_entity": 3, "unsolvable": 2},
        tasks_by_origin={"llm": 31, "mutation": 5, "seed": 50},
        rollouts=640, groups=160, dropped_groups=3,
        drop_reasons={"all rewards equal and the group was not informative": 3},
        informative_groups=120, train_steps=40, policy_versions=list(range(12)),
        trainer_idle_fraction=0.25,
        evals={0: {1: 0.25, 2: 0.125, 3: 0.0625, 4: 0.03125}, 8: {1: 0.5, 2: 0.25, 4: 0.1}},
        evals_at_k={0: {1: 0.25, 2: 0.4, 3: 0.5, 4: 0.55}},
        eval_infra_errors={8: 2},
        leafe=LeafeFigures(failures=10, reflected=9, branches=18, interactions=140),
    )  # fmt: skip


def test_the_closing_summary_fits_80_columns_without_losing_a_figure() -> None:
    out = io.StringIO()
    summary_console(out).print(render_report(long_report()))
    text = out.getvalue()
    lines_fit(text)
    flat = " ".join(text.replace("│", " ").split())  # cells wrapped over lines, joined
    for expected in ("pass^4 0.031", "pass@4 0.550", "(trained 12)", "ungrounded_entity 3",
                     "left out)", "25%", "v3: 10%"):  # fmt: skip
        assert expected in flat, expected
    assert "…" not in text  # wrapped, never cut


def test_the_closing_summary_is_80_columns_in_a_pipe() -> None:
    assert summary_console(io.StringIO()).width == 80  # not the 200 of `out` off a TTY


# -- on a real terminal ----------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) with one 80x40 pane running `command`."""

    def __init__(self, socket: str, command: str) -> None:
        self.base = ["tmux", "-L", socket]
        subprocess.run(
            [*self.base, "new-session", "-d", "-x", "80", "-y", "40", "-s", "live", command],
            check=True,
        )

    def screen(self) -> str:
        pane = subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", "live"], capture_output=True, text=True
        )
        return pane.stdout

    def wait_for(self, *texts: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if all(text in screen for text in texts):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"never saw {texts} on:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], check=False)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_live_view_on_a_real_terminal(tmp_path: Path, redis_url: str) -> None:
    run_dir, prefix = tmp_path / "run", f"test-{uuid.uuid4().hex[:8]}"
    (run_dir / "artifacts").mkdir(parents=True)
    report = EvalReport(
        policy="smol", policy_version=1, tasks=2, trials=2, pass_hat_k={1: 0.5, 2: 0.25},
        pass_at_k={1: 0.5, 2: 0.75}, mean_reward=0.5, terminations={},
    )  # fmt: skip
    (run_dir / "artifacts" / "evaluations.jsonl").write_text(report.model_dump_json() + "\n")
    url_file = tmp_path / "redis_url"
    url_file.write_text(redis_url)
    command = f"{sys.executable} -m tests.live_demo {run_dir} {url_file} {prefix}; sleep 60"
    tmux = Tmux(f"sentinel-test-{prefix}", f"cd {Path.cwd()} && {command}")
    try:
        during = tmux.wait_for("groups 3/10", "restarting in", "held-out v1: pass^1 0.500")
        assert "steady" in during
        assert "running" in during
        end = tmux.wait_for("run failed: flaky exited 4 times")
    finally:
        tmux.close()
    lines_fit(end)
    flaky = [line for line in end.splitlines() if line.startswith("│  flaky")][-1]
    assert "exited 1" in flaky  # the last panel shows how the run ended
    assert flaky.rstrip(" │").endswith("3")  # and its restarts
    assert "component exited; restarting" in end  # console logs above the panel
