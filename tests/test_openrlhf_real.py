"""The OpenRLHF backend against OpenRLHF 0.11.2's own classes, on CPU (marker ``openrlhf``; CI stage 5).

Runs in ``.venv-openrlhf`` (``bash scripts/install_openrlhf.sh``): the real openrlhf wheel with the transformers
it pins (5.15.0), real ray and deepspeed, and import stand-ins for vllm and flash_attn only
(``tests/openrlhf_stand_ins.py`` says why). What is not OpenRLHF's here, said plainly: vLLM's generation (a
scripted ``llm`` behind the real ``RolloutRayActor.generate``: gold protocol turns as token ids), the DeepSpeed
engine inside ``ppo_train`` (:class:`StandInStrategy`: plain backward with DeepSpeed's 1/gas scaling), the CUDA
barrier in ``ActorPPOTrainer.__init__``, and the reference model's log-probs (the actor's, shifted).

``python -m pytest -m openrlhf tests/test_openrlhf_real.py`` under that venv's python.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import runpy
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from openrlhf_stand_ins import install as install_stand_ins

pytestmark = pytest.mark.openrlhf
if importlib.util.find_spec("openrlhf") is None:  # checked before the stand-ins go into sys.modules
    pytest.skip("the openrlhf tests run in .venv-openrlhf (scripts/install_openrlhf.sh)", allow_module_level=True)
STOOD_IN = install_stand_ins()  # before anything imports openrlhf

import cloudpickle  # noqa: E402
import torch  # noqa: E402

from medeyes.models.factory import ensure_tiny_model  # noqa: E402
from medeyes.models.processors import load_processor  # noqa: E402
from medeyes.training.advantages import compute_advantages  # noqa: E402
from medeyes.training.objective import dual_stream_loss  # noqa: E402
from medeyes.training.objective_config import ObjectiveConfig  # noqa: E402
from medeyes.training.openrlhf import patches  # noqa: E402
from medeyes.training.openrlhf.chat import render_prompt_row  # noqa: E402
from medeyes.training.openrlhf.config import (  # noqa: E402
    AGENT_FILE,
    BACKEND_FILE,
    PROMPTS_FILE,
    BackendConfig,
    CaseLabel,
    OpenRLHFConfig,
    openrlhf_preset,
)
from medeyes.training.openrlhf.episode import open_case_source  # noqa: E402
from medeyes.training.openrlhf.export import export_openrlhf_data  # noqa: E402
from medeyes.training.openrlhf.launch import openrlhf_args  # noqa: E402
from medeyes.training.openrlhf.loss import DualStreamPolicyLoss  # noqa: E402
from medeyes.training.openrlhf.patches import install_openrlhf_patches  # noqa: E402
from medeyes_env.errors import ConfigError  # noqa: E402
from medeyes_env.protocol import Action, render_turn  # noqa: E402

MODULES = (
    "openrlhf.utils.agent",
    "openrlhf.utils.vlm_utils",
    "openrlhf.datasets.prompts_dataset",
    "openrlhf.trainer.ppo_utils.experience",
    "openrlhf.trainer.ray.vllm_engine",
    "openrlhf.trainer.ppo_utils.samples_generator",
    "openrlhf.models.loss",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ray.ppo_actor",
    "openrlhf.cli.train_ppo_ray",
)
MAX_LEN = 4096


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny dual-stream export (tiny Qwen2.5-VL), its backend config, prompt rows and the model directory."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("openrlhf-real")
    train = openrlhf_preset("tiny", {"run_dir": str(root / "run"), "model": "tiny-qwen2_5_vl"})
    train.expert.dir = root / "expert"
    config = OpenRLHFConfig(train=train, nodes=1, gpus_per_node=1, max_len=MAX_LEN)
    export_openrlhf_data(config)
    rows = [json.loads(line) for line in (config.data_dir / PROMPTS_FILE).read_text().splitlines()]
    backend = BackendConfig.load(config.data_dir / BACKEND_FILE)
    return SimpleNamespace(
        config=config, backend=backend, rows=rows, model_dir=str(ensure_tiny_model("qwen2_5_vl", "tiny"))
    )


@pytest.fixture(scope="module")
def processor(run):
    """The processor as OpenRLHF's ``get_tokenizer`` loads it, or MedEyes' loader where that cannot run here."""
    from openrlhf.utils.utils import get_tokenizer

    try:
        return get_tokenizer(run.model_dir, None, "left")
    except Exception:  # the stock Qwen2_5_VLProcessor needs torchvision, whose PyPI build needs CUDA torch
        return load_processor(run.model_dir)


@pytest.fixture(scope="module")
def hooked(run):
    """The patch hook run in this process, as Ray runs it in every worker; the agent file loaded by OpenRLHF."""
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    assert install_openrlhf_patches(run.config.data_dir / BACKEND_FILE) is True
    return _load_agent_executor(str(run.config.data_dir / AGENT_FILE))


def parse_with_train_ppo_ray(args: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``args`` through ``openrlhf.cli.train_ppo_ray``'s own parser and checks, stopping where training starts."""
    import openrlhf.utils
    import ray

    class Parsed(Exception):
        pass

    def capture(parsed: Any) -> None:
        raise Parsed(parsed)

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # train() would start Ray next
    monkeypatch.setattr(openrlhf.utils, "get_strategy", capture)  # train()'s first step after that
    monkeypatch.setattr(sys, "argv", ["train_ppo_ray", *args])
    with pytest.raises(Parsed) as parsed:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    return parsed.value.args[0]


