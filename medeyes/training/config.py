"""``TrainConfig``: everything one training run needs, as pydantic models loadable from YAML.

Defaults are the paper's where it gives a value (G_on = 8, G_off = 6, T_max = 4, clip 0.2, KL 0, AdamW,
lr 1e-6 for a 3B model); the values that make the embedded CPU default learn in minutes live in the
``cpu-default`` preset (:func:`preset`), which ``medeyes train`` uses when given nothing.

A run is a sequence of stages over one global step counter: ``sft`` (supervised warm start on expert
trajectories; the paper's SFT baseline) for ``sft.steps`` steps, then ``grpo`` (on-policy only or
dual-stream) for ``grpo.steps`` steps. A checkpoint records the global step, so a resumed run knows which
stage it is in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medeyes.agents.policy import SamplingConfig
from medeyes.training.grounding import GroundShape, GroundTask
from medeyes.training.objective_config import ObjectiveConfig
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError

Stage = Literal["ground", "sft", "grpo"]
ExpertMode = Literal["full", "greedy", "random", "scan_only", "drill_only"]


class OptimConfig(BaseModel):
    """AdamW with linear warmup, then constant or cosine decay (per optimizer step)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=1e-6, gt=0.0, description="Peak learning rate (paper: 1e-6 for Qwen2.5-VL-3B).")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW decoupled weight decay.")
    eps: float = Field(default=1e-8, gt=0.0, description="AdamW epsilon.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="After warmup: keep lr, or cosine-decay it to min_lr_ratio * lr."
    )
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Floor of the cosine schedule, x lr.")
    grad_clip: float | None = Field(default=1.0, gt=0.0, description="Clip the global grad norm; None: no clip.")


