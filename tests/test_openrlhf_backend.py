"""The OpenRLHF backend without OpenRLHF: agent reset/step, expert replay, stream slots, loss, advantages, export, command.

OpenRLHF's own classes (its loader, ``MultiTurnAgentExecutor``, ``generate_responses``, ``SamplesGenerator``,
``PolicyLoss``, ``ActorPPOTrainer``) are exercised by ``tests/test_openrlhf_real.py`` (marker ``openrlhf``) in the
separate ``.venv-openrlhf`` (CI stage 5); see docs/openrlhf.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from medeyes.models.processors import load_processor  # noqa: E402
from medeyes.training.advantages import compute_advantages  # noqa: E402
from medeyes.training.objective import dual_stream_loss  # noqa: E402
from medeyes.training.objective_config import ObjectiveConfig  # noqa: E402
from medeyes.training.openrlhf import patches  # noqa: E402
from medeyes.training.openrlhf.agent import MedEyesAgentInstance, MedEyesExecutorMixin  # noqa: E402
from medeyes.training.openrlhf.chat import (  # noqa: E402
    ChatFormatter,
    FormatterCache,
    encode_segment,
    processor_identity,
    render_prompt_row,
)
from medeyes.training.openrlhf.config import (  # noqa: E402
    ADVANTAGE_LOG_KEYS,
    AGENT_FILE,
    BACKEND_FILE,
    EPISODE_LOG_KEYS,
    EVAL_FILE,
    EXPERT_FILE,
    LOSS_LOG_KEYS,
    OPENRLHF_PRESET_OVERRIDES,
    PROMPTS_FILE,
    BackendConfig,
    CaseLabel,
    OpenRLHFConfig,
    openrlhf_preset,
)
from medeyes.training.openrlhf.episode import EpisodeDriver  # noqa: E402
from medeyes.training.openrlhf.export import check_export, export_openrlhf_data  # noqa: E402
from medeyes.training.openrlhf.launch import build_command, openrlhf_args, preflight  # noqa: E402
from medeyes.training.openrlhf.loss import (  # noqa: E402
    DualStreamPolicyLoss,
    assign_dual_stream_advantages,
    reduce_like_medeyes,
    row_advantages,
    stream_advantages,
)
from medeyes.training.openrlhf.patches import install_openrlhf_patches, require_patch_hook  # noqa: E402
from medeyes.training.openrlhf.replay import load_expert_file, replay_expert  # noqa: E402
from medeyes_env.errors import ConfigError, RecordError  # noqa: E402
from medeyes_env.protocol import Action, render_turn  # noqa: E402

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A real export of the tiny preset (2 training cases, expert trajectories made by the GRN+CVS expert)."""
    root = tmp_path_factory.mktemp("openrlhf")
    train = openrlhf_preset("tiny", {"run_dir": str(root / "run"), "expert.dir": str(root / "expert")})
    config = OpenRLHFConfig(train=train, nodes=1, gpus_per_node=2)
    summary = export_openrlhf_data(config)
    rows = [json.loads(line) for line in (config.data_dir / PROMPTS_FILE).read_text().splitlines()]
    return config, summary, rows


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return load_processor(str(tiny_models.path("qwen2_5_vl")))


@pytest.fixture(scope="module")
def idefics(tiny_models):
    return load_processor(str(tiny_models.path("idefics3")))


def _backend(config: OpenRLHFConfig) -> BackendConfig:
    return BackendConfig.load(config.data_dir / BACKEND_FILE)


def _gold_turns(driver: EpisodeDriver) -> list[str]:
    """A drill on the gold region, then the gold answer."""
    case = driver.env.case
    box = case.regions[0].box if case.regions else (0, 0, 32, 32)
    drill = render_turn(Action.drill(box), "look closer", driver.env.config.box_format, driver.env.image.size)
    return [drill, render_turn(Action.final_answer(case.answer), "done")]


# ------------------------------------------------------------------------------------------------ labels, config


def test_case_label_round_trip_and_bad_label():
    label = CaseLabel(source="phantom:easy", split="train", index=3, case_id="phantom/train/000003", expert=True)
    assert CaseLabel.parse(label.dumps()) == label
    with pytest.raises(RecordError, match=r"is not a MedEyes case label .*medeyes openrlhf export"):
        CaseLabel.parse("the answer is 42")