def gold_turns(run: SimpleNamespace, label: str) -> list[str]:
    """A drill on the gold region, then the gold answer."""
    case_label = CaseLabel.parse(label)
    case = open_case_source(run.backend.data, run.backend.data_options).case(case_label.split, case_label.index)
    box = case.regions[0].box if case.regions else (0, 0, 32, 32)
    return [render_turn(Action.drill(box), "look closer"), render_turn(Action.final_answer(case.answer), "done")]


class ScriptedLLM:
    """Stands in for vLLM's ``AsyncLLMEngine.generate`` behind the real ``RolloutRayActor.generate``."""

    def __init__(self, tokenizer: Any, turns: list[str], wrong_every: int = 0) -> None:
        self.tokenizer = tokenizer
        self.turns = turns
        self.wrong_every = wrong_every  # every n-th final answer is wrong, so a group's rewards differ
        self.answers = 0
        self.calls: list[dict[str, Any]] = []

    async def generate(self, prompt: dict, sampling_params: Any, request_id: str):
        """vLLM's async generator of ``RequestOutput``; yields the final one."""
        ids = prompt["prompt_token_ids"]
        turn = self.tokenizer.decode(ids).count("<|im_start|>assistant") - 1
        text = self.turns[turn]
        if turn == len(self.turns) - 1:
            self.answers += 1
            if self.wrong_every and self.answers % self.wrong_every == 0:
                text = render_turn(Action.final_answer("unknown"), "guess")
        self.calls.append(
            {
                "stop": list(sampling_params.stop or []),
                "include_stop": sampling_params.include_stop_str_in_output,
                "max_tokens": sampling_params.max_tokens,
                "images": len((prompt.get("multi_modal_data") or {}).get("image", [])),
            }
        )
        await asyncio.sleep(0)
        token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        output = SimpleNamespace(token_ids=token_ids, text=text, finish_reason="stop", logprobs=None)
        yield SimpleNamespace(outputs=[output])


