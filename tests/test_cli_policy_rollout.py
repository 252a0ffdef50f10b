"""`medeyes rollout --agent policy`: a real tiny VLM plays the env and its tokens land in the trajectory store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.trajectories import read_records

pytest.importorskip("torch")


def test_policy_rollout_with_the_transformers_backend_records_tokens_and_logprobs(tmp_path, tiny_cache):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "rollout",
            "--agent",
            "policy",
            "--n",
            "2",
            "--samples",
            "1",
            "--max-new-tokens",
            "12",
            "--max-steps",
            "1",
            "--out",
            str(out),
            "--summary-json",
            str(out / "summary.json"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 2
    records = list(read_records(out))
    assert len(records) == 2
    steps = [step for record in records for step in record.steps]
    assert steps, "the policy produced no turns"
    for step in steps:
        assert step.token_ids and step.logprobs and len(step.token_ids) == len(step.logprobs)
        assert all(lp <= 0.0 for lp in step.logprobs)
        assert len(step.token_ids) <= 12


def test_policy_rollout_names_an_unknown_backend(tmp_path):
    result = CliRunner().invoke(app, ["rollout", "--agent", "policy", "--backend", "vlm", "--n", "1"])
    assert result.exit_code == 2
    assert "unknown backend 'vlm'; did you mean 'vllm'?" in result.output


def test_rollout_plays_the_setting_a_training_config_names(tmp_path, tiny_cache):
    """--train-config: the data options and env of training (brief prompt, 256 px phantoms), not the defaults."""
    from medeyes.training.config import preset

    run_dir = tmp_path / "train-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(preset("tiny").to_yaml())
    out = tmp_path / "run"
    args = ["rollout", "--agent", "policy", "--train-config", str(run_dir), "--n", "3", "--samples", "1"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "8", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert len(records) == 3
    for record in records:
        assert record.image_size == (256, 256)  # the tiny preset's data_options
        assert record.family in ("presence", "modality")
        assert record.system_prompt.startswith("Examine the 256 x 256 image")  # instructions=brief
        assert "At most 4 turns" in record.system_prompt  # its env.max_steps=3, not the CLI default of 4


def test_rollout_refuses_a_missing_training_config(tmp_path):
    result = CliRunner().invoke(app, ["rollout", "--agent", "random", "--train-config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output
