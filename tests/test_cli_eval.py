"""`medeyes eval`: real agents on real sources, the table, --json, answer-only mode, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_stand_in import StartServer, completion
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.evaluation.scores import bootstrap_ci, score_records
from medeyes.trajectories import read_records
from medeyes_env.cases import Case
from medeyes_env.rewards import accuracy_reward, token_recall
from medeyes_env.sources import open_source


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.output


def test_expert_with_and_without_tools_in_one_command(tmp_path: Path) -> None:
    code, output = run("--limit", "12", "--tools", "both", "--quiet", "--json", str(tmp_path / "eval.json"))
    assert code == 0, output
    assert "phantom tools" in output and "phantom no tools" in output and "% (95% CI)" in output
    figures = json.loads((tmp_path / "eval.json").read_text())
    looking, blind = figures["datasets"]
    assert (looking["tools"], blind["tools"]) == (True, False)
    for entry in (looking, blind):
        assert entry["n"] == 12
        assert set(entry) >= {"n", "accuracy", "accuracy_by_type", "ci95", "mean_best_iou"}
        low, high = entry["ci95"]
        assert 0.0 <= low <= entry["accuracy"] <= high <= 1.0
        assert sum(t["n"] for t in entry["by_type"]) == 12
    assert looking["mean_tool_steps"] > 1.0 and looking["mean_best_iou"] > 0.2 and looking["hit_rate"] > 0.0
    assert blind["mean_tool_steps"] == 0.0 and blind["mean_best_iou"] is None
    assert looking["accuracy"] > blind["accuracy"]  # the expert answers from what it looked at


def test_figures_are_the_reward_functions_on_the_stored_answers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = run(
        "--agent", "random", "--limit", "16", "--out", str(out), "--quiet", "--json", str(tmp_path / "j")
    )
    assert code == 0, output
    records = read_records(_one_store(out))
    assert len(records) == 16
    source = open_source("phantom")
    index = {source.case("test", i).id: source.case("test", i) for i in range(16)}
    expected = [accuracy_reward(r.final_answer, index[r.case_id]) for r in records]
    figures = json.loads((tmp_path / "j").read_text())["datasets"][0]
    assert figures["accuracy"] == pytest.approx(sum(expected) / 16)
    opened = [r for r in records if r.answer_type == "open"]
    recall = [t for t in figures["by_type"] if t["answer_type"] == "open"]
    if opened:
        mean = sum(token_recall(r.final_answer, r.gold_answer) for r in opened) / len(opened)
        assert recall[0]["recall"]["value"] == pytest.approx(mean)


def test_a_rerun_resumes_from_the_store_and_scores_each_case_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _ = run("--limit", "6", "--out", str(out), "--quiet")
    assert code == 0
    code, output = run("--limit", "10", "--out", str(out), "--quiet", "--json", str(tmp_path / "j"))
    assert code == 0, output
    assert "4 episodes played" in output and "6 read back from the store" in output
    ids = [r.trajectory_id for r in read_records(_one_store(out))]
    assert len(ids) == len(set(ids)) == 10
    assert json.loads((tmp_path / "j").read_text())["datasets"][0]["n"] == 10


def test_tiny_policy_with_the_transformers_backend(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code, output = run(
        "--agent", "policy", "--limit", "3", "--max-new-tokens", "8", "--parallel", "3", "--quiet",
        "--json", str(tmp_path / "j"),
    )  # fmt: skip
    assert code == 0, output
    figures = json.loads((tmp_path / "j").read_text())
    assert figures["agent"] == "policy (tiny)"
    assert figures["datasets"][0]["n"] == 3


def test_policy_from_a_training_run_uses_its_environment(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from medeyes.training.config import preset

    run_dir = tmp_path / "train-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(preset("tiny").to_yaml())
    out = tmp_path / "eval"
    code, output = run(
        "--agent", "policy", "--train-config", str(run_dir), "--limit", "2", "--max-new-tokens", "8",
        "--out", str(out), "--quiet",
    )  # fmt: skip
    assert code == 0, output
    records = read_records(_one_store(out))
    assert all(r.system_prompt.startswith("Examine the 256 x 256 image") for r in records)  # the run's env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "slake:/nonexistent/slake"], "/nonexistent/slake"),
        (["--data", "phantm"], "Did you mean 'phantom'?"),
        (["--tools", "maybe"], "--tools must be on, off or both, got 'maybe'"),
        (["--agent", "expret"], "Did you mean 'expert'?"),
        (["--agent", "policy", "--train-config", "/nonexistent/run"], "no training config at /nonexistent/run"),
    ],
)
def test_bad_input_names_the_culprit(args: list[str], message: str) -> None:
    code, output = run(*args, "--limit", "2", "--quiet")
    assert code == 2
    assert message in " ".join(output.split())


def test_scores_of_no_grounding_and_an_interval_that_covers_the_mean() -> None:
    case = Case(id="x/1", question="Abnormal?", answer="yes", answer_type="closed", source="x")
    assert accuracy_reward("yes", case) == 1.0
    low, high = bootstrap_ci([1.0, 0.0, 1.0, 1.0])
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert score_records([], "x").n == 0


def test_help_lists_the_options() -> None:
    code, output = run("--help")
    assert code == 0
    for option in ("--agent", "--data", "--tools", "--limit", "--parallel", "--json", "--train-config", "--out"):
        assert option in output


@pytest.mark.slow
def test_kill_9_halfway_then_resume_scores_every_case_once(tmp_path: Path) -> None:
    """A run killed with SIGKILL mid-way resumes: no case lost or scored twice, same figures as one run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out: Path, json_path: Path) -> list[str]:
        return [sys.executable, "-m", "medeyes.cli.app", "eval", "--limit", "300", "--parallel", "1",
                "--out", str(out), "--json", str(json_path), "--quiet"]  # fmt: skip

    out, records = tmp_path / "killed", tmp_path / "killed" / "tools_on" / "phantom" / "trajectories.jsonl"
    process = subprocess.Popen(command(out, tmp_path / "unused.json"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not records.exists() or records.read_bytes().count(b"\n") < 100):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stored_before = records.read_bytes().count(b"\n")
    assert 100 <= stored_before < 300, "the run was not killed half-way"
    subprocess.run(command(out, tmp_path / "resumed.json"), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(command(tmp_path / "whole", tmp_path / "whole.json"), check=True, stdout=subprocess.DEVNULL)
    ids = [r.trajectory_id for r in read_records(_one_store(out))]
    assert len(ids) == len(set(ids)) == 300
    resumed, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "whole"))
    assert resumed["episodes_resumed"] >= stored_before
    assert resumed["datasets"] == whole["datasets"]


