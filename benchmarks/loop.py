"""The loop on CPU: informative rollout groups, failure-driven against `fixed`, same budget.

Runs `sentinel up` twice with the same settings file and rollout budget (`--groups`): once in
`fixed` mode (RL on seed train tasks only) and once failure-driven (targeted tasks from the
Controller's patterns mixed in). A group is informative when its rewards differ (with the
run's partial credit), so GRPO learns from it; the rest are filtered out. Also reported: the
trainer's idle fraction (time waiting for groups over its wall time) in the failure-driven run.
The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel import jsonl
from sentinel.config import load_settings
from sentinel.report import build_report
from sentinel.schemas import RolloutGroup

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, mode: str, groups: int, workdir: Path) -> Path:
    """One bounded `sentinel up` in `mode`; returns its run directory."""
    settings = yaml.safe_load(config.read_text()) or {}
    run_dir = workdir / mode
    settings["run_dir"] = str(run_dir)
    # pass^k is not what this measures: one held-out rollout before and after is enough
    settings.setdefault("loop", {}).update({"eval_tasks": 1, "eval_trials": 1})
    path = workdir / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(settings))
    argv = [sys.executable, "-m", "sentinel", "--config", str(path), "--log-format", "json",
            "up", "--mode", mode, "--groups", str(groups)]  # fmt: skip
    started = time.monotonic()
    with (workdir / f"{mode}.log").open("w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    print(f"{mode}: exit {code} after {time.monotonic() - started:.0f} s", file=sys.stderr)
    if code != 0:
        raise SystemExit(f"{mode} run failed; see {workdir / f'{mode}.log'}")
    return run_dir


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
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sentinel-loop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    partial_credit = load_settings(args.config).trainer.partial_credit
    fixed = run(args.config, "fixed", args.groups, workdir)
    targeted = run(args.config, "failure_driven", args.groups, workdir)
    report = build_report(targeted)
    figures = {
        "informative_fraction": round(informative_fraction(targeted, partial_credit), 3),
        "fixed_informative_fraction": round(informative_fraction(fixed, partial_credit), 3),
        "trainer_idle_fraction": report.trainer_idle_fraction,
        "rollouts": report.rollouts,
        "fixed_rollouts": build_report(fixed).rollouts,
        "accepted_tasks": report.accepted,
        "train_steps": report.train_steps,
        "workdir": str(workdir),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
