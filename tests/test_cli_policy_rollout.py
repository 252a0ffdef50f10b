"""`medeyes rollout --agent policy`: a real tiny VLM plays the env and its tokens land in the trajectory store."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.trajectories import read_records

pytest.importorskip("torch")


def test_policy_rollout_with_the_transformers_backend_records_tokens_and_logprobs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEYES_CACHE", str(tmp_path / "cache"))
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
