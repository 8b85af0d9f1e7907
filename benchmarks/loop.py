"""The loop on CPU: informative rollout groups, failure-driven against `fixed`, same budget.

Runs `sentinel up` twice with the same settings file and rollout budget (`--groups`): once in
`fixed` mode (RL on seed train tasks only) and once failure-driven (targeted tasks from the
Controller's patterns mixed in). A group is informative when its rewards differ (with the
run's partial credit), so GRPO learns from it; the rest are filtered out. Also reported, for
the failure-driven run: rollout groups per hour of wall time, the trainer's busy fraction (1 -
its idle fraction) and vLLM's (the share of its own 10-second stats lines with a request
running, over the run's wall time). `--baseline` runs failure-driven a third time with the
settings of before issue 22 (torch's own trainer threads, unbounded Proposer drafts), so that
before and after come from one run on one machine. The last line printed is one JSON object
of figures.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel import jsonl
from sentinel.config import load_settings
from sentinel.report import RunReport, build_report
from sentinel.schemas import RolloutGroup

ROOT = Path(__file__).resolve().parents[1]
STATS_S = 10  # vLLM's stats interval (VLLM_LOG_STATS_INTERVAL)
RUNNING = re.compile(r"Running: (\d+) reqs")
# the settings before issue 22's changes, for --baseline (sections updated, not replaced)
BASELINE = {
    "trainer": {"cpu_threads": None},
    "proposer": {"max_concurrency": None},
    "serve": {"cpu_cores": "all"},
    "rollout": {"user": "llm"},  # SmolLM2 as the user simulator, on the one server
}


def run(
    config: Path,
    mode: str,
    groups: int,
    workdir: Path,
    name: str = "",
    **sections: Mapping[str, object],
) -> tuple[Path, float]:
    """One bounded `sentinel up` in `mode`; its run directory and wall seconds."""
    settings = yaml.safe_load(config.read_text()) or {}
    # pass^k is not what this measures: one held-out rollout before and after is enough
    # (unless `sections` says otherwise)
    settings.setdefault("loop", {}).update({"eval_tasks": 1, "eval_trials": 1})
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    name = name or mode
    run_dir = workdir / name
    settings["run_dir"] = str(run_dir)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    argv = [sys.executable, "-m", "sentinel", "--config", str(path), "--log-format", "json",
            "up", "--mode", mode, "--groups", str(groups)]  # fmt: skip
    started = time.monotonic()
    with (workdir / f"{name}.log").open("w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall_s = time.monotonic() - started
    print(f"{name}: exit {code} after {wall_s:.0f} s", file=sys.stderr)
    if code != 0:
        raise SystemExit(f"{name} run failed; see {workdir / f'{name}.log'}")
    return run_dir, wall_s


def vllm_busy_fraction(run_dir: Path, wall_s: float) -> float | None:
    """Seconds of vLLM's stats lines with a request running, over the run's wall time (an
    idle server stops logging, so the lines are counted, not their share)."""
    log = run_dir / "vllm" / "server.log"
    if not log.exists():  # an external server (`llm.policy.base_url`): not ours to read
        return None
    running = [int(m.group(1)) for m in RUNNING.finditer(log.read_text(errors="replace"))]
    return round(min(sum(r > 0 for r in running) * STATS_S / wall_s, 1.0), 3)


def throughput(report: RunReport, run_dir: Path, wall_s: float) -> dict[str, float | None]:
    idle = report.trainer_idle_fraction
    return {
        "groups_per_hour": round(report.groups / (wall_s / 3600), 2),
        "trainer_busy_fraction": None if idle is None else round(1 - idle, 3),
        "vllm_busy_fraction": vllm_busy_fraction(run_dir, wall_s),
        "wall_s": round(wall_s),
    }


def informative_fraction(run_dir: Path, partial_credit: float) -> float:
    path = run_dir / "artifacts" / "rollout_groups.jsonl"
    groups = [RolloutGroup.model_validate_json(x) for x in jsonl.lines(path)]
    kept = [g for g in groups if not g.dropped and g.purpose == "train"]  # not held-out trials
    return sum(g.informative(partial_credit) for g in kept) / max(len(kept), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--groups", type=int, default=8, help="rollout budget per mode")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--baseline", action="store_true", help="also run failure-driven on the settings before"
        " issue 22 (torch's trainer threads, unbounded drafts, vLLM on every core): before and"
        " after in one run",
    )  # fmt: skip
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sentinel-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    partial_credit = load_settings(args.config).trainer.partial_credit
    fixed, _ = run(args.config, "fixed", args.groups, workdir)
    targeted, wall_s = run(args.config, "failure_driven", args.groups, workdir)
    report = build_report(targeted)
    figures: dict[str, object] = {
        **throughput(report, targeted, wall_s),
        "informative_fraction": round(informative_fraction(targeted, partial_credit), 3),
        "fixed_informative_fraction": round(informative_fraction(fixed, partial_credit), 3),
        "trainer_idle_fraction": report.trainer_idle_fraction,
        "rollouts": report.rollouts,
        "fixed_rollouts": build_report(fixed).rollouts,
        "accepted_tasks": report.accepted,
        "train_steps": report.train_steps,
        "workdir": str(workdir),
    }
    if args.baseline:
        before, before_s = run(
            args.config, "failure_driven", args.groups, workdir, "baseline", **BASELINE
        )
        figures["baseline"] = throughput(build_report(before), before, before_s)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
