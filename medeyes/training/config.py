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
from medeyes.training.data_config import ExpertDataConfig, PhantomOptions
from medeyes.training.objective_config import ObjectiveConfig
from medeyes.training.stage_config import GroundConfig, GRPOConfig, HeldOutEvalConfig, OptimConfig, SFTConfig
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError

__all__ = [
    "PRESETS",
    "Stage",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "preset",
]

Stage = Literal["ground", "sft", "grpo"]


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
    data_options: PhantomOptions = Field(  # type: ignore[valid-type]
        default_factory=PhantomOptions,
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
    eval: HeldOutEvalConfig = Field(default_factory=HeldOutEvalConfig, description="Held-out evaluation.")
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
        if self.objective.tis_cap is not None and self.grpo.old_logprobs != "recompute":
            raise ConfigError(
                f"objective.tis_cap={self.objective.tis_cap:g} weights each token by exp(logp_train_old - "
                "logp_behaviour), but grpo.old_logprobs='rollout' makes pi_old the behaviour log-probs themselves "
                "(every weight would be 1); set grpo.old_logprobs=recompute, or objective.tis_cap=null"
            )
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
            "max_steps": 3,  # scan, drill, and a second drill when the first showed nothing (progressive looking)
            "view_size": 128,
            "drill_min_side": 64,
            "instructions": "brief",
            "box_format": {"kind": "loc", "bins": 16},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 48},
        "rollout_batch": 64,
        "stages": ["ground", "sft", "grpo"],
        **_cpu_default_stages(),
        "objective": {"advantage_mode": "on_baseline", "off_policy_shaping": True},
        "expert": {
            "cases": 512,
            "reasoning": "brief",
            "oracle_options": {"lookalikes": "like_gold", "distractors": 0.0, "bilateral": True},
            # scan both sides, drill one, then the other whatever the first showed (xi 1.0, no sub-region refinement):
            # with CVS's early stop the policy tied stopping to "yes" (mimic-only 0.75 on the development range)
            "agent": {
                "n_expert": 2,
                "max_regions": 2,
                "global_questions": "answer",
                "low_gain": "next",
                "xi": 1.0,
                "delta": 10.0,
            },
        },
        "eval": {"every": 1000, "cases": 128, "batch_size": 128},
        "checkpoint_every": 20,
    }


def _cpu_default_stages() -> dict[str, Any]:
    """The embedded default's ``ground``, ``sft`` and ``grpo`` stages (:func:`_cpu_default`)."""
    return {
        "ground": {
            "steps": 1500,  # 1800 -> 1500 pays for the second drill turn and 80 GRPO steps
            "batch_size": 32,
            "cases": 1024,
            "what_share": 1.0,
            "shape": "turns",  # answers in the episode's own tokens: presence 0.44 -> 0.83 on unseen cases
            "bilateral": True,  # where-targets name both sides, as the expert's scan does
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
            "steps": 80,
            "mode": "dual",
            "prompts_per_step": 4,
            "group_on": 8,
            "group_off": 4,
            "grad_accum": 2,
            "tool_floor": 0.2,
            "optim": {"lr": 2e-4},
        },
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
            "reasoning": "brief",
            "oracle_options": {"lookalikes": "like_gold", "distractors": 0.0},
            "agent": {"n_expert": 2, "max_regions": 1},
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
        "expert": {"cases": 4096, "agent": {"n_expert": 6}},
        "eval": {"every": 50, "cases": 512, "batch_size": 64},
    }


PRESETS = {"cpu-default": _cpu_default, "tiny": _tiny, "paper": _paper}


def preset(name: str) -> TrainConfig:
    """A named configuration: ``cpu-default`` (the embedded default), ``tiny`` (tests) or ``paper`` (GPU)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build_config(PRESETS[name]())
