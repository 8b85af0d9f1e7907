"""Does the loop make its agent better? A learning curve at equal rollout budget (issue 22).

For each mode and each of `--seeds` seeds, one bounded `sentinel up` (benchmarks/loop.py's
`run`) with `--groups` rollout groups, the held-out test split evaluated before and after
(`--trials` each, `sentinel.learning_curve`):
- `failure_driven`: SENTINEL, targeted tasks from the Controller's patterns mixed in;
- `fixed`: RL on the seed train tasks only;
- `synthetic`: tasks proposed for general tool patterns, tied to no failure.

No mode trains on a test task: the loop's held-out trials never reach the trainer, and the
validator rejects a proposal that copies one.

The defaults, and why:
- **tau2's mock domain.** On two cores a GRPO step on retail's 5k-token prompts takes minutes,
  so 9 runs of retail would not fit 2.5 hours; a mock step takes seconds. Its held-out split
  is small (a transfer and an update checked by an assertion), so the interval is wide.
- **SmolLM2-135M**, the model every CPU run serves. The Qwen2.5 GGUFs decode 4-10 times slower.
- **The scripted user** (fidelity 1.00 on every check in `sentinel usersim check`): SmolLM2
  as the user flipped roles in 120 of 128 failures, so it would measure the simulator.
- **No warm start** (`--warm-start sft` runs agent SFT first): from the base weights, GRPO
  with partial credit already moves SmolLM2 on mock. Greedy, the base model answers every
  request with the greeting; after 5 steps on the train tasks it makes the right update
  (`tests/training/test_trainer.py` holds this as a test).
- **Learning rate 1e-3**, the CI learning test's: at `configs/local.yaml`'s 1e-4, with one
  group of 4 per step, a first run here left the held-out figures where they were.
- **Temperature 1.0**: `configs/local.yaml`'s 1.5 spreads the base model's choices but, here,
  mostly into text that is not an action.

Prints a line per run as it ends; writes `learning.json` (every run's curve and per-pattern
failure share per version) and `learning.png` into `--workdir`. The last line printed is
`{"failure_driven": {...}, "fixed": {...}, "synthetic": {...}}`, each with
`heldout_pass1_before`, `heldout_pass1_after`, `heldout_shaped_before`, `heldout_shaped_after`,
`ci95_shaped_gain` (`[low, high]`), `groups` and `seeds`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop import run

from sentinel.learning_curve import ModeFigures, RunCurve, mode_figures, read_curve
from sentinel.report import build_report

ROOT = Path(__file__).resolve().parents[1]
MODES = ("failure_driven", "fixed", "synthetic")


def settings_for(args: argparse.Namespace, seed: int) -> dict[str, dict[str, object]]:
    """The sections each run overrides in `--config`: the same for every mode."""
    return {
        "env": {"kind": "tau2", "domain": args.domain},
        "loop": {"eval_tasks": None, "eval_trials": args.trials, "warm_start": args.warm_start},
        "rollout": {"temperature": args.temperature},
        "trainer": {"seed": seed, "learning_rate": args.learning_rate},
        "proposer": {"seed": seed},
    }


def one_run(args: argparse.Namespace, mode: str, seed: int) -> dict[str, object]:
    name = f"{mode}-s{seed}"
    run_dir, wall_s = run(
        args.config, mode, args.groups, args.workdir, name, **settings_for(args, seed)
    )
    curve = read_curve(run_dir)
    report = build_report(run_dir)
    print(
        f"{name}: shaped {curve.before.shaped:.3f} -> {curve.after.shaped:.3f} "
        f"(v{curve.before.version} -> v{curve.after.version}), pass^1 "
        f"{curve.before.pass1:.3f} -> {curve.after.pass1:.3f}, {wall_s:.0f} s",
        file=sys.stderr,
    )
    return {
        "mode": mode,
        "seed": seed,
        "wall_s": round(wall_s),
        "curve": curve.model_dump(),
        "train_steps": report.train_steps,
        "accepted_tasks": report.accepted,
        "tasks_by_origin": report.tasks_by_origin,
        # the per-pattern failure share over policy versions (failure_driven's steering input)
        "pattern_shares": {p.title: p.share for p in report.patterns},
    }


def user_fidelity(domain: str, workdir: Path) -> dict[str, object]:
    """The scripted user's fidelity on the domain's train tasks (`sentinel usersim check
    --scripted`): reported beside the curve, since a user out of role would be measured
    instead of the agent."""
    from sentinel.config import Settings
    from sentinel.envs.registry import load, named
    from sentinel.usersim.fidelity import check_fidelity

    settings = Settings.model_validate({"run_dir": workdir, "env": {"domain": domain}})
    tasks = load(named(domain)).tasks("train")
    report = anyio.run(check_fidelity, settings, tasks, None)
    return {"score": round(report.score, 3), "checks": {f.check: f.rate for f in report.checks}}


def plot(figures: dict[str, ModeFigures], runs: list[dict[str, object]], path: Path) -> None:
    """Held-out shaped reward before and after per mode (each seed a line, the mean a bar),
    beside the gain's 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(figures):
        f = figures[mode]
        left.bar([i - 0.2, i + 0.2], [f.heldout_shaped_before, f.heldout_shaped_after],
                 width=0.35, color=["#bbb", "#4a7"])  # fmt: skip
        for r in runs:
            if r["mode"] == mode:
                curve = RunCurve.model_validate(r["curve"])
                left.plot([i - 0.2, i + 0.2], [curve.before.shaped, curve.after.shaped],
                          color="#333", alpha=0.5, marker="o")  # fmt: skip
        gain = f.heldout_shaped_after - f.heldout_shaped_before
        low, high = f.ci95_shaped_gain
        right.errorbar([i], [gain], yerr=[[gain - low], [high - gain]], fmt="o", capsize=6)
    for axis in (left, right):
        axis.set_xticks(range(len(figures)), list(figures))
    left.set_title("held-out shaped reward: before (grey), after (green)")
    right.axhline(0, color="#999", linewidth=0.8)
    right.set_title("gain, with its 95% interval over seeds x tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--domain", default="mock")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=10, help="rollout budget per run")
    parser.add_argument("--trials", type=int, default=4, help="held-out trials per test task")
    parser.add_argument("--warm-start", choices=("none", "sft"), default="none")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sentinel-learning-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, runs = time.monotonic(), []
    fidelity = user_fidelity(args.domain, args.workdir)
    print(f"scripted user's fidelity on {args.domain}: {fidelity['score']}", file=sys.stderr)
    for seed in range(args.seeds):  # seeds outermost: a cut-short run still compares modes
        for mode in args.modes:
            runs.append(one_run(args, mode, seed))
    figures = {
        mode: mode_figures(
            [RunCurve.model_validate(r["curve"]) for r in runs if r["mode"] == mode],
            args.groups,
        )
        for mode in args.modes
    }
    record = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "wall_s": round(time.monotonic() - started),
        "user_fidelity": fidelity,
        "figures": {m: f.model_dump() for m, f in figures.items()},
        "runs": runs,
    }
    (args.workdir / "learning.json").write_text(json.dumps(record, indent=1))
    plot(figures, runs, args.workdir / "learning.png")
    print(f"wrote {args.workdir / 'learning.json'} and learning.png", file=sys.stderr)
    print(json.dumps({m: f.model_dump() for m, f in figures.items()}))


if __name__ == "__main__":
    main()