class SFTConfig(BaseModel):
    """Supervised warm start on expert trajectories (loss on the expert's turns only)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the sft stage (0 skips it).")
    batch_size: int = Field(default=16, ge=1, description="Expert trajectories per optimizer step.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step (batch_size split).")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field(
        default="token_mean",
        description="token_mean: every expert token weighs the same; seq_mean_token_mean: every trajectory "
        "weighs the same (short trajectories, e.g. direct answers, are not drowned by long ones).",
    )
    ground_examples: int = Field(
        default=0,
        ge=0,
        description="Ground-stage examples added to every SFT step (co-training), so learning the protocol does "
        "not wash out what the ground stage taught the model to see; needs a ground stage or ground.cases.",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


class GroundConfig(BaseModel):
    """Visual grounding warm-up on the training split's annotations (:mod:`medeyes.training.grounding`).

    For random-init models only: what a pretrained VLM already knows (where an object is, what a crop
    shows), taught on short single-image examples before SFT teaches when and where to look.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the ground stage (0 skips it).")
    batch_size: int = Field(default=32, ge=1, description="Examples per optimizer step.")
    cases: int = Field(default=1024, ge=1, description="Training cases rendered once into the example pool.")
    tasks: list[GroundTask] = Field(
        default_factory=lambda: ["where", "what"],
        description="where: overview -> every candidate's box; what: drill view of one candidate -> abnormal?",
    )
    jitter: float = Field(default=0.15, ge=0.0, le=1.0, description="SD of a what-crop's shift, in object sides.")
    system_prompt: bool = Field(
        default=False,
        description="Open each example with the environment's system prompt, as an episode opens (the image then "
        "sits where the policy sees it), at about 4x the tokens per example; False: image and question only.",
    )
    what_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Share of pool cases that also give a what-example (where: all)."
    )
    shape: GroundShape = Field(
        default="probe",
        description="probe: one image, a grounding question, a bare answer; turns: the same short examples, "
        "answered with the episode's own turns (scan turn, answer turn), so what is learned is in the policy's "
        "tokens; episode: the episode's whole context (scan, drill, the environment's views and feedback) before "
        "the target turn, about 5x the tokens (system_prompt is then the environment's choice).",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


class GRPOConfig(BaseModel):
    """On-policy or dual-stream GRPO (METHOD.md section 5)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the grpo stage (0 skips it).")
    mode: Literal["dual", "on_policy"] = Field(
        default="dual", description="dual: on-policy rollouts plus expert trajectories; on_policy: rollouts only."
    )
    prompts_per_step: int = Field(default=4, ge=1, description="Cases (GRPO groups) per optimizer step.")
    group_on: int = Field(default=8, ge=1, description="G_on: on-policy rollouts per case (paper 8).")
    group_off: int = Field(default=6, ge=0, description="G_off: expert trajectories per case (paper 6).")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches the step's rows are split into.")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        default="rollout",
        description="pi_old of the on-policy ratio: the log-probs recorded at generation, or a fresh no-grad "
        "forward pass before the update (immune to generation/training numeric or tokenisation gaps).",
    )
    curiosity_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Pixel Reasoner's curiosity bonus, alpha: an on-policy episode that used a tool gets "
        "alpha * max(curiosity_threshold - tool rate, 0) added to its reward before advantages (training only). "
        "0: off (paper); Pixel Reasoner uses 0.5.",
    )
    curiosity_threshold: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="H of the curiosity bonus: tool use is paid while the tool rate is below it (Pixel Reasoner 0.3).",
    )
    curiosity_scope: Literal["group", "batch"] = Field(
        default="group",
        description="Tool rate of the curiosity bonus: over the case's own G_on rollouts (Pixel Reasoner) or over "
        "every on-policy rollout of the step.",
    )
    skip_flat_groups: Literal["off", "on_rows", "group"] = Field(
        default="off",
        description="DAPO dynamic sampling, without resampling: leave out of the loss the groups whose on-policy "
        "rewards are all equal (their on-policy advantages are 0 and only dilute the mean). on_rows: drop their "
        "on-policy rows and keep their expert rows; group: drop both streams. off (paper): keep everything.",
    )
    tool_floor: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Tool-collapse alarm: when a step's on-policy tool share is below this, the progress line "
        "warns, alarm/tool_collapse is 1 and a warning is printed once. None: no alarm.",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


class ExpertDataConfig(BaseModel):
    """Where the expert (GRN + CVS) trajectories come from, and how they are made when absent."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(
        default=None, description="Trajectory store of expert demos; None: <run_dir>/../expert-<mode>-<data> cache."
    )
    generate_if_absent: bool = Field(default=True, description="Run the expert agent when the store is empty.")
    cases: int = Field(default=256, ge=1, description="Training cases to generate expert trajectories for.")
    per_case: int = Field(default=6, ge=1, description="N_expert: trajectories drawn per case (paper 6).")
    mode: ExpertMode = Field(
        default="full",
        description="full: GRN + CVS; greedy: GRN without CVS (argmax choices, one trajectory per case); "
        "random: the full expert's actions moved to random places (w/o GRN); "
        "scan_only / drill_only: one tool only (paper ablations).",
    )
    oracle: str = Field(default="annotation", description="Region oracle of the expert (annotation, image, vlm).")
    oracle_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Fields of the oracle's config, e.g. {lookalikes: like_gold, distractors: 0} for annotation.",
    )
    keep_only_correct: bool = Field(default=True, description="Keep only trajectories whose answer is correct.")
    max_regions: int = Field(default=5, ge=1, le=5, description="Most regions the expert shows in one scan (paper 5).")
    global_questions: Literal["look", "answer"] = Field(
        default="look",
        description="Questions no region can inform (modality): look like any other, or answer at once.",
    )
    seed: int = Field(
        default=0, description="Expert sampling seed (independent of the training seed, so runs share demos)."
    )
    reasoning: Literal["full", "brief"] = Field(
        default="full",
        description="full: train on the expert's narrated reasoning as generated; brief: re-render every expert "
        "turn with a two-word reasoning (same actions, boxes and answers), for small models and short token budgets.",
    )