def test_backend_config_n_samples_and_missing_file(tmp_path):
    assert BackendConfig(group_on=8, group_off=6, expert_file=tmp_path / "e.jsonl").n_samples_per_prompt == 14
    assert BackendConfig(group_on=8, group_off=6).n_samples_per_prompt == 8  # no expert file: on-policy only
    with pytest.raises(ConfigError, match="not found; run `medeyes openrlhf export` first"):
        BackendConfig.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ export and command


def test_export_writes_prompts_labels_images_expert_and_agent_file(export):
    config, summary, rows = export
    out = config.data_dir
    train = config.train
    assert summary.prompt_rows == len(rows) == train.grpo.steps * train.grpo.prompts_per_step
    for name in (PROMPTS_FILE, EVAL_FILE, EXPERT_FILE, BACKEND_FILE, AGENT_FILE):
        assert (out / name).is_file(), name
    row = rows[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["content"].startswith("<image>")
    assert Path(row["images"][0]).is_file()
    label = CaseLabel.parse(row["label"])
    assert label.source == train.data and label.split == "train" and label.expert
    eval_labels = [CaseLabel.parse(json.loads(line)["label"]) for line in (out / EVAL_FILE).read_text().splitlines()]
    assert len(eval_labels) == summary.eval_rows and not any(lab.expert for lab in eval_labels)
    experts = load_expert_file(out / EXPERT_FILE)
    assert summary.expert_cases == len(experts) >= 1
    assert all(t.turns and t.turns[-1].count("<answer>") == 1 for ts in experts.values() for t in ts)
    backend = _backend(config)
    assert backend == config.backend()
    assert backend.n_samples_per_prompt == train.grpo.group_on + train.grpo.group_off
    agent = (out / AGENT_FILE).read_text()
    assert "make_agent_executor(" in agent and str(out / BACKEND_FILE) in agent
    assert check_export(config) == []


def test_check_export_names_a_stale_export(export):
    config, _, _ = export
    changed = config.model_copy(update={"feedback_images": False})
    assert check_export(changed) == [f"{config.data_dir / BACKEND_FILE} was exported with other settings; export again"]


def test_command_maps_the_paper_defaults(export):
    config, _, _ = export
    paper = OpenRLHFConfig(export_dir=config.data_dir)  # paper preset: G_on 8, G_off 6, lr 1e-6, KL 0, temperature 1
    args = openrlhf_args(paper)

    def flag(name: str, n: int = 1) -> list[str]:
        at = args.index(name)
        return args[at + 1 : at + 1 + n]

    assert flag("--rollout.n_samples_per_prompt") == ["14"]
    assert flag("--rollout.batch_size") == ["8"]
    assert flag("--train.batch_size") == [str(8 * 14)]  # one optimizer step per rollout batch
    assert flag("--actor.adam.lr") == ["1e-06"]
    assert flag("--rollout.temperature") == ["1.0"]
    assert flag("--algo.kl.init_coef") == ["0.0"] and "--algo.kl.use_loss" not in args
    assert flag("--algo.advantage.estimator") == ["group_norm"]
    assert flag("--actor.eps_clip_low_high", 2) == ["0.2", "0.2"]
    assert flag("--actor.loss_agg_mode") == ["seq-mean-token-mean"]
    assert flag("--actor.model_name_or_path") == ["Qwen/Qwen2.5-VL-3B-Instruct"]
    assert flag("--train.agent_func_path") == [str(config.data_dir / AGENT_FILE)]
    assert flag("--data.max_images_per_prompt") == ["5"]  # overview + one view per tool turn (T_max 4)
    assert "--data.apply_chat_template" in args
    command = build_command(paper)
    assert command[1:5] == [
        "-m",
        "medeyes.training.openrlhf.launch",
        "--medeyes-config",
        str(config.data_dir / BACKEND_FILE),
    ]


def test_command_kl_and_ray_job_variants(export):
    config, _, _ = export
    train = config.train.model_copy(update={"objective": ObjectiveConfig(kl_coef=0.01)})
    args = openrlhf_args(config.model_copy(update={"train": train}))
    assert args[args.index("--algo.kl.init_coef") + 1] == "0.01"
    assert "--algo.kl.use_loss" in args and args[args.index("--algo.kl.estimator") + 1] == "k3"
    job = build_command(config, launcher="ray-job", ray_address="http://head:8265")
    assert job[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    runtime = json.loads(job[job.index("--runtime-env-json") + 1])
    assert runtime["worker_process_setup_hook"] == "medeyes.training.openrlhf.patches.install_openrlhf_patches"
    assert runtime["env_vars"]["MEDEYES_OPENRLHF_CONFIG"] == str(config.data_dir / BACKEND_FILE)
    assert job[job.index("--") + 1 :][:3] == ["python3", "-m", "openrlhf.cli.train_ppo_ray"]


@pytest.mark.parametrize(
    ("setting", "value", "fix"),
    [
        ("grpo.curiosity_coef", 0.5, "grpo.curiosity_coef=0"),
        ("grpo.skip_flat_groups", "on_rows", "grpo.skip_flat_groups=off"),
        ("grpo.tool_floor", 0.2, "grpo.tool_floor=null"),
        ("grpo.old_logprobs", "rollout", "grpo.old_logprobs=recompute"),
        ("objective.tis_cap", 2.0, "objective.tis_cap=null"),
    ],
)
def test_launch_config_refuses_what_openrlhf_does_not_implement(setting, value, fix):
    train = openrlhf_preset("paper", {setting: value})
    with pytest.raises(ValueError, match="the OpenRLHF backend does not implement") as caught:
        OpenRLHFConfig(train=train)
    message = str(caught.value)
    assert (f"{setting}={value:g}" if isinstance(value, float) else f"{setting}={value}") in message
    assert f"set {fix}, or train with `medeyes train`" in message


def test_launch_config_takes_the_no_op_values_and_names_every_refusal():
    assert OPENRLHF_PRESET_OVERRIDES == {"grpo.old_logprobs": "recompute"}
    quiet = openrlhf_preset("paper", {"grpo.tool_floor": 0.0, "grpo.curiosity_threshold": 0.9})
    assert OpenRLHFConfig(train=quiet).train.grpo.tool_floor == 0.0  # a floor of 0 never fires: a no-op
    both = openrlhf_preset("paper", {"grpo.tool_floor": 0.2, "grpo.skip_flat_groups": "group"})
    with pytest.raises(ValueError, match=r"grpo.skip_flat_groups=group .*; grpo.tool_floor=0.2 .*medeyes train"):
        OpenRLHFConfig(train=both)


def test_dual_stream_policy_loss_honours_tis_cap_with_rollout_log_probs():
    log_probs = torch.tensor([[-0.4, -1.2], [-0.3, -0.9]])
    old = torch.tensor([[-0.5, -1.0], [-0.2, -0.9]])
    rollout = old - torch.tensor([[5.0, 0.5], [1.0, 1.0]]).log()  # weights 2 (capped), 0.5, 1, 1
    advantages = torch.tensor([1.0, -0.5])
    loss_fn = DualStreamPolicyLoss(ObjectiveConfig(tis_cap=2.0))
    loss, *_ = loss_fn(log_probs, old, advantages, rollout_log_probs=rollout)
    want, _ = dual_stream_loss(
        log_probs, old, advantages, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool),
        loss_fn.config, behaviour_logprobs=rollout,
    )  # fmt: skip
    assert loss.item() == want.item() and loss_fn.last_metrics["stream/on/tis_capped_frac"] == 0.25
    with pytest.raises(ValueError, match=r"objective\.tis_cap=2 needs behaviour_logprobs"):
        loss_fn(log_probs, old, advantages)


def test_launch_config_refuses_inconsistent_settings():
    # pydantic wraps the validator's ConfigError in a ValidationError (both are ValueErrors); the CLI unwraps it
    with pytest.raises(ValueError, match="medeyes_loss=false uses OpenRLHF's PPO loss"):
        OpenRLHFConfig(medeyes_loss=False)
    with pytest.raises(ValueError, match=r"vllm_engines\*vllm_tensor_parallel == nodes\*gpus_per_node"):
        OpenRLHFConfig(vllm_engines=3)


# ------------------------------------------------------------------------------------------------ chat format


def test_chat_formatter_cuts_markers_from_the_template(qwen, idefics):
    q = ChatFormatter(qwen)
    assert (q.sep, q.close, q.eot_text, q.images) == ("", "<|im_end|>\n", "<|im_end|>", True)
    assert q.tokenizer.convert_tokens_to_ids("<|im_end|>") in q.eot_ids
    segment = q.feedback_segment("<feedback>ok</feedback>", n_images=1)
    assert segment.startswith("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    assert segment.endswith("<feedback>ok</feedback><|im_end|>\n<|im_start|>assistant\n")
    assert q.feedback_segment("x", 1, ended_with_eot=True) == q.feedback_segment("x", 1)[len("<|im_end|>") :]
    assert q.clean_action("<answer>yes</answer><|im_end|>") == ("<answer>yes</answer>", True)
    assert q.clean_action("<answer>yes</answer>") == ("<answer>yes</answer>", False)
    i = ChatFormatter(idefics)
    assert (i.sep, i.close, i.eot_text) == (" ", "<end_of_utterance>\n", "<end_of_utterance>")
    assert i.clean_action(" <answer>no</answer>") == ("<answer>no</answer>", False)
    assert ChatFormatter(qwen, feedback_images=False).feedback_segment("t", 0).count("<|image_pad|>") == 0


# ------------------------------------------------------------------------------------------------ agent reset/step


def test_driver_reset_and_step_run_the_env(export, qwen):
    config, _, rows = export
    backend = _backend(config)
    formatter = ChatFormatter(qwen)
    prompt = render_prompt_row(qwen, rows[0])
    driver = EpisodeDriver(backend, formatter)
    assert driver.reset(prompt, rows[0]["label"]) == prompt
    drill, answer = _gold_turns(driver)
    first = driver.step(drill + "<|im_end|>")
    assert not first.done and first.reward == 0.0 and first.env_action == drill
    assert len(first.images) == 1 and first.images[0].size == (backend.env.view_size,) * 2
    # the turn already ended with <|im_end|>, so the segment does not repeat it
    assert first.feedback.startswith("\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><feedback>Zoomed")
    assert set(first.extra_logs) == {"medeyes/" + k for k in EPISODE_LOG_KEYS}
    last = driver.step(answer)
    assert last.done and last.feedback == "" and last.images == []
    assert last.reward == pytest.approx(last.extra_logs["medeyes/reward_total"])
    assert last.reward > 0.9
    assert last.score == 1.0 and last.extra_logs["medeyes/used_drill"] == 1.0
    assert last.extra_logs["medeyes/r_grammar"] == 1.0  # the end-of-turn token did not reach the parser


def test_driver_counts_a_malformed_turn_and_refuses_stale_labels(export):
    config, _, rows = export
    backend = _backend(config)
    driver = EpisodeDriver(backend)
    label = CaseLabel.parse(rows[0]["label"])
    question = json.loads(json.dumps(rows[0]))["prompt"][1]["content"][len("<image>") :]
    driver.reset(question, label.dumps())
    step = driver.step("I think it is fine")
    assert not step.done and step.extra_logs["medeyes/malformed_turns"] == 1.0
    assert step.feedback.startswith("<feedback>Your last turn could not be executed")
    stale = label.model_copy(update={"case_id": "phantom/train/999999"})
    with pytest.raises(RecordError, match="but the source gives 'phantom/train/000000' there; the export is stale"):
        EpisodeDriver(backend).reset(question, stale.dumps())
    with pytest.raises(RecordError, match="does not contain the environment's question text"):
        EpisodeDriver(backend).reset("another question", label.dumps())


def test_agent_instance_speaks_openrlhf_step_format(export, qwen):
    config, _, rows = export
    backend = _backend(config)
    instance = MedEyesAgentInstance(backend, ChatFormatter(qwen))
    prompt = render_prompt_row(qwen, rows[0])

    async def episode() -> list[dict[str, Any]]:
        reset = await instance.reset({"observation": prompt, "label": rows[0]["label"]})
        assert reset == {"observation": prompt}
        results = []
        for text in _gold_turns(instance.driver):
            results.append(
                await instance.step({"observation_text": prompt, "action_text": text, "label": rows[0]["label"]})
            )
        return results

    first, last = asyncio.run(episode())
    assert set(first) == {"rewards", "scores", "environment_feedback", "environment_images", "done", "extra_logs"}
    assert isinstance(first["rewards"], torch.Tensor) and first["rewards"].item() == 0.0
    assert first["done"] is False and len(first["environment_images"]) == 1
    assert last["done"] is True and last["environment_images"] is None and last["scores"].item() == 1.0
    with pytest.raises(ConfigError, match="needs a config, or must run inside MedEyesExecutorMixin"):
        MedEyesAgentInstance()


# ------------------------------------------------------------------------------------------------ expert replay, slots


def test_expert_replay_builds_the_token_stream(export, qwen):
    config, _, rows = export
    backend = _backend(config)
    formatter = ChatFormatter(qwen)
    row = rows[0]
    label = CaseLabel.parse(row["label"])
    trajectory = load_expert_file(backend.expert_file)[label.case_id][0]
    prompt = render_prompt_row(qwen, row)
    out = asyncio.run(
        replay_expert(backend, formatter, qwen, prompt, row["label"], trajectory, 4096, row["images"], True)
    )
    tokens, ranges = out["observation_tokens"], out["action_ranges"]
    prompt_ids, _ = encode_segment(qwen, prompt, [__import__("PIL.Image").Image.open(row["images"][0]).convert("RGB")])
    assert tokens[: len(prompt_ids)] == prompt_ids and ranges[0][0] == len(prompt_ids)
    decoded = [qwen.tokenizer.decode(tokens[a:b]) for a, b in ranges]
    assert decoded == trajectory.turns  # the loss spans hold exactly the expert's turns
    image_pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_views = sum(1 for a, b in itertools.pairwise(tokens) if b == image_pad and a != image_pad)
    assert n_views == len(trajectory.turns)  # the overview plus one view per tool turn
    assert out["mm_train_inputs"]["image_grid_thw"].shape[0] == n_views
    assert out["reward"] == pytest.approx(trajectory.reward)  # replayed through the env, same reward
    assert out["extra_logs"]["medeyes/is_expert"] == 1.0 and out["rollout_log_probs"] == [0.0] * len(tokens)
    budget = len(prompt_ids) + 5
    short = asyncio.run(
        replay_expert(backend, formatter, qwen, prompt, row["label"], trajectory, budget, row["images"])
    )
    assert short["truncated"] and short["action_ranges"] == [(len(prompt_ids), len(prompt_ids) + 5)]


class _RecordingExecutor(MedEyesExecutorMixin):
    """Stands in for OpenRLHF's MultiTurnAgentExecutor (the next class in the real MRO): records policy calls."""

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.policy_calls: list[Any] = []

    async def run_policy_episode(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images):
        self.policy_calls.append(sampling_params)
        await asyncio.sleep(0)
        return {"extra_logs": {"medeyes/is_expert": 0.0}, "stop": sampling_params.stop}


@dataclass
class _Params:
    """The attributes of vLLM SamplingParams the executor touches."""

    max_tokens: int | None = None
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False


def test_gathered_samples_get_stream_slots_in_start_order(export, qwen):
    config, _, rows = export
    backend = _backend(config)
    executor = _RecordingExecutor(backend)
    n = backend.n_samples_per_prompt
    row = rows[0]
    prompt = render_prompt_row(qwen, row)

    async def group() -> list[dict[str, Any]]:  # what RolloutRayActor.generate_responses does
        calls = [
            executor.execute(prompt, row["label"], _Params(), 4096, qwen, None, row["images"]) for _ in range(2 * n)
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(group())
    streams = [r["extra_logs"]["medeyes/is_expert"] for r in results]
    assert streams == ([0.0] * backend.group_on + [1.0] * backend.group_off) * 2
    assert all(r["stop"] == ["</action>", "</answer>"] for r in results if "stop" in r)
    eval_label = CaseLabel.parse(row["label"]).model_copy(update={"expert": False}).dumps()
    assert asyncio.run(executor.execute(prompt, eval_label, _Params(), 4096, qwen, None))["extra_logs"] == {
        "medeyes/is_expert": 0.0
    }
    with pytest.raises(ConfigError, match="must be combined with MultiTurnAgentExecutor"):
        asyncio.run(MedEyesExecutorMixin(backend).execute(prompt, eval_label, _Params(), 4096, qwen, None))


# ------------------------------------------------------------------------------------------------ loss


def _loss_batch():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 6, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]]).bool()
    adv_rows = torch.tensor([1.0, -0.5, 0.7, -1.2])
    is_expert = torch.tensor([False, False, True, True])
    return logp, old, mask, adv_rows, is_expert


