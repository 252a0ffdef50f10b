"""The trainer on a tiny random VLM: loss logged, every parameter trained, exact resume, config and CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from medeyes.models import ensure_tiny_model, load_policy_model  # noqa: E402
from medeyes.training.config import TrainConfig, build_config, preset  # noqa: E402
from medeyes.training.metrics import read_metrics  # noqa: E402
from medeyes.training.trainer import learning_rate, train  # noqa: E402
from medeyes_env.errors import ConfigError  # noqa: E402

VOLATILE = ("seconds", "per_second", "elapsed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("medeyes-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDEYES_CACHE", str(root))
        ensure_tiny_model("idefics3", "tiny")
        yield root


def _config(run_dir, **overrides) -> TrainConfig:
    data = preset("tiny").model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    return build_config(data, overrides)


def _stable(rows):
    return [{k: v for k, v in row.items() if not any(w in k for w in VOLATILE)} for row in rows]


def test_tiny_run_logs_loss_and_trains_every_parameter(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEYES_CACHE", str(cache))
    cfg = _config(tmp_path / "run")
    before, _ = load_policy_model(cfg.model)
    result = train(cfg, resume=False)

    rows = read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == cfg.total_steps and all(math.isfinite(r["train/loss"]) for r in train_rows)
    assert [r["train/stage"] for r in train_rows] == [0.0, 0.0, 1.0, 1.0]
    grpo = train_rows[-1]
    for key in (
        "stream/on/reward_mean",
        "stream/on/adv_mean",
        "stream/on/parse_rate",
        "stream/on/turns",
        "stream/on/entropy",
        "stream/on/ratio_mean",
        "stream/on/clip_frac",
        "stream/off/reward_mean",
        "stream/off/rho_mean",
        "stream/on/scan_share",
        "stream/on/drill_share",
        "stream/on/response_tokens",
    ):
        assert key in grpo, key
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("eval/blind_accuracy" in r for r in evals)
    assert result.first_eval["step"] == 0 and result.last_eval["step"] == 4

    after = torch.load(cfg.run_dir / "checkpoints" / "step-0000004" / "model.pt", weights_only=True)
    unchanged = [n for n, p in before.named_parameters() if p.requires_grad and torch.equal(p.detach(), after[n])]
    assert unchanged == []
    assert (cfg.run_dir / "final" / "config.json").is_file()


def test_time_sliced_run_resumes_to_identical_metrics(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEYES_CACHE", str(cache))
    whole = _config(tmp_path / "whole")
    train(whole, resume=False)
    sliced = _config(tmp_path / "sliced")
    first = train(sliced, resume=False, max_steps=3)  # stops inside the grpo stage, after a checkpoint
    assert first.steps == 3
    again = train(sliced)  # resumes from step 3
    assert again.resumed_from == 3
    assert _stable(read_metrics(sliced.run_dir)) == _stable(read_metrics(whole.run_dir))


def test_resume_refuses_another_config(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEYES_CACHE", str(cache))
    train(_config(tmp_path / "run"), resume=False, max_steps=1)
    with pytest.raises(ConfigError, match="different training config"):
        train(_config(tmp_path / "run", seed=7))


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_identical_metrics(cache, tmp_path):
    """A real SIGKILL at a random step: the restarted run loses at most one step and ends bit-identical."""
    env = {**os.environ, "MEDEYES_CACHE": str(cache)}
    overrides = {"sft.steps": 6, "grpo.steps": 4, "eval.every": 5}
    script = (
        "import sys, json; from medeyes.training.config import preset, build_config; "
        "from medeyes.training.trainer import train; d = preset('tiny').model_dump(mode='json'); "
        "d['run_dir'] = sys.argv[1]; train(build_config(d, json.loads(sys.argv[2])))"
    )
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", script, str(whole), json.dumps(overrides)], env=env, check=True)
    killed = tmp_path / "killed"
    kill_at = int(torch.randint(2, 9, ()).item())
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed), json.dumps(overrides)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= kill_at for r in read_metrics(killed)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    lost_from = max(r["step"] for r in read_metrics(killed))
    subprocess.run([sys.executable, "-c", script, str(killed), json.dumps(overrides)], env=env, check=True)
    assert _stable(read_metrics(killed)) == _stable(read_metrics(whole)), f"killed after step {lost_from}"
    print(
        f"SIGKILL once step {kill_at} was logged (last row before the kill: step {lost_from}); the resumed run's "
        f"{len(read_metrics(killed))} metric rows equal the uninterrupted run's bit for bit (timings excluded)"
    )


def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = preset("cpu-default")
    path = tmp_path / "train.yaml"
    path.write_text("preset: cpu-default\ngrpo:\n  steps: 3\nobjective:\n  advantage_mode: on_baseline\n")
    loaded = TrainConfig.from_yaml(path, {"seed": 5})
    assert loaded.grpo.steps == 3 and loaded.objective.advantage_mode == "on_baseline" and loaded.seed == 5
    assert loaded.sft.steps == cfg.sft.steps  # the preset's other values stay
    assert TrainConfig.model_validate(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    with pytest.raises(ConfigError, match=r"grpo\.mode='dual' needs grpo\.group_off"):
        build_config({}, {"grpo.group_off": 0})
    with pytest.raises(ConfigError, match="invalid training config"):
        build_config({}, {"grpo.stepz": 1})
    for name, field in TrainConfig.model_fields.items():
        assert field.description, name


def test_learning_rate_schedule():
    from medeyes.training.config import OptimConfig

    cfg = OptimConfig(lr=2.0, warmup_steps=4)
    assert [learning_rate(cfg, s, 10) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_cli_help_and_print_config():
    from medeyes.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--grpo-steps" in result.output
    result = runner.invoke(app, ["train", "--print-config", "--set", "grpo.steps=7", "--mode", "on_policy"])
    assert result.exit_code == 0, result.output
    assert "steps: 7" in result.output and "mode: on_policy" in result.output
    result = runner.invoke(app, ["train", "--set", "nonsense"])
    assert result.exit_code == 2 and "--set expects KEY=VALUE" in result.output
    result = runner.invoke(app, ["train", "--set", "grpo.stepz=1"])
    assert result.exit_code == 2 and "invalid training config" in result.output
