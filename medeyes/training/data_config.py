"""Where a run's data comes from: the phantom's options (``data_options``) and the expert demonstrations (``expert``).

Both option sets are fields over someone else's defaults: ``data_options`` over the phantom preset that ``data``
names, ``expert.oracle_options`` over the oracle that ``expert.oracle`` names. Their models are made from the
configs they override (:class:`~medeyes_env.sources.phantom.config.PhantomConfig`, the three oracle configs),
so ``medeyes train --help-config`` lists every field with its help and no field is written twice. A field left
out is ``None`` (the owner's own value), and a dump holds only the fields given: what ``open_cases`` and
``make_oracle`` take, and what the expert cache key has always hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator

from medeyes.agents.expert.config import ExpertConfig
from medeyes.agents.expert.oracles.annotation import AnnotationOracleConfig
from medeyes.agents.expert.oracles.factory import ORACLE_CONFIGS, OracleName
from medeyes.agents.expert.oracles.image import ImageOracleConfig
from medeyes.agents.expert.oracles.vlm import VLMOracleConfig
from medeyes_env.errors import ConfigError
from medeyes_env.sources.phantom.config import PhantomConfig

__all__ = ["OLD_EXPERT_KEYS", "ExpertAgentConfig", "ExpertDataConfig", "OracleOptions", "PhantomOptions"]


class GivenFields(BaseModel):
    """Fields over another config's defaults: a field left out is None, and a dump holds the fields given only."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if value is not None}


def _optional_fields(owners: dict[str, BaseModel], unset: str, defaults: bool = True) -> dict[str, Any]:
    """Every field of the ``owners`` (name -> a default instance) as ``T | None = None``, its help kept.

    A field several owners share is typed with each owner's type; its help names the owners (and their
    defaults, with ``defaults``) before each distinct description.
    """
    by_field: dict[str, list[tuple[str, BaseModel]]] = {}
    for owner, instance in owners.items():
        for name in type(instance).model_fields:
            by_field.setdefault(name, []).append((owner, instance))
    fields: dict[str, Any] = {}
    for name, entries in by_field.items():
        types = list(dict.fromkeys(type(instance).model_fields[name].annotation for _, instance in entries))
        by_help: dict[str, list[tuple[str, Any]]] = {}
        for owner, instance in entries:
            text = (type(instance).model_fields[name].description or "").rstrip(".")
            by_help.setdefault(text, []).append((owner, getattr(instance, name)))
        helps = []
        for text, owned in by_help.items():
            label = ", ".join(owner for owner, _ in owned) + ": " if len(owners) > 1 else ""
            same = len({repr(value) for _, value in owned}) == 1
            default = repr(owned[0][1]) if same else ", ".join(f"{owner} {value!r}" for owner, value in owned)
            helps.append(f"{label}{text}" + (f"; default {default}." if defaults else "."))
        description = " ".join(helps) + f" null: {unset}."
        fields[name] = (Union[(*types, None)], Field(default=None, description=description))
    return fields


PhantomOptions = create_model(
    "PhantomOptions",
    __base__=GivenFields,
    __doc__="``data_options``: :class:`PhantomConfig` fields over the phantom preset ``data`` names.",
    **_optional_fields({"phantom": PhantomConfig()}, "the preset's value", defaults=False),
)

OracleOptions = create_model(
    "OracleOptions",
    __base__=GivenFields,
    __doc__="``expert.oracle_options``: fields of the config of the oracle ``expert.oracle`` names.",
    **_optional_fields(
        {
            "annotation": AnnotationOracleConfig(),
            "perfect": AnnotationOracleConfig.perfect(),
            "image": ImageOracleConfig(),
            "vlm": VLMOracleConfig(),
        },
        "the oracle's own default",
    ),
)


def _problem(prefix: str, error: Any) -> str:
    """One pydantic error as ``prefix.field=value: message`` (``prefix: message`` for a rule across fields)."""
    where = ".".join(map(str, error["loc"]))
    return f"{prefix}.{where}={error['input']!r}: {error['msg']}" if where else f"{prefix}: {error['msg']}"


class ExpertAgentConfig(ExpertConfig):
    """The expert agent's settings (:class:`ExpertConfig`) in a run; ``t_max`` comes from ``env.max_steps``."""

    t_max: int = Field(default=4, ge=1, le=32, exclude=True, description="Not set here: max(1, env.max_steps).")


OLD_EXPERT_KEYS = {
    "per_case": "n_expert",
    "mode": "mode",
    "keep_only_correct": "keep_only_correct",
    "max_regions": "max_regions",
    "global_questions": "global_questions",
    "seed": "seed",
}
"""``expert.<old key>`` -> ``expert.agent.<field>``: the names before ``expert.agent``. A config that uses one is
refused with its new name; the expert cache key still spells them, so caches made before still match."""


class ExpertDataConfig(BaseModel):
    """Where the expert (GRN + CVS) trajectories come from, and how they are made when absent."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = Field(
        default=None, description="Trajectory store of expert demos; None: <run_dir>/../expert-<mode>-<data> cache."
    )
    generate_if_absent: bool = Field(default=True, description="Run the expert agent when the store is empty.")
    cases: int = Field(default=256, ge=1, description="Training cases to generate expert trajectories for.")
    oracle: OracleName = Field(
        default="annotation",
        description="Region oracle of the expert: annotation, perfect (noise-free annotation), image, vlm.",
    )
    oracle_options: OracleOptions = Field(  # type: ignore[valid-type]
        default_factory=OracleOptions,
        description="Fields of the oracle's config, e.g. {lookalikes: like_gold, distractors: 0} for annotation.",
    )
    reasoning: Literal["full", "brief"] = Field(
        default="full",
        description="full: train on the expert's narrated reasoning as generated; brief: re-render every expert "
        "turn with a two-word reasoning (same actions, boxes and answers), for small models and short token budgets.",
    )
    agent: ExpertAgentConfig = Field(
        default_factory=ExpertAgentConfig,
        description="The expert agent: mode, n_expert (N_expert, trajectories per case), seed (independent of the "
        "training seed, so runs share demos), ...; its tool turns are env.max_steps.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [key for key in OLD_EXPERT_KEYS if key in data]
            if old:
                moves = ", ".join(f"expert.{key} -> expert.agent.{OLD_EXPERT_KEYS[key]}" for key in old)
                raise ValueError(f"the expert agent's settings live under expert.agent: rename {moves}")
        return data

    @model_validator(mode="after")
    def _no_t_max(self) -> ExpertDataConfig:
        if "t_max" in self.agent.model_fields_set:
            raise ConfigError(
                f"expert.agent.t_max={self.agent.t_max} is not read: the expert's tool turns are "
                "max(1, env.max_steps); set env.max_steps instead"
            )
        return self

    @model_validator(mode="after")
    def _options_fit_the_oracle(self) -> ExpertDataConfig:
        given = self.oracle_options.model_dump()
        config = ORACLE_CONFIGS[self.oracle]
        for name in given:
            if name not in config.model_fields:
                owners = [oracle for oracle, other in ORACLE_CONFIGS.items() if name in other.model_fields]
                raise ValueError(
                    f"expert.oracle_options.{name} is a setting of the {' and '.join(owners)} "
                    f"oracle{'s' if len(owners) > 1 else ''}, not of expert.oracle={self.oracle!r}: remove it, "
                    f"or set expert.oracle={owners[0]}"
                )
        try:
            config(**given)
        except ValidationError as exc:
            problems = "; ".join(_problem("expert.oracle_options", error) for error in exc.errors())
            raise ValueError(f"{problems} (the {self.oracle} oracle's config)") from None
        return self