class EvalConfig(BaseModel):
    """Held-out evaluation: greedy episodes on a fixed set of cases of the eval split."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=50, ge=0, description="Evaluate every this many steps (and at start and end); 0: never.")
    cases: int = Field(default=128, ge=1, description="Held-out cases per evaluation (the same ones each time).")
    batch_size: int = Field(default=64, ge=1, description="Episodes generated together during evaluation.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of evaluation (0: greedy).")


DataOption = str | int | float | bool | list[str | int | float | bool]
"""A value of ``data_options``: a scalar or a flat list (what PhantomConfig's fields take), nothing nested."""


class TrainConfig(BaseModel):
    """One training run: model, data, environment, stages, objective, logging and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(default=Path("runs/default"), description="Metrics, checkpoints and TensorBoard go here.")
    seed: int = Field(default=0, description="Seeds torch, numpy, Python, case order and sampling.")
    device: str = Field(default="cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Parameter dtype: auto = bfloat16 on CUDA, float32 on CPU."
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None: torch's default.")
    model: str = Field(
        default="tiny", description="Model alias (tiny, small-idefics3, ...), local directory or remote id."
    )
    data: str = Field(default="phantom", description="Case source spec, e.g. phantom, phantom:easy, slake:/path.")
    data_options: dict[str, DataOption] = Field(
        default_factory=dict,
        description="Phantom only: PhantomConfig fields over the preset, e.g. {families: [presence, modality]}.",
    )
    train_split: Literal["train", "validation", "test"] = Field(default="train", description="Cases to train on.")
    eval_split: Literal["train", "validation", "test"] = Field(default="test", description="Held-out cases.")
    train_cases: int | None = Field(
        default=None, ge=1, description="Cycle over the first N training cases; None: the whole split (or 10^6)."
    )
    stages: list[Stage] = Field(default_factory=lambda: ["sft", "grpo"], description="Stages, in order.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="MedEyesEnv settings (T_max, views, rewards).")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=96),
        description="How on-policy rollouts sample (paper: temperature 0.7-1.0).",
    )
    rollout_batch: int = Field(default=64, ge=1, description="Episodes generated together during rollouts.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Dual-stream GRPO loss.")
    ground: GroundConfig = Field(default_factory=GroundConfig, description="The ground stage (random-init models).")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="The sft stage.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="The grpo stage.")
    expert: ExpertDataConfig = Field(default_factory=ExpertDataConfig, description="Expert trajectories.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    log_every: int = Field(default=1, ge=1, description="Write metrics every this many steps.")
    checkpoint_every: int = Field(
        default=25, ge=0, description="Save a resumable checkpoint every N steps; 0: at the end only."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Most recent checkpoints kept on disk.")
    tensorboard: bool = Field(default=True, description="Also write TensorBoard event files to <run_dir>/tb.")
    progress: bool = Field(default=True, description="Show a rich progress bar with live reward and accuracy.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.stages:
            raise ConfigError("stages is empty; use ['sft'], ['grpo'] or ['sft', 'grpo']")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages {self.stages} repeats a stage; list each at most once")
        if self.grpo.mode == "dual" and "grpo" in self.stages and self.grpo.group_off == 0:
            raise ConfigError(
                "grpo.mode='dual' needs grpo.group_off >= 1 expert trajectories per case; or set grpo.mode=on_policy"
            )
        if self.grpo.group_on < 2 and "grpo" in self.stages:
            raise ConfigError(f"grpo.group_on={self.grpo.group_on}: GRPO needs >= 2 rollouts per case for a baseline")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps over all stages."""
        return sum(self.stage_steps(stage) for stage in self.stages)

    def stage_steps(self, stage: Stage) -> int:
        """Steps of ``stage`` (0 when it is not in ``stages``)."""
        if stage not in self.stages:
            return 0
        return {"ground": self.ground.steps, "sft": self.sft.steps, "grpo": self.grpo.steps}[stage]

    def optim(self, stage: Stage) -> OptimConfig:
        """The optimizer settings of ``stage``."""
        return {"ground": self.ground.optim, "sft": self.sft.optim, "grpo": self.grpo.optim}[stage]

    def stage_at(self, step: int) -> tuple[Stage, int]:
        """``(stage, step within the stage)`` of global step ``step`` (0-based)."""
        offset = 0
        for stage in self.stages:
            n = self.stage_steps(stage)
            if step < offset + n:
                return stage, step - offset
            offset += n
        return self.stages[-1], step - offset + self.stage_steps(self.stages[-1])

    # ---------------------------------------------------------------------------------------- YAML

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file (a mapping of fields, nested as the models are), then apply dotted ``overrides``.

        The file is parsed by :func:`medeyes.safe_yaml.load_yaml`: aliases, duplicate keys, deep nesting,
        non-UTF-8 bytes and syntax errors are :class:`ConfigError` naming ``FILE:LINE:COLUMN``.
        """
        from medeyes.safe_yaml import load_yaml

        path = Path(path)
        data = load_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
        preset_name = data.pop("preset", None)
        if preset_name is not None and not isinstance(preset_name, str):
            raise ConfigError(
                f"{path}: preset must be a name ({', '.join(PRESETS)}), got {type(preset_name).__name__} "
                f"{str(preset_name)[:80]}"
            )
        try:
            base = preset(preset_name).model_dump(mode="json") if preset_name else {}
            return build_config(_deep_merge(base, data), overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_yaml(self) -> str:
        """The full config as YAML (every field, defaults included)."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``grpo.steps``, ``objective.advantage_mode``) in a nested dict; returns a new dict.

    >>> apply_overrides({"grpo": {"steps": 1}}, {"grpo.steps": 5, "seed": 2})
    {'grpo': {'steps': 5}, 'seed': 2}
    """
    out = copy.deepcopy(data)  # never write into the caller's nested dicts
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[leaf] = value
    return out


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate ``data`` with dotted ``overrides`` applied; errors become :class:`ConfigError` naming the field."""
    try:
        return TrainConfig.model_validate(apply_overrides(data, overrides or {}))
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid training config: {exc}") from None


# -------------------------------------------------------------------------------------------- presets


def _cpu_default() -> dict[str, Any]:
    """The embedded default: tiny Idefics3 learns to look on the phantom ``look`` benchmark in <= 10 min on 2 cores.

    Task (``phantom:look``, 512 px images, 128 px views): every image holds one round object, a lesion or a
    lesion-like mimic with equal odds; only the mimic's lumen, visible at drill magnification and erased in
    the overview, tells them apart. Presence questions need a look; modality questions are read from the
    overview. Boxes are four location tokens (``env.box_format``: 16 bins per side), one class per
    coordinate, which the tiny model can learn where digit strings collapse (docs/learn_to_look.md).

    The expert (GRN + CVS over gold annotations) scans the object (a lookalike scores like a lesion at scan
    resolution), drills it, and answers from what the drill showed; it answers modality questions at once.
    SFT on those demonstrations, then dual-stream GRPO with LUFFY-style expert advantages.
    """
    return {
        "model": "tiny",
        "data": "phantom:look",
        "data_options": {},
        "threads": 1,
        "env": {
            "max_steps": 2,
            "view_size": 128,
            "drill_min_side": 64,
            "instructions": "brief",
            "box_format": {"kind": "loc", "bins": 16},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 48},
        "rollout_batch": 64,
        "stages": ["ground", "sft", "grpo"],
        "ground": {
            "steps": 1500,
            "batch_size": 32,
            "cases": 1024,
            "what_share": 1.0,
            "shape": "turns",  # answers in the episode's own tokens: presence 0.44 -> 0.83 on unseen cases
            "optim": {"lr": 3e-3, "warmup_steps": 10},
        },
        "sft": {
            "steps": 400,
            "batch_size": 8,
            "ground_examples": 0,
            "aggregation": "seq_mean_token_mean",
            "optim": {"lr": 2e-3, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1},
        },
        "grpo": {
            "steps": 40,
            "mode": "dual",
            "prompts_per_step": 4,
            "group_on": 8,
            "group_off": 4,
            "grad_accum": 2,
            "tool_floor": 0.2,
            "optim": {"lr": 2e-4},
        },
        "objective": {"advantage_mode": "on_baseline", "off_policy_shaping": True},
        "expert": {
            "cases": 512,
            "per_case": 2,
            "max_regions": 1,
            "reasoning": "brief",
            "global_questions": "answer",
            "oracle_options": {"lookalikes": "like_gold", "distractors": 0.0},
        },
        "eval": {"every": 500, "cases": 128, "batch_size": 128},
        "checkpoint_every": 20,
    }


def _tiny() -> dict[str, Any]:
    """A few seconds: tests and smoke runs."""
    data = _cpu_default()
    data.update(
        stages=["sft", "grpo"],  # tests/test_trainer.py adds "ground" where it tests that stage
        ground={"steps": 2, "batch_size": 4, "cases": 4, "optim": {"lr": 1e-3}},
        sft={"steps": 2, "batch_size": 2, "optim": {"lr": 1e-3}},
        grpo={"steps": 2, "mode": "dual", "prompts_per_step": 1, "group_on": 2, "group_off": 2, "optim": {"lr": 1e-3}},
        data_options={"image_size": 256},
        threads=1,
        expert={
            "cases": 4,
            "per_case": 2,
            "max_regions": 1,
            "reasoning": "brief",
            "oracle_options": {"lookalikes": "like_gold", "distractors": 0.0},
        },
        eval={"every": 2, "cases": 4, "batch_size": 4},
        sampling={"temperature": 1.0, "max_new_tokens": 16},
        rollout_batch=8,
        checkpoint_every=1,
        tensorboard=False,
        progress=False,
    )
    return data


def _paper() -> dict[str, Any]:
    """The paper's setting on one GPU: Qwen2.5-VL-3B, lr 1e-6, G_on 8, G_off 6, T_max 4 (no SFT stage)."""
    return {
        "model": "Qwen/Qwen2.5-VL-3B-Instruct",
        "device": "cuda",
        "dtype": "bfloat16",
        "stages": ["grpo"],
        "env": {"max_steps": 4},
        "sampling": {"temperature": 1.0, "max_new_tokens": 512},
        "grpo": {"steps": 500, "mode": "dual", "prompts_per_step": 8, "group_on": 8, "group_off": 6, "grad_accum": 8},
        "expert": {"cases": 4096, "per_case": 6},
        "eval": {"every": 50, "cases": 512, "batch_size": 64},
    }


PRESETS = {"cpu-default": _cpu_default, "tiny": _tiny, "paper": _paper}


def preset(name: str) -> TrainConfig:
    """A named configuration: ``cpu-default`` (the embedded default), ``tiny`` (tests) or ``paper`` (GPU)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build_config(PRESETS[name]())