def test_parallel_requests_against_an_openai_compatible_server(tmp_path: Path, openai_server: StartServer) -> None:
    """--parallel N keeps N requests in flight against a server (a local stand-in answering yes after 50 ms)."""
    server = openai_server(lambda request: (200, completion("<answer>yes</answer>")), delay_s=0.05)
    code, output = run(
        "--agent", "policy", "--backend", "openai", "--base-url", server.base_url, "--model", "served",
        "--limit", "12", "--parallel", "4", "--quiet", "--json", str(tmp_path / "j"),
    )  # fmt: skip
    assert code == 0, output
    assert len(server.chat_payloads()) == 12 and server.max_in_flight == 4
    figures = json.loads((tmp_path / "j").read_text())["datasets"][0]
    closed = next(t for t in figures["by_type"] if t["answer_type"] == "closed")
    assert figures["errors"] == 0 and 0.0 < closed["accuracy"]["value"] < 1.0  # "yes" is right on some only


def _one_store(out: Path, tools: str = "tools_on") -> Path:
    """The store of the only dataset evaluated into ``out`` (one folder per dataset and tools setting)."""
    (store,) = [path.parent for path in (out / tools).glob("*/trajectories.jsonl")]
    return store


def test_two_presets_in_one_store_are_scored_apart(tmp_path: Path) -> None:
    """phantom:easy and phantom:hard share case ids; the hard row used to be a copy of the easy one."""
    out = tmp_path / "store"
    code, output = run(
        "--data", "phantom:easy", "--data", "phantom:hard", "--limit", "6", "--out", str(out), "--quiet",
        "--json", str(tmp_path / "both.json"),
    )  # fmt: skip
    assert code == 0, output
    code, output = run("--data", "phantom:hard", "--limit", "6", "--quiet", "--json", str(tmp_path / "hard.json"))
    assert code == 0, output
    easy, hard_in_store = json.loads((tmp_path / "both.json").read_text())["datasets"]
    (hard,) = json.loads((tmp_path / "hard.json").read_text())["datasets"]
    assert hard_in_store["mean_best_iou"] == hard["mean_best_iou"] != easy["mean_best_iou"]  # before: 0.618 twice
    assert {k: v for k, v in hard_in_store.items() if k != "dataset"} == {
        k: v for k, v in hard.items() if k != "dataset"
    }
    code, output = run(
        "--data", "phantom:easy", "--data", "phantom:hard", "--limit", "6", "--out", str(out), "--quiet",
        "--json", str(tmp_path / "again.json"),
    )  # fmt: skip
    assert code == 0 and "12 read back from the store" in output, output
    assert json.loads((tmp_path / "again.json").read_text())["datasets"] == [easy, hard_in_store]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--max-steps", "1"], "env.max_steps: stored 4, this run 1"),
        (["--agent-opt", "oracle.box_noise=0.5"], "another producer"),
    ],
    ids=["max-steps", "agent"],
)
def test_a_rerun_with_other_settings_is_refused_naming_the_field(tmp_path: Path, args: list[str], field: str) -> None:
    out = tmp_path / "run"
    code, output = run("--limit", "3", "--out", str(out), "--quiet")
    assert code == 0, output
    code, output = run("--limit", "3", "--out", str(out), "--quiet", *args)
    assert code == 2, output  # before: nothing played, 3.33 tool steps reported with --max-steps 1
    assert field in " ".join(output.split()) and "new output directory" in " ".join(output.split())