def rollout_actor(executor: Any, llm: ScriptedLLM, processor: Any) -> Any:
    """A ``RolloutRayActor`` (the class Ray wraps) with OpenRLHF's executor and a scripted vLLM engine."""
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    cls = RolloutRayActor.__ray_metadata__.modified_class
    actor = cls.__new__(cls)
    actor.executor, actor.llm = executor, llm
    actor._mm_pad_token_ids = {processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")}
    return actor


def sampling_params() -> Any:
    """What OpenRLHF's ``SamplesGenerator`` builds (vllm.SamplingParams)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=64, skip_special_tokens=False, logprobs=None)


# ------------------------------------------------------------------------------------------------ imports, command


def test_real_openrlhf_transformers_ray_deepspeed_and_only_two_stand_ins():
    import deepspeed
    import ray
    import transformers

    assert importlib.metadata.version("openrlhf") == "0.11.2"
    assert transformers.__version__ == "5.15.0"  # openrlhf's pin: the chat-template code runs under it here
    assert not hasattr(ray, "__medeyes_stand_in__") and not hasattr(deepspeed, "__medeyes_stand_in__")
    assert set(STOOD_IN) <= {"vllm", "flash_attn"}
    for module in MODULES:
        importlib.import_module(module)


def test_launch_command_parses_and_validates_under_train_ppo_ray(run, monkeypatch):
    args = parse_with_train_ppo_ray(openrlhf_args(run.config), monkeypatch)
    n = run.backend.n_samples_per_prompt
    assert (
        args.rollout.n_samples_per_prompt == n and args.train.batch_size == run.config.train.grpo.prompts_per_step * n
    )
    assert args.train.agent_func_path == str(run.config.data_dir / AGENT_FILE)
    assert args.reward.remote_url == ["agent"] and args.algo.advantage.estimator == "group_norm"
    assert args.actor.loss_agg_mode == "seq-mean-token-mean" and tuple(args.actor.eps_clip_low_high) == (0.2, 0.2)
    objective = ObjectiveConfig(kl_coef=0.01, entropy_coef=0.001)
    kl_run = run.config.model_copy(update={"train": run.config.train.model_copy(update={"objective": objective})})
    kl_args = parse_with_train_ppo_ray(openrlhf_args(kl_run), monkeypatch)
    assert kl_args.algo.kl.use_loss and kl_args.algo.kl.estimator == "k3" and kl_args.algo.kl.init_coef == 0.01
    assert kl_args.actor.entropy_coef == 0.001


# ------------------------------------------------------------------------------------------------ fail closed


def test_agent_file_refuses_to_load_where_the_hook_did_not_run(run, monkeypatch):
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    monkeypatch.setattr(patches, "_HOOKED_CONFIG", [])  # as in an engine launched by train_ppo_ray directly
    with pytest.raises(ConfigError) as error:
        _load_agent_executor(str(run.config.data_dir / AGENT_FILE))
    assert str(error.value) == (
        "MedEyes OpenRLHF: medeyes_openrlhf.json trains with the MedEyes dual-stream loss, but this process was "
        "started without the MedEyes patch hook, so OpenRLHF would train with its stock PolicyLoss and group_norm "
        "advantages over mixed expert+policy groups. Refusing to start: " + patches.LAUNCH_HINT
    )


def test_agent_file_of_an_explicit_opt_out_loads_without_the_hook(run, tmp_path, monkeypatch):
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    monkeypatch.setattr(patches, "_HOOKED_CONFIG", [])
    config = BackendConfig(data=run.backend.data, medeyes_loss=False).save(tmp_path / "medeyes_openrlhf.json")
    agent = (run.config.data_dir / AGENT_FILE).read_text().replace(str(run.config.data_dir / BACKEND_FILE), str(config))
    (tmp_path / AGENT_FILE).write_text(agent)
    executor = _load_agent_executor(str(tmp_path / AGENT_FILE))  # on-policy on OpenRLHF's own loss, on purpose
    assert executor.backend.medeyes_loss is False


def test_patched_trainer_refuses_advantages_the_patch_did_not_compute(hooked):
    pa = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    trainer = pa.ActorPPOTrainer.__new__(pa.ActorPPOTrainer)
    trainer.actor_loss_fn = DualStreamPolicyLoss()
    experience = SimpleNamespace(info={"medeyes/is_expert": torch.zeros(1)}, sequences=torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="this batch's advantages were not computed by the MedEyes patch"):
        trainer.training_step(experience, 0.0, 0, None)


# ------------------------------------------------------------------------------------------------ rollouts


@pytest.fixture(scope="module")
def responses(run, processor, hooked):
    """Every prompt row through the real ``RolloutRayActor.generate_responses``, the processor cloudpickled per call.

    Ray deserialises ``hf_tokenizer`` anew for every call, so each call here gets a fresh copy too.
    """
    out, llms = [], []
    for row in run.rows:
        llm = ScriptedLLM(processor.tokenizer, gold_turns(run, row["label"]), wrong_every=2)
        actor = rollout_actor(hooked, llm, processor)
        prompt = render_prompt_row(processor, row)
        copy = cloudpickle.loads(cloudpickle.dumps(processor))
        out += asyncio.run(
            actor.generate_responses(
                prompt=prompt,
                label=row["label"],
                sampling_params=sampling_params(),
                max_length=MAX_LEN,
                hf_tokenizer=copy,
                num_samples=run.backend.n_samples_per_prompt,
                images=row["images"],
            )
        )
        llms.append(llm)
    return out, llms


def test_prompt_matches_openrlhf_prompt_dataset(run, processor):
    from openrlhf.datasets.prompts_dataset import preprocess_data

    row = run.rows[0]
    prompt, label = preprocess_data(row, None, "prompt", "label", processor.apply_chat_template)
    assert prompt == render_prompt_row(processor, row) and label == row["label"]


def test_generate_responses_gives_two_streams_and_keeps_one_formatter(run, processor, hooked, responses):
    out, llms = responses
    backend = run.backend
    assert len(run.rows) >= 2  # so the formatter cache saw at least two deserialised processors
    flags = [r["extra_logs"]["medeyes/is_expert"] for r in out]
    assert flags == ([0.0] * backend.group_on + [1.0] * backend.group_off) * len(run.rows)
    assert len(hooked.formatters) == 1  # the leak: one formatter (and processor) per call before
    calls = [c for llm in llms for c in llm.calls]
    assert calls and all(c["stop"][-2:] == ["</action>", "</answer>"] and c["include_stop"] for c in calls)
    assert all(c["max_tokens"] <= backend.max_turn_tokens for c in calls)
    assert {c["images"] for c in calls} == {1, 2}  # overview, then overview + the drill view
    policy = next(r for r in out if not r["extra_logs"]["medeyes/is_expert"])
    text = processor.tokenizer.decode(policy["observation_tokens"])
    assert "</action><|im_end|>\n<|im_start|>user\n<|vision_start|>" in text and "<|im_end|><|im_end|>" not in text


def test_formatter_cache_would_leak_if_keyed_by_object(run, processor, hooked):
    # the regression the cache prevents, shown on the real executor: fresh copies are fresh objects
    copies = [cloudpickle.loads(cloudpickle.dumps(processor)) for _ in range(3)]
    assert len({id(c) for c in copies}) == 3
    assert len({id(hooked.formatter_for(c)) for c in copies}) == 1 and len(hooked.formatters) == 1


# ------------------------------------------------------------------------------------------------ experiences


@pytest.fixture(scope="module")
def launch_args(run):
    """The run's own command line, parsed by ``train_ppo_ray`` (KL and entropy on, so their reduction is tested)."""
    mp = pytest.MonkeyPatch()
    try:
        return parse_with_train_ppo_ray(openrlhf_args(run.config), mp)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def experiences(run, processor, responses, launch_args):
    """Responses -> Experiences by the real ``SamplesGenerator`` and ``split_rollout_samples``; patched advantages."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    em = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    assert getattr(em.RemoteExperienceMaker, "_medeyes_patched", False)
    generator = SamplesGenerator.__new__(SamplesGenerator)
    samples = [generator._process_response_into_experience(r, max_len=MAX_LEN) for r in responses[0]]
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.strategy = SimpleNamespace(args=launch_args)
    maker.args, maker.tokenizer, maker.advantage_estimator = launch_args, processor.tokenizer, "group_norm"
    micro = maker.split_rollout_samples(samples)
    maker.compute_advantages_and_returns(micro)
    return micro


def test_patched_advantages_are_the_per_stream_ones(run, responses, experiences):
    out = responses[0]
    rewards = torch.tensor([r["reward"] for r in out])
    flags = torch.tensor([bool(r["extra_logs"]["medeyes/is_expert"]) for r in out])
    groups = torch.arange(len(rewards)) // run.backend.n_samples_per_prompt
    expected, _ = compute_advantages(rewards, groups, flags, run.backend.objective)
    got = torch.cat([(m.advantages * m.action_mask).sum(1) / m.action_mask.sum(1) for m in experiences])
    assert rewards.std() > 0 and torch.allclose(got, expected.float(), atol=1e-6)


def test_loss_matches_openrlhf_policy_loss_on_on_policy_rows():
    from openrlhf.models.loss import PolicyLoss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 7, generator=g) * 2
    old = logp + 0.2 * torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    adv = torch.randn(3, 1, generator=g) * mask
    for aggregation, token_level in (("seq_mean_token_mean", False), ("token_mean", True)):
        info = {"dp_size": 2, "batch_num_tokens": mask.sum().float() * 1.5, "global_batch_size": torch.tensor(5.0)}
        theirs = PolicyLoss(0.2, 0.2, token_level_loss=token_level)(logp, old, adv, action_mask=mask, **info)
        ours = DualStreamPolicyLoss(ObjectiveConfig(aggregation=aggregation))(logp, old, adv, action_mask=mask, **info)
        assert torch.allclose(theirs[0], ours[0], atol=1e-6), (aggregation, theirs[0], ours[0])


# ------------------------------------------------------------------------------------------------ ppo_train


class StandInStrategy:
    """The DeepSpeed strategy as ``ppo_train`` uses it, on one CPU process, without stepping the optimizer.

    ``backward`` scales by ``1 / accumulated_gradient`` as DeepSpeed's engine does under gradient accumulation;
    ``optimizer_step`` only counts, so the accumulated gradient of one optimizer step can be compared.
    """

    def __init__(self, args: Any, accumulated_gradient: int) -> None:
        self.args = args
        self.accumulated_gradient = accumulated_gradient
        self.ring_attn_group = None
        self.optimizer_steps = 0

    def is_rank_0(self) -> bool:
        """One process."""
        return True

    def all_reduce(self, data: Any, op: str = "mean") -> Any:
        """One process: nothing to reduce."""
        return data

    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any) -> None:
        """DeepSpeed's engine.backward: the loss scaled by 1/gas."""
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer: Any, model: Any, scheduler: Any, name: str = "actor") -> None:
        """Counted, not taken."""
        self.optimizer_steps += 1

    def get_grad_norm(self, model: Any) -> float:
        """Not tracked."""
        return 0.0


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows])


