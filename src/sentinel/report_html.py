"""`sentinel report RUN --html FILE`: the run's curves on one self-contained page.

Built from the recorded JSONL alone (`Artifacts`), with plotly.js inlined once, so the page
fetches nothing and opens offline. Seven charts: held-out pass^k per policy version with 95%
intervals over tasks, reward per train step, pattern shares across versions, acceptance and
rejection reasons over time, the trainer's idle time and the groups' wait, every queue's lag
over time (the snapshots `up` records), and LEAFE.
"""

from __future__ import annotations

import html
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from pydantic import ValidationError

from sentinel import jsonl
from sentinel.evaluation import final_results, group_results
from sentinel.metrics import pass_hat_k, succeeded
from sentinel.orchestrator.monitor import QUEUES_FILE, QueueSnapshot
from sentinel.orchestrator.streams import Stream
from sentinel.report import Artifacts, RunReport, build_report
from sentinel.schemas import (
    EvalReport,
    RolloutGroup,
    TrainStepReport,
    ValidationResult,
)

Z95 = 1.96


def write_html(run_dir: Path, path: Path) -> None:
    path.write_text(render_html(run_dir), encoding="utf-8")


def render_html(run_dir: Path) -> str:
    a = Artifacts(run_dir)
    summary = build_report(run_dir)
    groups = a.read(Stream.ROLLOUT_GROUPS, RolloutGroup)
    reports = sorted(a.read(Stream.TRAIN_REPORTS, TrainStepReport), key=lambda r: r.created_at)
    figures = [
        _pass_k(a.read(Stream.EVALUATIONS, EvalReport), groups),
        _rewards(reports, groups),
        _patterns(summary),
        _acceptance(a.read(Stream.VALIDATIONS, ValidationResult)),
        _lags(reports, groups),
        _queues(run_dir),
        _leafe(reports, groups),
    ]
    config = {"responsive": True, "displayModeBar": False}  # it hid the titles
    charts = "\n".join(
        '<section class="chart">'
        + f.to_html(full_html=False, include_plotlyjs=False, config=config)
        + "</section>"
        for f in figures
    )
    return _PAGE.format(
        title=html.escape(f"SENTINEL run {run_dir}"),
        plotly=get_plotlyjs(),
        summary=_summary(summary),
        charts=charts,
    )


def _figure(title: str, x: str, y: str) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(
        title=title, xaxis_title=x, yaxis_title=y, height=380, template="plotly_white",
        margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"orientation": "h", "y": -0.2},
    )  # fmt: skip
    return figure