def test_a_dataset_whose_files_changed_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "data").mkdir()
    Image.new("L", (64, 64), 90).save(tmp_path / "data" / "a.png")
    rows = [{"id": f"c{i}", "image": "a.png", "question": "Is there a nodule?", "answer": "yes",
             "answer_type": "closed", "regions": [{"box": [8, 8, 30, 30]}]} for i in range(4)]  # fmt: skip
    cases = tmp_path / "data" / "cases.jsonl"
    cases.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    code, output = run("--data", f"jsonl:{cases}", "--out", str(out), "--quiet")
    assert code == 0, output
    cases.write_text(cases.read_text().replace('"answer": "yes"', '"answer": "no"', 1))
    code, output = run("--data", f"jsonl:{cases}", "--out", str(out), "--quiet")
    assert code == 2, output
    assert "data_digest: stored" in " ".join(output.split())


def test_an_interrupted_eval_resumes_to_the_figures_of_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = ("--agent", "random", "--limit", "10", "--tools", "both", "--quiet")
    code, output = run(*whole, "--json", str(tmp_path / "whole.json"))
    assert code == 0, output
    out = tmp_path / "run"
    code, output = run(*whole, "--out", str(out))
    assert code == 0, output
    for tools in ("tools_on", "tools_off"):  # an interrupt: the last 4 episodes of each were never stored
        records = _one_store(out, tools) / "trajectories.jsonl"
        records.write_text("".join(records.read_text().splitlines(keepends=True)[:6]))
    code, output = run(*whole, "--out", str(out), "--json", str(tmp_path / "resumed.json"))
    assert code == 0, output
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert (resumed["episodes_run"], resumed["episodes_resumed"]) == (8, 12)
    assert resumed["datasets"] == json.loads((tmp_path / "whole.json").read_text())["datasets"]
