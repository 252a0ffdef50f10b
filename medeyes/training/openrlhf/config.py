"""The OpenRLHF backend's configs and constants, one home for each.

The run (:class:`OpenRLHFConfig`, user side), what the workers share (:class:`BackendConfig`,
:class:`CaseLabel`), the export's file names, the pinned release and the log keys.

Everything here is plain data (pydantic models and constants); it does not import openrlhf.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medeyes.agents.policy import PROTOCOL_STOPS
from medeyes.training.config import PRESETS, TrainConfig, build_config
from medeyes.training.objective_config import ObjectiveConfig
from medeyes_env.env import EnvConfig
from medeyes_env.errors import ConfigError, RecordError
from medeyes_env.rewards import METRIC_COMPONENTS, REWARD_COMPONENTS

OPENRLHF_VERSION = "0.11.2"
"""The OpenRLHF release whose internals :func:`install_openrlhf_patches` was written and checked against."""

CONFIG_ENV = "MEDEYES_OPENRLHF_CONFIG"
"""Environment variable naming the :class:`BackendConfig` JSON file the Ray workers read."""

ALLOW_UNTESTED_ENV = "MEDEYES_OPENRLHF_ALLOW_UNTESTED"
"""Set to 1 to let :func:`install_openrlhf_patches` patch an OpenRLHF release other than :data:`OPENRLHF_VERSION`."""

SETUP_HOOK = "medeyes.training.openrlhf.patches.install_openrlhf_patches"
"""Import path of the Ray ``worker_process_setup_hook`` that installs the loss and advantage patches."""

# the export directory (medeyes.training.openrlhf.export writes it, the launch and the workers read it)
PROMPTS_FILE = "prompts.jsonl"
EVAL_FILE = "eval.jsonl"
EXPERT_FILE = "expert.jsonl"
BACKEND_FILE = "medeyes_openrlhf.json"
AGENT_FILE = "medeyes_agent.py"
IMAGES_DIR = "images"

LOG_PREFIX = "medeyes/"
EPISODE_LOG_KEYS: tuple[str, ...] = (
    "is_expert",
    "expert_missing",
    "error",
    "turns",
    "tool_turns",
    "used_scan",
    "used_drill",
    "malformed_turns",
    "answered",
    "env_truncated",
    "reward_total",
    *(f"r_{name}" for name in REWARD_COMPONENTS),
    *(f"m_{name}" for name in METRIC_COMPONENTS),
)
"""Per-episode numbers every sample reports in ``extra_logs`` (as ``medeyes/<key>``), always the same set:
OpenRLHF batches ``Experience.info`` key by key, so a key missing from one sample would break the batch."""

LOSS_LOG_KEYS: tuple[str, ...] = (
    "stream/on/rows",
    "stream/off/rows",
    "stream/on/tokens",
    "stream/off/tokens",
    "stream/on/pg_loss",
    "stream/off/pg_loss",
    "stream/on/clip_frac",
    "stream/on/ratio_mean",
    "stream/on/approx_kl",
    "stream/off/rho_mean",
    "stream/off/weight_mean",
)
"""Loss metrics :class:`DualStreamPolicyLoss` reports per micro-batch (0 where a stream is empty), fixed set."""

ADVANTAGE_LOG_KEYS: tuple[str, ...] = (
    "stream/on/samples",
    "stream/off/samples",
    "stream/on/reward_mean",
    "stream/off/reward_mean",
    "stream/on/adv_std",
    "stream/off/adv_std",
    "stream/on/sigma_zero_groups",
    "stream/off/sigma_zero_groups",
)
"""Advantage statistics of a rollout batch attached to every sample's info (the same value on each)."""