def _empty(figure: go.Figure, why: str) -> go.Figure:
    figure.add_annotation(text=why, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return figure


def _pass_k(evals: list[EvalReport], groups: list[RolloutGroup]) -> go.Figure:
    """pass^k per version; the interval is the mean over tasks +- 1.96 standard errors (from
    the held-out groups' trials when recorded, else the report's point alone)."""
    figure = _figure(
        "Held-out pass^k per policy version (95% CI over tasks)", "policy version", "pass^k"
    )
    per_task = _eval_successes(groups)
    for k in sorted({k for e in evals for k in e.pass_hat_k}):
        versions = sorted(e.policy_version or 0 for e in evals if k in e.pass_hat_k)
        point = {e.policy_version or 0: e.pass_hat_k[k] for e in evals if k in e.pass_hat_k}
        errors = [_half_width(per_task.get(v, []), k) for v in versions]
        figure.add_scatter(
            x=versions, y=[point[v] for v in versions], name=f"pass^{k}", mode="lines+markers",
            error_y={"type": "data", "array": errors, "visible": True},
        )  # fmt: skip
    return figure if evals else _empty(figure, "no held-out evaluation recorded")


def _eval_successes(groups: list[RolloutGroup]) -> dict[int, list[tuple[int, int]]]:
    """Per version, each held-out task's (trials, successes)."""
    found: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for group in groups:
        if group.purpose == "eval" and group.trajectories:
            results = final_results(group_results(group))
            wins = sum(succeeded(r.reward) for r in results)
            found[group.policy_version].append((len(results), wins))
    return found


def _half_width(tasks: list[tuple[int, int]], k: int) -> float:
    values = [pass_hat_k(n, c, k) for n, c in tasks if n >= k]
    if len(values) < 2:
        return 0.0
    return float(Z95 * statistics.stdev(values) / len(values) ** 0.5)


def _rewards(reports: list[TrainStepReport], groups: list[RolloutGroup]) -> go.Figure:
    figure = _figure("Reward per train step", "train step", "reward")
    steps = [r for r in reports if r.mode == "grpo" and r.trained_groups]
    by_id = {g.id: g for g in groups}
    task = [
        _mean(r for g in s.trained_groups if g in by_id for r in by_id[g].rewards) for s in steps
    ]
    figure.add_scatter(
        x=[s.step for s in steps], y=task, name="mean task reward", mode="lines+markers"
    )
    shaped = [s.mean_reward for s in steps]
    figure.add_scatter(
        x=[s.step for s in steps], y=shaped, name="mean shaped reward", mode="lines+markers"
    )
    return figure if steps else _empty(figure, "no GRPO step trained")


def _mean(values: object) -> float | None:
    numbers = list(values)  # type: ignore[call-overload]
    return sum(numbers) / len(numbers) if numbers else None


def _patterns(summary: RunReport) -> go.Figure:
    figure = _figure("Pattern shares of each version's failures", "policy version", "share")
    for trend in summary.patterns[:10]:
        versions = sorted(trend.share)
        figure.add_scatter(
            x=versions, y=[trend.share[v] for v in versions], mode="lines+markers",
            name=f"{trend.title[:40]} (trained {trend.trained_groups})",
        )  # fmt: skip
    figure.update_yaxes(tickformat=".0%")
    return figure if summary.patterns else _empty(figure, "no error pattern recorded")


def _acceptance(verdicts: list[ValidationResult]) -> go.Figure:
    """Cumulative acceptance rate, and the rejection reasons as cumulative counts."""
    figure = _figure("Task acceptance and rejection reasons over time", "time", "verdicts")
    verdicts = sorted(verdicts, key=lambda v: v.created_at)
    times = [v.created_at for v in verdicts]
    reasons: Counter[str] = Counter()
    series: dict[str, list[int]] = defaultdict(list)
    codes = sorted({r.code.value for v in verdicts for r in v.reasons})
    for v in verdicts:
        reasons.update(r.code.value for r in v.reasons)
        reasons["accepted"] += v.accepted
        for name in ["accepted", *codes]:
            series[name].append(reasons[name])
    for name, counts in series.items():
        figure.add_scatter(x=times, y=counts, name=name, mode="lines", stackgroup="verdicts")
    rate = [series["accepted"][i] / (i + 1) for i in range(len(verdicts))]
    figure.add_scatter(x=times, y=rate, name="acceptance rate", yaxis="y2", line={"dash": "dot"})
    figure.update_layout(
        yaxis2={"overlaying": "y", "side": "right", "tickformat": ".0%", "range": [0, 1]}
    )
    return figure if verdicts else _empty(figure, "no validation verdict recorded")


def _lags(reports: list[TrainStepReport], groups: list[RolloutGroup]) -> go.Figure:
    """The trainer's idle wait before each batch, and how long the batch's groups waited
    between coming back and being trained (the rollout_groups queue's lag)."""
    figure = _figure("Trainer idle and queue lag per batch", "train step", "seconds")
    returned = {g.id: g.created_at for g in groups}
    batches = [r for r in reports if r.trained_groups or r.dropped_groups]
    lag = [
        _mean(
            (r.created_at - returned[g]).total_seconds()
            for g in [*r.trained_groups, *r.dropped_groups]
            if g in returned
        )
        for r in batches
    ]
    steps = [r.step for r in batches]
    figure.add_bar(x=steps, y=[r.wait_s for r in batches], name="trainer idle (s)")
    figure.add_scatter(x=steps, y=lag, name="group wait in queue (s)", mode="lines+markers")
    return figure if batches else _empty(figure, "no train report recorded")


def _queues(run_dir: Path, most: int = 8) -> go.Figure:
    """Each consumer group's lag (entries published, not yet read) over the run, from the
    queue monitor's recorded snapshots; the `most` groups that ever lagged furthest."""
    figure = _figure("Queue lag per stream and consumer group", "time (UTC)", "entries behind")
    series: dict[str, list[tuple[object, int]]] = defaultdict(list)
    for line in jsonl.lines(run_dir / QUEUES_FILE):
        try:
            snapshot = QueueSnapshot.model_validate_json(line)
        except ValidationError:  # a line torn by a crash
            continue
        for stream in snapshot.streams:
            for group in stream.groups:
                series[f"{stream.stream} / {group.group}"].append((snapshot.at, group.lag))
    lagging = sorted((n for n in series if any(lag for _, lag in series[n])),
                     key=lambda n: -max(lag for _, lag in series[n]))[:most]  # fmt: skip
    for name in lagging:
        at, lag = zip(*series[name], strict=True)
        figure.add_scatter(x=list(at), y=list(lag), name=name, mode="lines")
    if lagging:
        return figure
    why = "no queue ever lagged" if series else f"no {QUEUES_FILE} (recorded by `sentinel up`)"
    return _empty(figure, why)


def _leafe(reports: list[TrainStepReport], groups: list[RolloutGroup]) -> go.Figure:
    """LEAFE's recoveries and corrections, cumulative over the explored groups in time."""
    figure = _figure("LEAFE: failures explored, recovered, corrections", "explored groups", "count")
    explored = sorted((g for g in groups if g.exploration), key=lambda g: g.created_at)
    totals: Counter[str] = Counter()
    series: dict[str, list[int]] = defaultdict(list)
    for group in explored:
        e = group.exploration
        assert e is not None
        totals.update(failures=e.failures, recovered=e.recovered, corrections=len(e.corrections))
        for name in ("failures", "recovered", "corrections"):
            series[name].append(totals[name])
    x = list(range(1, len(explored) + 1))
    for name, counts in series.items():
        figure.add_scatter(x=x, y=counts, name=name, mode="lines+markers")
    sft = sum(r.examples for r in reports if r.mode == "sft")
    figure.update_layout(title=f"{figure.layout.title.text} (SFT examples trained: {sft})")
    return figure if explored else _empty(figure, "no LEAFE exploration in this run")


def _summary(s: RunReport) -> str:
    idle = f"{s.trainer_idle_fraction:.0%}" if s.trainer_idle_fraction is not None else "-"
    rows = [
        ("patterns", len(s.patterns)),
        ("tasks proposed / accepted", f"{s.proposals} / {s.accepted}"),
        ("rollouts (groups, dropped)", f"{s.rollouts} ({s.groups}, {s.dropped_groups})"),
        ("train steps (GRPO)", s.train_steps), ("policy versions", len(s.policy_versions)),
        ("trainer idle", idle),
    ]  # fmt: skip
    return "".join(
        f"<div><b>{html.escape(str(v))}</b><span>{html.escape(k)}</span></div>" for k, v in rows
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.3em; overflow-wrap: anywhere; }}
.summary {{ display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 12px; }}
.summary div {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px 10px; }}
.summary b {{ display: block; font-size: 1.2em; }}
.summary span {{ color: #666; font-size: 0.85em; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 12px; }}
.chart {{ background: #fff; border: 1px solid #ddd; border-radius: 6px; min-width: 0;
  overflow: hidden; }}
</style>
<script type="text/javascript">{plotly}</script>
</head><body>
<h1>{title}</h1>
<div class="summary">{summary}</div>
<div class="grid">
{charts}
</div>
<script>  // charts drawn before the grid settled take their cell's width
window.addEventListener("load", () =>
  document.querySelectorAll(".plotly-graph-div").forEach((d) => Plotly.Plots.resize(d)));
</script>
</body></html>
"""