def _info(item: Any, key: str) -> torch.Tensor:
    value = item.info[key]  # a tensor in a micro-batch, a list of per-row values once batched again
    values = value if isinstance(value, list) else [value]
    return torch.cat([torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in values])


def _forward(actor: Any, item: Any, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    from openrlhf.utils.vlm_utils import merge_mm_train_inputs

    mm = merge_mm_train_inputs(item.mm_train_inputs, "cpu") if item.mm_train_inputs else {}
    logp, output = actor(
        item.sequences, item.action_mask, attention_mask=item.attention_mask, return_output=True,
        return_entropy=entropy, **dict(mm),
    )  # fmt: skip
    width = item.action_mask.shape[1]
    return logp, (output.entropy[:, -width:] if entropy else None)


def test_ppo_train_gradient_equals_one_whole_batch_dual_stream_loss(run, experiences, monkeypatch):
    """Real patched ``ActorPPOTrainer.__init__`` and ``ppo_train`` (KL and entropy on) vs one ``dual_stream_loss``."""
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch, split_experience_batch

    pa = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    kl_coef, entropy_coef = 0.05, 0.01
    objective = run.backend.objective.model_copy(update={"kl_coef": kl_coef, "entropy_coef": entropy_coef})
    kl_run = run.config.model_copy(update={"train": run.config.train.model_copy(update={"objective": objective})})
    args = parse_with_train_ppo_ray(openrlhf_args(kl_run), monkeypatch)
    actor = Actor(run.model_dir, attn_implementation="eager", param_dtype="bf16")
    actor.model.float()
    with torch.no_grad():  # rollout log-probs, and a reference model that differs from the actor
        for micro in experiences:
            micro.action_log_probs = _forward(actor, micro)[0]
            micro.base_action_log_probs = micro.action_log_probs + 0.1 * torch.cos(micro.action_log_probs)
    items = [item for micro in experiences for item in split_experience_batch(micro)]
    micro_batch = 2
    strategy = StandInStrategy(args, accumulated_gradient=len(items) // micro_batch)
    monkeypatch.setattr(pa, "torch_dist_barrier_and_cuda_sync", lambda: None)  # a CUDA sync in __init__
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the replay buffer names cuda:0, unused
    params = [p for p in actor.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.0)
    trainer = pa.ActorPPOTrainer(
        strategy, actor, None, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0),
        micro_train_batch_size=micro_batch, buffer_cpu_offload=False, dataloader_pin_memory=False,
    )  # fmt: skip
    assert isinstance(trainer.actor_loss_fn, DualStreamPolicyLoss)  # installed by the patched __init__
    trainer.replay_buffer.target_device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # where ppo_train moves each micro-batch
    for micro in experiences:
        trainer.replay_buffer.append(micro)
    status = trainer.ppo_train(kl_coef)
    assert strategy.optimizer_steps == len(items) // micro_batch and "medeyes/stream/off/rows" in status
    got = [p.grad.detach().clone() for p in params]

    actor.zero_grad(set_to_none=True)
    items = [make_experience_batch([item]) for item in items]  # one row each, unpadded
    forwards = [_forward(actor, item, entropy=True) for item in items]
    width = max(item.action_mask.shape[1] for item in items)
    logp = _pad([f[0][0] for f in forwards], width)
    entropy = _pad([f[1][0] for f in forwards], width)
    old = _pad([i.action_log_probs[0] for i in items], width)
    ref = _pad([i.base_action_log_probs[0] for i in items], width)
    mask = _pad([i.action_mask[0].float() for i in items], width).bool()
    adv = torch.cat([_info(i, "medeyes/advantage") for i in items])
    expert = torch.cat([_info(i, "medeyes/is_expert") for i in items]) > 0.5
    loss, _ = dual_stream_loss(logp, old, adv, mask, expert, objective, ref_logprobs=ref, entropy=entropy)
    loss.backward()
    want = [p.grad.detach() for p in params]
    scale = max(w.abs().max().item() for w in want)
    worst = max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))
    print(f"ppo_train vs dual_stream_loss: max |grad difference| {worst:.2e} (max |grad| {scale:.2e})")
    assert scale > 0 and worst <= 1e-5 * scale