def test_loss_adapter_delegates_to_dual_stream_loss():
    logp, old, mask, adv_rows, is_expert = _loss_batch()
    config = ObjectiveConfig(off_policy_shaping=True)
    token_adv = adv_rows[:, None] * mask  # OpenRLHF's [B, A] advantages
    assert torch.equal(row_advantages(token_adv, mask), adv_rows)
    loss_fn = DualStreamPolicyLoss(config)
    info: dict[str, Any] = {}
    loss_fn.bind(is_expert, info)
    loss, clip_ratio, ppo_kl, vllm_kl, filtered = loss_fn(logp, old, token_adv, action_mask=mask)
    expected, metrics = dual_stream_loss(logp, old, adv_rows, mask, is_expert, config)
    assert loss.item() == pytest.approx(expected.item()) and vllm_kl is None and filtered is None
    assert clip_ratio.item() == pytest.approx(metrics["stream/on/clip_frac"])
    on = mask & ~is_expert[:, None]
    assert ppo_kl.item() == pytest.approx(((old - logp.detach())[on]).mean().item())
    assert set(info) == {"medeyes/" + k for k in LOSS_LOG_KEYS} and info["medeyes/stream/off/rows"].item() == 2.0
    loss.backward()
    assert logp.grad[~mask].abs().sum() == 0 and logp.grad[mask].abs().sum() > 0


