"""What the OpenRLHF workers share: the backend config, the prompt label, the pinned release and log keys.

Everything here is plain data (pydantic models and constants); it does not import openrlhf.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medeyes.agents.policy import PROTOCOL_STOPS
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
