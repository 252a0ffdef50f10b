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

from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from medeyes.models.factory import load_policy_model  # noqa: E402
from medeyes.training.config import TrainConfig, build_config, preset  # noqa: E402
from medeyes.training.metrics import read_metrics  # noqa: E402
from medeyes.training.schedule import learning_rate  # noqa: E402
from medeyes.training.trainer import train  # noqa: E402
from medeyes_env.errors import ConfigError  # noqa: E402

VOLATILE = ("seconds", "per_second", "elapsed")


def _config(run_dir, **overrides) -> TrainConfig:
    data = preset("tiny").model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    return build_config(data, overrides)


def _stable(rows):
    return [{k: v for k, v in row.items() if not any(w in k for w in VOLATILE)} for row in rows]


def test_tiny_run_logs_loss_and_trains_every_parameter(tiny_cache, tmp_path):
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

    after = load_file(cfg.run_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    unchanged = [n for n, p in before.named_parameters() if p.requires_grad and torch.equal(p.detach(), after[n])]
    assert unchanged == []
    assert (cfg.run_dir / "final" / "config.json").is_file()


def test_time_sliced_run_resumes_to_identical_metrics(tiny_cache, tmp_path):
    whole = _config(tmp_path / "whole")
    train(whole, resume=False)
    sliced = _config(tmp_path / "sliced")
    first = train(sliced, resume=False, max_steps=3)  # stops inside the grpo stage, after a checkpoint
    assert first.steps == 3
    again = train(sliced)  # resumes from step 3
    assert again.resumed_from == 3
    assert _stable(read_metrics(sliced.run_dir)) == _stable(read_metrics(whole.run_dir))


def test_resume_refuses_another_config(tiny_cache, tmp_path):
    train(_config(tmp_path / "run"), resume=False, max_steps=1)
    with pytest.raises(ConfigError, match="different training config"):
        train(_config(tmp_path / "run", seed=7))


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_identical_metrics(tiny_cache, tmp_path):
    """A real SIGKILL at a random step: the restarted run loses at most one step and ends bit-identical."""
    env = {**os.environ, "MEDEYES_CACHE": str(tiny_cache)}
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
    from medeyes.training.stage_config import OptimConfig

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


def test_the_cli_preset_choices_are_the_training_presets():
    from medeyes.cli.common import Preset
    from medeyes.training.config import PRESETS

    assert [p.value for p in Preset] == list(PRESETS)


def test_every_config_field_is_listed_with_its_help():
    from medeyes.cli.app import app
    from medeyes.cli.train import config_rows
    from medeyes.training.config import TrainConfig

    rows = config_rows(TrainConfig())
    assert len(rows) > 100 and all(text for _, _, text in rows)  # every leaf field has a description
    result = CliRunner().invoke(app, ["train", "--help-config", "--set", "grpo.steps=7"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.split()[:1] == ["grpo.steps"])
    assert line.split()[1] == "7"
    assert "objective.advantage_mode" in result.output


# ---- keeping tools alive: curiosity bonus, flat-group skipping, tool-use accuracy, collapse alarm ----------------


def test_tool_options_through_a_tiny_run(tiny_cache, tmp_path):
    options = {
        "grpo.curiosity_coef": 1.0,
        "grpo.curiosity_threshold": 1.0,
        "grpo.skip_flat_groups": "on_rows",
        "grpo.tool_floor": 0.5,
    }
    cfg = _config(tmp_path / "run", **options)
    with pytest.warns(RuntimeWarning, match=r"on-policy tool share .* is below grpo.tool_floor=0.5") as caught:
        train(cfg, resume=False)
    rows = read_metrics(cfg.run_dir)
    grpo = [r for r in rows if r.get("train/stage") == 1.0]
    assert len(grpo) == cfg.grpo.steps
    for row in grpo:
        share = row["stream/on/tool_share"]
        assert row["alarm/tool_collapse"] == float(share < 0.5)
        # one prompt per step, so the group's tool rate is the step's: bonus = 1 * (1 - rate) * rate on average
        assert row["stream/on/curiosity_bonus"] == pytest.approx((1.0 - share) * share)
        # a flat group is exactly one whose on-policy sigma is 0; on_rows drops its G_on rows only
        assert row["stream/on/skipped_groups"] == row["stream/on/sigma_zero_groups"]
        kept = row["stream/on/episodes"] * (1 - row["stream/on/skipped_groups"]) + row.get("stream/off/episodes", 0)
        assert row["train/loss_rows"] == kept
        assert ("stream/on/accuracy_with_tool" in row) == (share > 0)
        assert ("stream/on/accuracy_without_tool" in row) == (share < 1)
    assert sum(r["alarm/tool_collapse"] for r in grpo) >= 1
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1  # printed once, not every step
    for prefix, accuracy in (("stream/on/", "stream/on/reward/accuracy"), ("eval/", "eval/accuracy")):
        for row in (r for r in rows if accuracy in r):
            share = row[f"{prefix}tool_share"]
            assert (f"{prefix}accuracy_with_tool" in row) == (share > 0)
            # the two accuracies, weighted by the tool share, give back the overall accuracy
            split = share * row.get(f"{prefix}accuracy_with_tool", 0.0)
            split += (1 - share) * row.get(f"{prefix}accuracy_without_tool", 0.0)
            assert split == pytest.approx(row[accuracy])


def test_defaults_add_no_shaping_skipping_or_alarm(tiny_cache, tmp_path):
    cfg = _config(tmp_path / "run")
    assert (cfg.grpo.curiosity_coef, cfg.grpo.skip_flat_groups, cfg.grpo.tool_floor) == (0.0, "off", None)
    train(cfg, resume=False)
    grpo = [r for r in read_metrics(cfg.run_dir) if r.get("train/stage") == 1.0]
    assert not any(k in r for r in grpo for k in ("stream/on/curiosity_bonus", "stream/on/skipped_groups"))
    assert not any("alarm/tool_collapse" in r for r in grpo)
    assert all(r["train/loss_rows"] == r["stream/on/episodes"] + r.get("stream/off/episodes", 0) for r in grpo)


def test_shaped_rewards_and_loss_rows_by_hand():
    from medeyes.training.shaping import loss_rows, shaped_rewards
    from medeyes.training.stage_config import GRPOConfig

    rewards = torch.tensor([0.0, 0.9, 0.0, 0.0, 0.7, 0.5, 0.5, 1.0])
    used = torch.tensor([False, True, False, False, True, True, False, True])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    expert = torch.tensor([False, False, False, False, True, False, False, True])
    metrics: dict[str, float] = {}
    # group 0: 1 of 4 on-policy rollouts used a tool (rate 0.25), group 1: 1 of 2 (0.5); expert rows get nothing
    shaped = shaped_rewards(
        rewards, used, groups, expert, GRPOConfig(curiosity_coef=0.5, curiosity_threshold=0.3), metrics
    )
    assert shaped.tolist() == pytest.approx([0.0, 0.9 + 0.5 * 0.05, 0.0, 0.0, 0.7, 0.5, 0.5, 1.0])
    assert metrics["stream/on/curiosity_bonus"] == pytest.approx(0.025 / 6)
    assert shaped_rewards(rewards, used, groups, expert, GRPOConfig(), {}) is rewards
    flat = torch.tensor([0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 1.0, 1.0])  # group 0's on-policy rows are all 0.2
    metrics = {}
    assert loss_rows(flat, groups, expert, "on_rows", metrics) == [4, 5, 6, 7]
    assert metrics == {"stream/on/skipped_groups": 1.0, "train/loss_rows": 4.0}
    assert loss_rows(flat, groups, expert, "group", {}) == [5, 6, 7]
    assert loss_rows(flat, groups, expert, "off", {}) == list(range(8))


def test_progress_line_shows_tool_share_and_the_collapse_warning():
    from medeyes.training.metrics import progress_stats

    live = {"train/loss": 0.25, "stream/on/reward_mean": 0.5, "stream/on/tool_share": 0.75, "eval/accuracy": 0.6}
    assert progress_stats(live, 0.4, None) == "loss 0.250  reward 0.50  tools 0.75  held-out acc 0.600  (blind 0.400)"
    collapsed = {**live, "stream/on/tool_share": 0.05, "alarm/tool_collapse": 1.0}
    assert "tools 0.05 [bold red]< floor 0.1: tool collapse[/]" in progress_stats(collapsed, None, 0.1)
    assert "collapse" not in progress_stats({**collapsed, "alarm/tool_collapse": 0.0}, None, 0.1)


def test_overrides_do_not_write_into_the_callers_config():
    """apply_overrides returns a new nested dict: a base config reused for several runs stays as it was."""
    from medeyes.training.config import apply_overrides

    base = preset("tiny").model_dump(mode="json")
    every = base["eval"]["every"]
    changed = apply_overrides(base, {"eval.every": every + 7})
    assert changed["eval"]["every"] == every + 7 and base["eval"]["every"] == every


def test_expert_agent_settings_nest_the_agents_config_and_refuse_the_old_flat_keys(tmp_path):
    """expert.agent is the agent's own ExpertConfig; a key from before it is refused with its new name."""
    from medeyes.agents.expert.config import ExpertConfig

    cfg = preset("cpu-default")
    assert isinstance(cfg.expert.agent, ExpertConfig) and cfg.expert.agent.n_expert == 2
    old = tmp_path / "old.yaml"
    old.write_text("expert:\n  per_case: 3\n  mode: greedy\n")
    renamed = (
        r"the expert agent's settings live under expert\.agent: rename expert\.per_case -> expert\.agent\.n_expert"
    )
    with pytest.raises(ConfigError, match=rf"(?s)old\.yaml: .*{renamed}, expert\.mode -> expert\.agent\.mode"):
        TrainConfig.from_yaml(old)
    with pytest.raises(ConfigError, match=renamed):
        build_config({}, {"expert.per_case": 4})
    assert "t_max" not in cfg.model_dump()["expert"]["agent"]  # the expert's tool turns are env.max_steps
    with pytest.raises(ConfigError, match=r"expert\.agent\.t_max=3 is not read: .* set env\.max_steps instead"):
        build_config({}, {"expert.agent.t_max": 3})


def test_oracle_and_data_options_are_typed_and_dump_only_what_was_given():
    """--help-config lists every oracle and phantom field; a dump (and so the expert cache key) holds the given ones."""
    from medeyes.cli.train import config_rows

    cfg = build_config(preset("tiny").model_dump(mode="json"), {"expert.oracle_options.bilateral": True})
    assert cfg.expert.oracle_options.model_dump() == {"distractors": 0.0, "lookalikes": "like_gold", "bilateral": True}
    assert cfg.data_options.model_dump() == {"image_size": 256}
    assert cfg.data_options.noise is None  # the preset's value
    rows = {key for key, _, _ in config_rows(cfg)}
    assert {"expert.oracle_options.work_side", "expert.oracle_options.base_url", "data_options.lumen_sigma"} <= rows
    with pytest.raises(
        ConfigError,
        match=r"expert\.oracle_options\.bilateral is a setting of the annotation and "
        r"perfect oracles, not of expert\.oracle='image': remove it, or set expert\.oracle=annotation",
    ):
        build_config({}, {"expert.oracle": "image", "expert.oracle_options.bilateral": True})
    with pytest.raises(
        ConfigError,
        match=r"expert\.oracle_options\.distractors=99\.0: Input should be less than or "
        r"equal to 10 \(the annotation oracle's config\)",
    ):
        build_config({}, {"expert.oracle_options.distractors": 99})
    with pytest.raises(
        ConfigError, match=r"expert\.oracle\n  Input should be 'annotation', 'perfect', 'image' or 'vlm'"
    ):
        build_config({}, {"expert.oracle": "vlmm"})