def test_loss_adapter_global_normalisation_matches_one_big_batch():
    logp, old, mask, adv_rows, is_expert = _loss_batch()
    for aggregation in ("seq_mean_token_mean", "token_mean"):
        config = ObjectiveConfig(aggregation=aggregation)
        whole, _ = dual_stream_loss(logp, old, adv_rows, mask, is_expert, config)
        loss_fn = DualStreamPolicyLoss(config)
        total = 0.0
        for rows in (slice(0, 1), slice(1, 4)):  # two micro-batches of one optimizer step, DeepSpeed sums them
            loss_fn.bind(is_expert[rows])
            part, *_ = loss_fn(
                logp[rows],
                old[rows],
                adv_rows[rows, None] * mask[rows],
                action_mask=mask[rows],
                dp_size=1,
                batch_num_tokens=mask.sum().float(),
                global_batch_size=torch.tensor(4.0),
            )
            total += part.item()
        assert total == pytest.approx(whole.item(), rel=1e-6), aggregation


def test_loss_adapter_unbound_is_on_policy_and_checks_rows():
    logp, old, mask, adv_rows, _ = _loss_batch()
    loss, *_ = DualStreamPolicyLoss()(logp, old, adv_rows[:, None] * mask, action_mask=mask)
    expected, _ = dual_stream_loss(logp, old, adv_rows, mask, torch.zeros(4, dtype=torch.bool), ObjectiveConfig())
    assert loss.item() == pytest.approx(expected.item())
    loss_fn = DualStreamPolicyLoss()
    loss_fn.bind(torch.tensor([True]))
    with pytest.raises(ValueError, match="bound is_expert has 1 rows, the micro-batch 4; rebind per batch"):
        loss_fn(logp, old, adv_rows[:, None] * mask, action_mask=mask)