class BackendConfig(BaseModel):
    """What the OpenRLHF workers need to run MedEyes episodes and the dual-stream objective (one JSON file)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(default="phantom", description="Case source spec the labels refer to, e.g. phantom:easy.")
    data_options: dict[str, Any] = Field(
        default_factory=dict, description="Phantom only: PhantomConfig fields over the preset (as in TrainConfig)."
    )
    env: EnvConfig = Field(default_factory=EnvConfig, description="MedEyesEnv settings of every episode.")
    group_on: int = Field(default=8, ge=1, description="G_on: on-policy rollouts per prompt (paper 8).")
    group_off: int = Field(default=6, ge=0, description="G_off: expert trajectories per prompt (paper 6; 0: none).")
    expert_file: Path | None = Field(
        default=None, description="expert.jsonl written by the export (absolute path); None: no expert stream."
    )
    objective: ObjectiveConfig = Field(
        default_factory=ObjectiveConfig,
        description="Dual-stream objective. kl_coef and entropy_coef are applied by OpenRLHF's own flags.",
    )
    stop: list[str] = Field(
        default_factory=lambda: list(PROTOCOL_STOPS),
        description="Strings that end a policy turn (kept in the output); [] leaves vLLM's stopping alone.",
    )
    max_turn_tokens: int | None = Field(
        default=512, ge=1, description="Token cap per policy turn (OpenRLHF alone caps only the whole episode)."
    )
    feedback_images: bool = Field(
        default=True, description="Send the environment's view images back with the feedback (VLM processors)."
    )
    medeyes_loss: bool = Field(
        default=True,
        description="The run trains with the MedEyes dual-stream loss and per-stream advantages, so every worker "
        "refuses to start unless the MedEyes patch hook is installed (fail closed). False only for on-policy "
        "runs on OpenRLHF's own PolicyLoss and group_norm (OpenRLHFConfig.medeyes_loss=false).",
    )

    @model_validator(mode="after")
    def _check_stream(self) -> BackendConfig:
        if not self.medeyes_loss and self.expert_file is not None:
            raise ConfigError(
                "medeyes_loss=false trains with OpenRLHF's own PolicyLoss, which would treat the expert rows as "
                "on-policy samples; drop expert_file (on-policy mode) or keep medeyes_loss=true"
            )
        return self

    @property
    def n_samples_per_prompt(self) -> int:
        """``--rollout.n_samples_per_prompt``: G_on plus G_off when there is an expert stream."""
        return self.group_on + (self.group_off if self.expert_file is not None else 0)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as JSON (atomically enough for a file written once before a run)."""
        path = Path(path)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BackendConfig:
        """Read a config written by :meth:`save`; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"MedEyes OpenRLHF config {path} not found; run `medeyes openrlhf export` first")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ConfigError(f"{path} is not a valid MedEyes OpenRLHF config: {exc.errors()[0]['msg']}") from None


class CaseLabel(BaseModel):
    """The ``label`` of one prompt row: which case the episode runs on (OpenRLHF passes it through untouched)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Case source spec, e.g. phantom:easy.")
    split: Literal["train", "validation", "test"] = Field(description="Split of the case.")
    index: int = Field(ge=0, description="Index of the case in its split.")
    case_id: str = Field(description="Case.id, checked against the source at reset.")
    expert: bool = Field(default=False, description="Samples past G_on replay expert trajectories (train rows).")

    def dumps(self) -> str:
        """The label as the JSON string stored in the prompt file."""
        return self.model_dump_json()

    @classmethod
    def parse(cls, label: Any) -> CaseLabel:
        """Parse a label string (or dict) from a prompt row; a bad label is a :class:`RecordError`."""
        try:
            data = json.loads(label) if isinstance(label, str) else label
            return cls.model_validate(data)
        except (json.JSONDecodeError, ValidationError, TypeError) as exc:
            raise RecordError(
                f"prompt label {str(label)[:120]!r} is not a MedEyes case label ({type(exc).__name__}); "
                "export the prompts with `medeyes openrlhf export` and pass --data.label_key label"
            ) from None


# ================================================================================================ the run

