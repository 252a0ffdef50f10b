"""``medeyes rollout`` and ``medeyes inspect`` through Typer's CliRunner, and the HTML report in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.cli.rollout import AGENTS, AgentSpec, register_agent
from medeyes.trajectories import TrajectoryStore

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_the_options():
    result = invoke("rollout", "--help")
    assert result.exit_code == 0
    for option in ("--agent", "--data", "--n", "--out", "--seed", "--summary-json", "--oracle", "--mode"):
        assert option in result.output
    result = invoke("inspect", "--help")
    assert result.exit_code == 0 and "--html" in result.output


def test_rollout_runs_with_no_arguments():
    result = invoke("rollout", "--n", "1", "--samples", "1", "--quiet")  # the defaults, made small
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "mean best IoU vs gold" in result.output
    assert "trajectories / second" in result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "expert"
    summary = out.parent / "summary.json"
    result = invoke(
        "rollout",
        "--n",
        "3",
        "--samples",
        "2",
        "--out",
        str(out),
        "--seed",
        "7",
        "--keep-all",
        "--quiet",
        "--summary-json",
        str(summary),
    )
    assert result.exit_code == 0, result.output
    return out


def test_rollout_stores_trajectories_and_a_machine_summary(run_dir):
    data = json.loads((run_dir.parent / "summary.json").read_text())
    assert {"episodes", "accuracy", "mean_best_iou", "mean_steps"} <= set(data)
    assert data["episodes"] == 6
    assert set(data["accuracy_by_type"]) <= {"closed", "choice", "open"}
    records = list(TrajectoryStore(run_dir, read_only=True).records())
    assert len(records) == 6
    assert all(r.producer.name == "expert" and r.producer.oracle == "annotation" for r in records)
    assert (run_dir / "images").is_dir() and any((run_dir / "images").iterdir())


def test_rollout_resumes_without_duplicates(run_dir):
    result = invoke(
        "rollout", "--n", "4", "--samples", "2", "--out", str(run_dir), "--seed", "7", "--keep-all", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert "skipped 6 already there" in " ".join(result.output.split())
    ids = [r.trajectory_id for r in TrajectoryStore(run_dir, read_only=True).records()]
    assert len(ids) == len(set(ids)) == 8


def test_resume_with_another_agent_is_refused(run_dir):
    result = runner.invoke(app, ["rollout", "--agent", "random", "--n", "1", "--out", str(run_dir), "--quiet"])
    assert result.exit_code == 2
    assert "holds trajectories of another producer" in " ".join(result.output.split())


def test_unknown_agent_gets_a_suggestion():
    result = runner.invoke(app, ["rollout", "--agent", "expret", "--n", "1"])
    assert result.exit_code == 2
    assert "unknown agent 'expret'. Did you mean 'expert'?" in " ".join(result.output.split())


def test_bad_agent_option_is_reported():
    result = runner.invoke(app, ["rollout", "--n", "1", "--agent-opt", "nonsense=1"])
    assert result.exit_code == 2
    assert "unknown --agent-opt for the expert: nonsense" in " ".join(result.output.split())


def test_agent_options_reach_the_expert_and_its_oracle(tmp_path):
    summary = tmp_path / "s.json"
    result = invoke(
        "rollout",
        "--n",
        "2",
        "--samples",
        "1",
        "--quiet",
        "--summary-json",
        str(summary),
        "--agent-opt",
        "t_max=1",
        "--agent-opt",
        "oracle.distractors=0",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["mean_steps"] <= 1.0


def test_the_registry_is_extensible():
    from medeyes.agents.random_agent import RandomAgent

    def factory(spec: AgentSpec):
        agent = RandomAgent()
        agent.name = "dummy"
        return agent

    register_agent("dummy", factory)
    try:
        result = invoke("rollout", "--agent", "dummy", "--n", "1", "--quiet")
        assert result.exit_code == 0, result.output
    finally:
        AGENTS.pop("dummy")


def test_inspect_prints_and_writes_a_self_contained_report(run_dir, tmp_path):
    result = invoke("inspect", str(run_dir))
    assert result.exit_code == 0 and "8 trajectories" in result.output
    first = next(TrajectoryStore(run_dir, read_only=True).records())
    result = invoke("inspect", str(run_dir), "--id", first.trajectory_id)
    assert result.exit_code == 0 and "reasoning" in result.output and "feedback" in result.output
    report = tmp_path / "report.html"
    result = invoke("inspect", str(run_dir), "--html", str(report), "--outcome", "all")
    assert result.exit_code == 0, result.output
    html = report.read_text()
    assert html.count('<section class="traj') == 8
    assert "data:image/jpeg;base64," in html and "http://" not in html and "https://" not in html
    assert 'data-outcome="correct"' in html and 'id="family"' in html
    result = invoke("inspect", str(run_dir / "trajectories.jsonl"), "--outcome", "incorrect")
    assert result.exit_code == 0


def test_inspect_refuses_what_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "holds no trajectories.jsonl" in " ".join(result.output.split())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium package")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    report = tmp_path / "report.html"
    assert invoke("inspect", str(run_dir), "--html", str(report), "--limit", "2").exit_code == 0
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                _chromium(),
                *flags,
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                report.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    total = int(dom.split('data-images-total="')[1].split('"')[0])
    loaded = int(dom.split('data-images-loaded="')[1].split('"')[0])
    assert total > 0 and loaded == total, "every inline image decodes in the browser"
    shot = tmp_path / "shot.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
    subprocess.run(
        ["bash", str(script), str(report), str(shot), "1280,1400"], check=True, timeout=120, capture_output=True
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1400, 1280)
    assert pixels.std() > 20, "the screenshot shows content, not a blank page"


def test_iou_is_also_reported_per_question_family(tmp_path):
    """A modality question needs no look, so its IoU 0 must not hide how well presence questions drill."""
    summary = tmp_path / "s.json"
    result = invoke(
        "rollout", "--data", "phantom:look", "--n", "12", "--samples", "1", "--quiet", "--summary-json", str(summary)
    )
    assert result.exit_code == 0, result.output
    data = json.loads(summary.read_text())
    counts, ious = data["iou_episodes_by_family"], data["mean_best_iou_by_family"]
    assert sum(counts.values()) == data["iou_episodes"] > 0
    pooled = sum(ious[f] * counts[f] for f in counts) / data["iou_episodes"]
    assert pooled == pytest.approx(data["mean_best_iou"])
    assert ious["presence"] > 0.2  # the expert drills the candidate it asks about
    assert "IoU / family presence" in result.output
