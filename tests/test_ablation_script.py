"""experiments/ablation.py: held-out cases from a chosen range, resume after an interruption, and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from medeyes.evaluation.blind import blind_accuracy
from medeyes.training.config import build_config, preset
from medeyes.training.metrics import read_metrics
from medeyes.training.trainer import train
from medeyes_env.sources import open_cases

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "ablation.py"


def test_held_out_evaluation_reads_the_cases_from_eval_start(tiny_cache, tmp_path):
    data = preset("tiny").model_dump(mode="json")
    source = open_cases(data["data"], data["data_options"])
    train_cases = [source.case("train", i) for i in range(data["expert"]["cases"])]

    def blind(start: int) -> float:
        return blind_accuracy(train_cases, [source.case("test", i) for i in range(start, start + 4)])

    start = next(s for s in range(4, 400, 4) if blind(s) != blind(0))  # a range whose blind score tells it apart
    config = build_config(
        data, {"run_dir": str(tmp_path / "run"), "stages": ["sft"], "sft.steps": 1, "eval.start": start}
    )
    train(config)
    evals = [row for row in read_metrics(config.run_dir) if "eval/accuracy" in row]
    assert evals and all(row["eval/blind_accuracy"] == blind(start) for row in evals)


def _ablation(cache: Path, runs: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--preset", "tiny", "--seeds", "0", "--arms", "on_policy", "dual"]
    command += ["--grpo-steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--eval-cases", "4"]
    command += ["--ground-steps", "2", "--sft-steps", "2", "--runs", str(runs), *extra]
    env = {**os.environ, "MEDEYES_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _keys(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["warm"], r["seed"], r["arm"], r["step"]) for r in rows]


def test_an_interrupted_ablation_resumes_without_redoing_finished_arms_or_rows(tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    arm = {name: runs / "format" / "seed0" / name for name in ("on_policy", "dual")}
    # 2 ground + 2 SFT + 4 on_policy + 2 of dual's 4 steps: stops inside the second arm, as an interruption would
    first = _ablation(tiny_cache, runs, "--max-steps", "10")
    assert "held-out: test cases 20000..20003 (4)" in first.stdout
    assert "format/seed0/dual: stopped at step 2" in first.stdout
    evals = runs / "report" / "ablation_evals.jsonl"
    assert _keys(evals) == [("format", 0, "on_policy", s) for s in (0, 2, 4)] + [
        ("format", 0, "dual", 0),
        ("format", 0, "dual", 2),
    ]
    finished = (arm["on_policy"] / "metrics.jsonl").read_bytes()
    cpu_finished = (arm["on_policy"] / "ablation_cpu.json").read_text()
    started = (arm["dual"] / "metrics.jsonl").read_bytes()

    second = _ablation(tiny_cache, runs)
    assert (arm["on_policy"] / "metrics.jsonl").read_bytes() == finished  # the finished arm is not run again
    assert (arm["on_policy"] / "ablation_cpu.json").read_text() == cpu_finished
    assert (arm["dual"] / "metrics.jsonl").read_bytes().startswith(started)  # resumed at step 2, nothing redone
    assert json.loads((arm["dual"] / "ablation_cpu.json").read_text())["calls"] == 2
    keys = _keys(evals)
    assert len(keys) == len(set(keys)) == 6 and ("format", 0, "dual", 4) in keys
    assert "CPU-hours used:" in second.stdout

    # a results file that lost its last row (a crash while writing it): the report restores it, once
    evals.write_text("".join(line + "\n" for line in evals.read_text().splitlines()[:-1]))
    report = _ablation(tiny_cache, runs, "--report-only")
    assert _keys(evals) == keys
    table = (runs / "report" / "ablation_table.md").read_text()
    assert "| on_policy | 0 |" in table and "| dual | 0 |" in table
    assert "CPU-hours used:" in report.stdout
    for name in ("accuracy", "presence", "iou_presence", "tool_steps", "expert_adv_zero", "on_tool_share"):
        assert (runs / "report" / f"ablation_format_{name}.png").stat().st_size > 0
