"""`sentinel report RUN --html FILE` over a hand-made record: a self-contained page with the
seven charts, rendered by headless Chromium (the charts are drawn, not a blank page)."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.orchestrator.monitor import QUEUES_FILE, GroupFigures, QueueSnapshot, StreamFigures
from sentinel.orchestrator.streams import Stream
from sentinel.schemas import EvalReport, Exploration, RolloutGroup, ValidationResult
from tests.factories import examples, group
from tests.test_report import record, report, write

PLOTLY_BLUE = (0x63, 0x6E, 0xFA)  # plotly's first trace colour: a drawn line, not the page


def eval_group(task_id: str, rewards: list[float], version: int) -> RolloutGroup:
    held_out = group(task_id, rewards, 50 + version, version=version)
    return held_out.model_copy(update={"id": f"eval-v{version}-{task_id}", "purpose": "eval"})


def richer_record(run_dir: Path) -> None:
    """test_report's record, plus held-out trials, more verdicts and a LEAFE group."""
    record(run_dir)
    for version, rewards in ((0, [1.0, 0.0, 0.0]), (1, [1.0, 1.0, 0.0])):
        held_out = [eval_group(f"test-{i}", rewards[i:] + rewards[:i], version) for i in range(3)]
        write(run_dir, Stream.ROLLOUT_GROUPS, *held_out)
    explored = group("retail-0", [0.0, 1.0], 5).model_copy(
        update={"exploration": Exploration(failures=1, reflected=1, branches=2, recovered=1)}
    )
    write(run_dir, Stream.ROLLOUT_GROUPS, explored)
    write(run_dir, Stream.TRAIN_REPORTS, report(2, ["g-retail-0-5"]))
    write(
        run_dir, Stream.VALIDATIONS,
        *(ValidationResult(proposal_id=f"q{i}", task_id=f"t{i}", accepted=i % 2 == 0)
          for i in range(6)),
    )  # fmt: skip
    template = next(m for m in examples() if isinstance(m, EvalReport))
    write(run_dir, Stream.EVALUATIONS, template.model_copy(update={"policy_version": 2}))
    with (run_dir / QUEUES_FILE).open("w") as file:  # as `up`'s monitor records them
        for second, lag in enumerate([0, 3, 1]):
            file.write(snapshot(second, lag).model_dump_json() + "\n")
        file.write('{"at": "2026-01-01T00:00:0')  # torn by a crash: skipped


def snapshot(second: int, lag: int) -> QueueSnapshot:
    groups = [GroupFigures(group=g, consumers=1, pending=0, lag=n, oldest_pending_age_s=None,
                           totals={}) for g, n in (("trainer", lag), ("recorder", 0))]  # fmt: skip
    stream = StreamFigures(stream="rollout_groups", length=lag, published=9, dead_letters=0,
                           dead_letters_dropped=0, groups=groups)  # fmt: skip
    return QueueSnapshot(at=datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC), streams=[stream])


def render(tmp_path: Path) -> tuple[Path, str]:
    run_dir, page = tmp_path / "run", tmp_path / "report.html"
    richer_record(run_dir)
    result = CliRunner().invoke(app, ["report", str(run_dir), "--html", str(page)])
    assert result.exit_code == 0, result.output
    return page, page.read_text()


def test_the_page_is_self_contained_with_seven_charts(tmp_path: Path) -> None:
    _, text = render(tmp_path)
    assert text.count('class="plotly-graph-div"') == 7
    shell = text.replace(get_plotlyjs(), "")  # the page around the inlined plotly.js
    assert "src=" not in shell  # nothing fetched
    assert "<link" not in shell
    for title in ("pass^k", "Reward per train step", "Pattern shares", "acceptance",
                  "Trainer idle", "Queue lag", "LEAFE"):  # fmt: skip
        assert title in text
    assert "rollout_groups \\u002f trainer" in text  # the group that lagged (JSON-escaped)
    assert "rollout_groups \\u002f recorder" not in text  # never behind: left out
    assert "no LEAFE exploration" not in text
    assert "no held-out evaluation" not in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_headless_chromium_draws_the_charts_at_laptop_width(tmp_path: Path) -> None:
    page, _ = render(tmp_path)
    shot = Path(os.environ.get("SENTINEL_SHOT", tmp_path / "shot.png"))  # to look at it
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1366,900",
         page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1366, 900)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200, f"a near-blank page: {len(colours)} colours"
    blue = sum(n for n, rgb in colours if _near(rgb, PLOTLY_BLUE))
    assert blue > 200, "no chart line drawn"


def _near(rgb: tuple[int, int, int], target: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 12 for a, b in zip(rgb, target, strict=True))