# ------------------------------------------------------------------------------------------------ advantages


@dataclass
class _Experience:
    """The fields of OpenRLHF's Experience that the advantage step reads and writes."""

    index: list[int]
    rewards: Any
    action_mask: Any
    info: dict[str, Any]
    advantages: Any = None
    returns: Any = None
    kl: Any = None


def test_advantages_are_per_stream_in_prompt_order():
    config = ObjectiveConfig()
    # two prompts x (2 on-policy + 2 expert), as OpenRLHF orders them: sample i of prompt p is row p*4+i
    rewards = torch.tensor([0.0, 1.0, 0.9, 0.9, 1.0, 1.0, 0.2, 0.8])
    flags = torch.tensor([False, False, True, True] * 2)
    adv, stats = stream_advantages(rewards, flags, 4, config)
    expected, _ = compute_advantages(rewards, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), flags, config)
    assert torch.allclose(adv, expected)
    assert stats["stream/off/sigma_zero_groups"] == 1.0  # prompt 0's expert rewards are equal: the known hole
    # micro-batches hold samples out of order (OpenRLHF's index says where each came from)
    order = [[5, 0, 3], [7, 1], [2, 6, 4]]
    experiences = [
        _Experience(
            index=idx,
            rewards=rewards[idx],
            action_mask=torch.ones(len(idx), 3),
            info={"medeyes/is_expert": flags[idx].float()},
        )
        for idx in order
    ]
    assign_dual_stream_advantages(experiences, 4, config)
    for e in experiences:
        assert torch.allclose(e.advantages[:, 0], expected[e.index]) and torch.equal(e.advantages, e.returns)
        assert set(ADVANTAGE_LOG_KEYS) <= {k.removeprefix("medeyes/") for k in e.info}
    with pytest.raises(ValueError, match="7 rewards do not form groups of n_samples_per_prompt=4"):
        stream_advantages(rewards[:7], flags[:7], 4, config)


