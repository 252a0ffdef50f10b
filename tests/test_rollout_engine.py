"""grpo.rollout_backend and truncated importance sampling, everything that runs without vLLM.

The vLLM sides (weight sync, a GRPO run with vLLM rollouts) are vllm-marked in tests/test_vllm_weight_sync.py
and tests/test_vllm_grpo.py and run under .venv-vllm.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from medeyes.training.config import build_config, preset  # noqa: E402
from medeyes.training.metrics import read_metrics  # noqa: E402
from medeyes.training.mismatch import tis_metrics, truncated_is_weights  # noqa: E402
from medeyes.training.objective import dual_stream_loss  # noqa: E402
from medeyes.training.objective_config import ObjectiveConfig  # noqa: E402
from medeyes.training.rollout_engine import make_rollout_engine, resolve_sleep  # noqa: E402
from medeyes_env.errors import ConfigError  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---- truncated importance sampling: hand-computed values ---------------------------------------------------------


def test_tis_weights_by_hand() -> None:
    train_old = torch.tensor([[-0.5, -1.0, -2.0, 0.0], [-3.0, -0.1, 0.0, 0.0]])
    behaviour = torch.tensor([[-1.0, -1.0, -0.5, 0.0], [-1.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = truncated_is_weights(train_old, behaviour, mask, cap=2.0)
    # exp(0.5) = 1.6487, exp(0) = 1, exp(-1.5) = 0.2231; exp(-2) = 0.1353, exp(1.9) = 6.6859 -> capped at 2
    want = torch.tensor([[math.exp(0.5), 1.0, math.exp(-1.5), 1.0], [math.exp(-2.0), 2.0, 1.0, 1.0]])
    torch.testing.assert_close(w, want)
    metrics = tis_metrics(w, mask, cap=2.0)
    assert metrics["stream/on/tis_weight_mean"] == pytest.approx(
        (math.exp(0.5) + 1 + math.exp(-1.5) + math.exp(-2) + 2) / 5
    )
    assert metrics["stream/on/tis_capped_frac"] == pytest.approx(1 / 5)
    assert tis_metrics(w, torch.zeros_like(mask), 2.0) == {}


def test_tis_weights_ignore_garbage_outside_the_mask_and_carry_no_gradient() -> None:
    train_old = torch.tensor([[0.0, float("nan")]], requires_grad=True)
    behaviour = torch.tensor([[-10.0, float("inf")]])
    w = truncated_is_weights(train_old, behaviour, torch.tensor([[True, False]]), cap=3.0)
    assert w.tolist() == [[3.0, 1.0]] and not w.requires_grad
    with pytest.raises(ValueError, match="cap=0; it must be > 0"):
        truncated_is_weights(train_old, behaviour, torch.tensor([[True, False]]), cap=0)
    with pytest.raises(ValueError, match=r"must have the same shape \[B, T\]"):
        truncated_is_weights(train_old, behaviour[:, :1], torch.tensor([[True, False]]), cap=2.0)


def test_dual_stream_loss_honours_tis_cap_as_the_hand_weighted_ppo_loss() -> None:
    logprobs = torch.tensor([[-0.4, -1.2, -0.7], [-0.3, -0.9, -2.0]], requires_grad=True)
    old = torch.tensor([[-0.5, -1.0, -0.7], [-0.2, -0.9, -1.0]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    is_expert = torch.tensor([False, False])
    raw = torch.tensor([[5.0, 0.5, 1.0], [1.0, 0.25, 1.5]])  # exp(old - behaviour); 5 is capped at 2
    behaviour = old - raw.log()
    weights = raw.clamp(max=2.0)
    config = ObjectiveConfig(tis_cap=2.0)
    loss, metrics = dual_stream_loss(logprobs, old, adv, mask, is_expert, config, behaviour_logprobs=behaviour)
    # the plain loop: per token -w * min(r A, clip(r) A), mean per row over its mask, then mean over rows
    rows = []
    for i in range(2):
        terms = []
        for t in range(3):
            if mask[i, t]:
                r = math.exp(float(logprobs[i, t].detach() - old[i, t]))
                a = float(adv[i])
                clipped = min(max(r, 0.8), 1.2)
                terms.append(-float(weights[i, t]) * min(r * a, clipped * a))
        rows.append(sum(terms) / len(terms))
    assert float(loss.detach()) == pytest.approx(sum(rows) / 2, rel=1e-5)
    assert metrics["stream/on/tis_capped_frac"] == pytest.approx(1 / 5)
    assert metrics["stream/on/tis_weight_mean"] == pytest.approx((2.0 + 0.5 + 1.0 + 0.25 + 1.5) / 5, rel=1e-5)
    unweighted, plain = dual_stream_loss(logprobs, old, adv, mask, is_expert, ObjectiveConfig())
    ones, _ = dual_stream_loss(logprobs, old, adv, mask, is_expert, config, behaviour_logprobs=old)
    assert unweighted.item() == ones.item() != loss.item()
    assert not any(k.startswith("stream/on/tis_") for k in plain)
    with pytest.raises(
        ValueError, match=r"objective.tis_cap=2 needs behaviour_logprobs .* or set objective.tis_cap=null"
    ):
        dual_stream_loss(logprobs, old, adv, mask, is_expert, config)
    with pytest.raises(ValueError, match=r"behaviour_logprobs has shape \(2, 2\) but logprobs has \(2, 3\)"):
        dual_stream_loss(logprobs, old, adv, mask, is_expert, config, behaviour_logprobs=torch.zeros(2, 2))


# ---- configuration ------------------------------------------------------------------------------------------------


def test_rollout_backend_config_defaults_and_choices() -> None:
    cfg = preset("tiny")
    assert cfg.grpo.rollout_backend == "transformers" and cfg.objective.tis_cap is None
    assert cfg.grpo.vllm.sleep == "auto" and cfg.grpo.vllm.kv_cache_gib == 1
    assert build_config(cfg.model_dump(mode="json"), {"grpo.rollout_backend": "vllm-server"}).grpo.rollout_backend
    with pytest.raises(ConfigError, match="'transformers', 'vllm' or 'vllm-server'"):
        build_config(cfg.model_dump(mode="json"), {"grpo.rollout_backend": "vllm_server"})
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        build_config(cfg.model_dump(mode="json"), {"grpo.vllm.gpu_memory_utilization": 1.5})
    with pytest.raises(ConfigError, match="greater than 0"):
        build_config(cfg.model_dump(mode="json"), {"objective.tis_cap": 0})


def test_tis_needs_recomputed_old_logprobs() -> None:
    data = preset("tiny").model_dump(mode="json")
    with pytest.raises(ConfigError) as info:
        build_config(data, {"objective.tis_cap": 2.0})
    assert (
        "objective.tis_cap=2 weights each token by exp(logp_train_old - logp_behaviour), but "
        "grpo.old_logprobs='rollout' makes pi_old the behaviour log-probs themselves (every weight would be 1); "
        "set grpo.old_logprobs=recompute, or objective.tis_cap=null"
    ) in str(info.value)
    cfg = build_config(data, {"objective.tis_cap": 2.0, "grpo.old_logprobs": "recompute"})
    assert cfg.objective.tis_cap == 2.0


def test_sleep_setting() -> None:
    assert resolve_sleep("auto", available=False) is False
    assert resolve_sleep("on", available=True) is True
    with pytest.raises(ConfigError, match=r"grpo\.vllm\.sleep=.on. but this vLLM platform has no sleep mode"):
        resolve_sleep("on", available=False)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is importable in this python")
@pytest.mark.parametrize("backend", ["vllm", "vllm-server"])
def test_vllm_backends_without_vllm_name_the_extra(backend: str) -> None:
    cfg = build_config(preset("tiny").model_dump(mode="json"), {"grpo.rollout_backend": backend})
    with pytest.raises(ConfigError) as info:
        make_rollout_engine(cfg, policy=None, train_dtype="float32")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"grpo.rollout_backend='{backend}' needs vLLM, which ")
    assert "pip install 'medeyes[vllm]'" in message and "bash scripts/install_vllm_cpu.sh .venv-vllm" in message
    assert message.endswith("or use grpo.rollout_backend=transformers")


# ---- the trainer --------------------------------------------------------------------------------------------------


def _run(run_dir, **overrides):
    from medeyes.training.trainer import train

    data = preset("tiny").model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    cfg = build_config(data, {"tensorboard": False, "progress": False, **overrides})
    train(cfg, resume=False)
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in read_metrics(run_dir)]


def test_explicit_transformers_backend_is_the_default_run_and_tis_weights_the_loss(tiny_cache, tmp_path):
    default = _run(tmp_path / "default")
    explicit = _run(tmp_path / "explicit", **{"grpo.rollout_backend": "transformers"})
    assert default == explicit
    assert not any(k.startswith(("train/sync", "stream/on/tis_")) for r in default for k in r)

    recompute = _run(tmp_path / "recompute", **{"grpo.old_logprobs": "recompute"})
    tis = _run(tmp_path / "tis", **{"grpo.old_logprobs": "recompute", "objective.tis_cap": 2.0})
    grpo_rows = [r for r in tis if r.get("train/stage") == 1.0]
    assert len(grpo_rows) == 2
    # transformers samples with the training model itself: the only mismatch is KV-cache numerics (~2e-7 per
    # token on this CPU), so every TIS weight is ~1 and the run matches the one without TIS
    assert all(0 <= r["stream/on/behaviour_logprob_gap"] < 1e-5 for r in grpo_rows)
    assert all(r["stream/on/tis_weight_mean"] == pytest.approx(1.0, abs=1e-5) for r in grpo_rows)
    for with_tis, without in zip(tis, recompute, strict=True):
        assert with_tis.keys() - without.keys() <= {
            "stream/on/tis_weight_mean",
            "stream/on/tis_capped_frac",
            "stream/on/behaviour_logprob_gap",
        }
        if "train/loss" in without:  # row 0 is the evaluation before training
            assert with_tis["train/loss"] == pytest.approx(without["train/loss"], rel=1e-5)