OPENRLHF_PRESET_OVERRIDES: dict[str, Any] = {"grpo.old_logprobs": "recompute"}
"""Set on a preset an OpenRLHF run starts from: OpenRLHF's actor recomputes pi_old before each update."""


def openrlhf_preset(name: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The training preset ``name`` for an OpenRLHF run: :data:`OPENRLHF_PRESET_OVERRIDES`, then ``overrides``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build_config(PRESETS[name](), {**OPENRLHF_PRESET_OVERRIDES, **(overrides or {})})


def _setting(value: Any) -> str:
    """A value as ``--set`` spells it: ``null``, ``0``, ``recompute``."""
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def refuse_unimplemented(train: TrainConfig) -> None:
    """Refuse the training settings the OpenRLHF path does not implement, unless at their no-op value.

    >>> refuse_unimplemented(openrlhf_preset("paper"))  # the paper's settings all run on OpenRLHF
    >>> try:
    ...     refuse_unimplemented(openrlhf_preset("paper", {"grpo.tool_floor": 0.2}))
    ... except ConfigError as error:
    ...     print(str(error)[-55:])
    set grpo.tool_floor=null, or train with `medeyes train`
    """
    g, objective = train.grpo, train.objective
    unimplemented = [  # (setting, value, no-op values, why)
        ("grpo.curiosity_coef", g.curiosity_coef, (0.0,), "the curiosity bonus is added in the single-process "
         "trainer's scoring; curiosity_threshold and curiosity_scope only act with it"),
        ("grpo.skip_flat_groups", g.skip_flat_groups, ("off",), "OpenRLHF trains on every row of a rollout batch"),
        ("grpo.tool_floor", g.tool_floor, (None, 0.0), "the tool-collapse alarm is the single-process trainer's"),
        ("grpo.old_logprobs", g.old_logprobs, ("recompute",), "OpenRLHF's actor recomputes pi_old before each "
         "update; it never uses the rollout's log-probs as pi_old"),
        ("objective.tis_cap", objective.tis_cap, (None,), "the launch does not ask OpenRLHF for the rollout "
         "log-probs truncated importance sampling weighs by"),
    ]  # fmt: skip
    found = [
        f"{name}={_setting(value)} ({why}): set {name}={_setting(noop[0])}"
        for name, value, noop, why in unimplemented
        if value not in noop
    ]
    if found:
        raise ConfigError(
            "the OpenRLHF backend does not implement " + "; ".join(found) + ", or train with `medeyes train`"
        )


class OpenRLHFConfig(BaseModel):
    """One OpenRLHF run of the MedEyes grpo stage: the training config plus cluster and launch settings.

    Everything that shapes the method (model, data, environment, G_on/G_off, objective, optimizer, sampling,
    expert data, evaluation, seed) comes from ``train``; the rest is how OpenRLHF lays the run on GPUs.
    """

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(
        default_factory=lambda: openrlhf_preset("paper"),
        description="The MedEyes training config (paper preset: Qwen2.5-VL-3B, lr 1e-6, G_on 8, G_off 6, KL 0; "
        "grpo.old_logprobs=recompute, what OpenRLHF does).",
    )
    export_dir: Path | None = Field(
        default=None, description="Where the export goes (a filesystem every node sees); None: <run_dir>/openrlhf-data."
    )
    nodes: int = Field(default=1, ge=1, description="Nodes for the actor (and vLLM when colocated).")
    gpus_per_node: int = Field(default=8, ge=1, description="GPUs per node.")
    vllm_engines: int | None = Field(
        default=None, ge=1, description="vLLM engines; None: one per GPU / vllm_tensor_parallel (colocated)."
    )
    vllm_tensor_parallel: int = Field(default=1, ge=1, description="GPUs per vLLM engine.")
    colocate: bool = Field(
        default=True,
        description="Hybrid engine: actor and vLLM share the GPUs (--train.colocate_all with sleep modes).",
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.5, gt=0.0, le=1.0, description="vLLM's share of GPU memory (lower when colocated)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage.")
    max_len: int = Field(
        default=8192, ge=256, description="--data.max_len: tokens of a whole episode (prompt, turns, feedback, images)."
    )
    micro_train_batch_size: int = Field(default=1, ge=1, description="Sequences per GPU per training forward.")
    micro_rollout_batch_size: int = Field(default=2, ge=1, description="Sequences per GPU per log-prob forward.")
    gradient_checkpointing: bool = Field(default=True, description="Activation checkpointing in the actor.")
    attn_implementation: str = Field(
        default="flash_attention_2", description="--ds.attn_implementation (eager, sdpa, flash_attention_2, ...)."
    )
    freeze_visual_encoder: bool = Field(default=False, description="Train only the language model.")
    feedback_images: bool = Field(default=True, description="Send each view image back with the feedback.")
    medeyes_loss: bool = Field(
        default=True,
        description="Patch in the dual-stream loss and per-stream advantages (needed for the expert stream). "
        "False: OpenRLHF's own PolicyLoss and group_norm advantages (on-policy mode only).",
    )
    save_steps: int | None = Field(
        default=None, description="Checkpoint every N steps; None: train.checkpoint_every (0 -> only the final model)."
    )
    python: str = Field(default="python3", description="Python executable of the cluster's environment.")
    extra_args: list[str] = Field(default_factory=list, description="More train_ppo_ray flags, appended verbatim.")

    @model_validator(mode="after")
    def _check(self) -> OpenRLHFConfig:
        refuse_unimplemented(self.train)
        world = self.nodes * self.gpus_per_node
        if self.colocate and world % self.vllm_tensor_parallel:
            raise ConfigError(
                f"colocate needs nodes*gpus_per_node ({world}) divisible by vllm_tensor_parallel "
                f"({self.vllm_tensor_parallel}); change one or set colocate=false"
            )
        if self.colocate and self.vllm_engines is not None and self.vllm_engines * self.vllm_tensor_parallel != world:
            raise ConfigError(
                f"colocate needs vllm_engines*vllm_tensor_parallel == nodes*gpus_per_node, got "
                f"{self.vllm_engines}*{self.vllm_tensor_parallel} != {world}; set vllm_engines=None"
            )
        if not self.medeyes_loss and self.train.grpo.mode == "dual":
            raise ConfigError(
                "medeyes_loss=false uses OpenRLHF's PPO loss, which would treat expert rows as on-policy samples; "
                "set train.grpo.mode=on_policy or keep medeyes_loss=true"
            )
        return self

    # -------------------------------------------------------------------------------------------- derived

    @property
    def data_dir(self) -> Path:
        """The export directory (absolute)."""
        return (self.export_dir or self.train.run_dir / "openrlhf-data").resolve()

    @property
    def output_dir(self) -> Path:
        """Where OpenRLHF writes checkpoints, the final model and TensorBoard logs (absolute)."""
        return (self.train.run_dir / "openrlhf").resolve()

    @property
    def dual(self) -> bool:
        """Whether the run has an expert stream."""
        return self.train.grpo.mode == "dual"

    @property
    def engines(self) -> int:
        """Number of vLLM engines."""
        if self.vllm_engines is not None:
            return self.vllm_engines
        return max(1, self.nodes * self.gpus_per_node // self.vllm_tensor_parallel)

    def backend(self) -> BackendConfig:
        """The worker-side :class:`BackendConfig` of this run (written to the export as JSON)."""
        train = self.train
        return BackendConfig(
            data=train.data,
            data_options=train.data_options.model_dump(mode="json"),
            env=train.env,
            group_on=train.grpo.group_on,
            group_off=train.grpo.group_off if self.dual else 0,
            expert_file=self.data_dir / EXPERT_FILE if self.dual else None,
            objective=train.objective,
            stop=list(train.sampling.stop),
            max_turn_tokens=train.sampling.max_new_tokens,
            feedback_images=self.feedback_images,
            medeyes_loss=self.medeyes_loss,
        )