# ------------------------------------------------------------------------------------------------ CLI, imports, hook


def test_cli_help_export_and_command(export, tmp_path):
    import typer

    from medeyes.cli.openrlhf import openrlhf_app

    app = typer.Typer()
    app.add_typer(openrlhf_app, name="openrlhf")
    runner = CliRunner()
    for args in (["openrlhf", "--help"], ["openrlhf", "export", "--help"], ["openrlhf", "command", "--help"]):
        assert runner.invoke(app, args).exit_code == 0
    config, _, _ = export
    common = [
        "--preset",
        "tiny",
        "--run-dir",
        str(config.train.run_dir),
        "--set",
        f"expert.dir={config.train.expert.dir}",
        "--gpus-per-node",
        "2",
    ]
    refused = runner.invoke(app, ["openrlhf", "export", *common, "--set", "grpo.tool_floor=0.2"])
    assert refused.exit_code == 2 and "set grpo.tool_floor=null, or train with `medeyes train`" in refused.stderr
    result = runner.invoke(app, ["openrlhf", "command", *common])
    assert result.exit_code == 0 and "--train.agent_func_path" in result.stdout and "warning" not in result.stderr
    if not preflight():
        pytest.skip("this machine can run OpenRLHF; --run would start training")
    result = runner.invoke(app, ["openrlhf", "command", *common, "--run"])
    assert result.exit_code == 2 and "cannot run OpenRLHF training on this machine" in result.stderr
    stale = runner.invoke(app, ["openrlhf", "command", *common, "--export-dir", str(tmp_path), "--run"])
    assert stale.exit_code == 2 and "the export does not match" in stale.stderr


def test_importing_medeyes_does_not_import_the_cluster_stack():
    code = (
        "import sys, medeyes.training.openrlhf, medeyes.training.openrlhf.export, medeyes.training.openrlhf.launch,"
        "medeyes.training.openrlhf.config, medeyes.cli.openrlhf;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'openrlhf', 'ray', 'deepspeed', 'vllm'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


LAUNCH_HINT = (
    "start the run with `medeyes openrlhf command ... --run` (or the command it prints: python -m "
    "medeyes.training.openrlhf.launch --medeyes-config <export>/medeyes_openrlhf.json ...), or `--launcher "
    "ray-job`, whose runtime env sets MEDEYES_OPENRLHF_CONFIG and worker_process_setup_hook="
    "medeyes.training.openrlhf.patches.install_openrlhf_patches; do not run openrlhf.cli.train_ppo_ray directly"
)


def test_patch_hook_fails_closed_without_config_and_is_clear_without_openrlhf(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDEYES_OPENRLHF_CONFIG", raising=False)
    with pytest.raises(ConfigError) as error:
        install_openrlhf_patches()
    assert str(error.value) == (
        "MedEyes OpenRLHF patch hook: no config ($MEDEYES_OPENRLHF_CONFIG is not set in this worker), so the "
        "MedEyes objective cannot be installed. Refusing to start: " + LAUNCH_HINT
    )
    # an explicit opt-out (on-policy runs on OpenRLHF's own loss) patches nothing, on purpose
    assert install_openrlhf_patches(BackendConfig(medeyes_loss=False).save(tmp_path / "off.json")) is False
    path = BackendConfig().save(tmp_path / "c.json")
    if "openrlhf" in sys.modules or __import__("importlib").util.find_spec("openrlhf"):
        pytest.skip("openrlhf is installed here")
    with pytest.raises(ConfigError, match=r"openrlhf is not installed; pip install openrlhf==0\.11\.2"):
        install_openrlhf_patches(path)


def test_agent_side_refuses_a_process_the_hook_did_not_reach(tmp_path, monkeypatch):
    monkeypatch.setattr(patches, "_HOOKED_CONFIG", [])
    path = BackendConfig().save(tmp_path / "medeyes_openrlhf.json")
    with pytest.raises(ConfigError) as error:
        require_patch_hook(path)
    assert str(error.value) == (
        "MedEyes OpenRLHF: medeyes_openrlhf.json trains with the MedEyes dual-stream loss, but this process was "
        "started without the MedEyes patch hook, so OpenRLHF would train with its stock PolicyLoss and group_norm "
        "advantages over mixed expert+policy groups. Refusing to start: " + LAUNCH_HINT
    )
    monkeypatch.setattr(patches, "_HOOKED_CONFIG", [(tmp_path / "other.json").resolve()])
    with pytest.raises(ConfigError, match="must come from the same export"):
        require_patch_hook(path)
    monkeypatch.setattr(patches, "_HOOKED_CONFIG", [path.resolve()])
    require_patch_hook(path)  # the hook ran with this config: no error


def test_backend_config_refuses_an_expert_stream_on_the_stock_loss(tmp_path):
    with pytest.raises(ValueError, match="medeyes_loss=false trains with OpenRLHF's own PolicyLoss"):
        BackendConfig(medeyes_loss=False, expert_file=tmp_path / "expert.jsonl")


def test_formatter_cache_keeps_one_formatter_for_copies_of_one_processor(export, qwen, idefics):
    # OpenRLHF ships hf_tokenizer with every generate_responses call: each call sees a new deserialised copy
    # (Ray serialises with cloudpickle, a gymnasium dependency, so it is here in every venv)
    executor = _RecordingExecutor(_backend(export[0]))
    copies = [cloudpickle.loads(cloudpickle.dumps(qwen)) for _ in range(5)]
    formatters = {id(executor.formatter_for(copy)) for copy in copies}
    assert len(formatters) == 1 and len(executor.formatters) == 1
    executor.formatter_for(idefics)  # another model is another entry
    assert len(executor.formatters) == 2
    small = FormatterCache(size=1)
    small.get(qwen), small.get(idefics)
    assert len(small) == 1 and small.get(idefics) is small.get(cloudpickle.loads(cloudpickle.dumps(idefics)))


def test_formatter_identity_changes_with_the_chat_template(qwen):
    changed = cloudpickle.loads(cloudpickle.dumps(qwen))
    changed.chat_template = qwen.chat_template + "{# edited #}"
    assert processor_identity(changed) != processor_identity(qwen)
    assert processor_identity(cloudpickle.loads(cloudpickle.dumps(qwen))) == processor_identity(qwen)


def test_kl_and_entropy_reduction_follows_the_medeyes_aggregation():
    calls = []

    def aggregate_loss(
        loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None
    ):
        calls.append(token_level_loss)
        return loss.sum()

    x, mask = torch.ones(2, 3), torch.ones(2, 3)
    reduce_like_medeyes(aggregate_loss, "seq_mean_token_mean")(x, mask, dp_size=1, batch_num_tokens=6.0)
    reduce_like_medeyes(aggregate_loss, "token_mean")(x, mask, dp_size=1, batch_num_tokens=6.0)
    assert calls == [False, True]
