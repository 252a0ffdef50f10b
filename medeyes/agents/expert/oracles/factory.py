"""Build a region oracle by name (``annotation``, ``perfect``, ``image``, ``vlm``): the one place names meet classes."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel

from medeyes.agents.expert.oracles.annotation import AnnotationOracle, AnnotationOracleConfig
from medeyes.agents.expert.oracles.base import RegionOracle
from medeyes.agents.expert.oracles.image import ImageOracle, ImageOracleConfig
from medeyes.agents.expert.oracles.vlm import VLMOracle, VLMOracleConfig
from medeyes_env.errors import ConfigError

__all__ = ["ORACLES", "ORACLE_CONFIGS", "OracleName", "make_oracle"]

OracleName = Literal["annotation", "perfect", "image", "vlm"]
ORACLES: tuple[str, ...] = ("annotation", "perfect", "image", "vlm")
ORACLE_CONFIGS: dict[str, type[BaseModel]] = {
    "annotation": AnnotationOracleConfig,
    "perfect": AnnotationOracleConfig,
    "image": ImageOracleConfig,
    "vlm": VLMOracleConfig,
}
"""The config class of each oracle (``perfect`` starts from :meth:`AnnotationOracleConfig.perfect`)."""


def make_oracle(name: str, **options: Any) -> RegionOracle:
    """Build an oracle by name: ``annotation``, ``perfect`` (noise-free annotation), ``image`` or ``vlm``.

    ``options`` are the fields of that oracle's config (e.g. ``base_url=`` for ``vlm``).
    """
    try:
        if name == "annotation":
            return AnnotationOracle(AnnotationOracleConfig(**options))
        if name == "perfect":
            return AnnotationOracle(AnnotationOracleConfig.perfect().model_copy(update=options))
        if name == "image":
            return ImageOracle(ImageOracleConfig(**options))
        if name == "vlm":
            return VLMOracle(VLMOracleConfig(**options))
    except ValueError as exc:
        raise ConfigError(f"invalid options for the {name!r} oracle: {exc}") from None
    close = difflib.get_close_matches(name, ORACLES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown oracle {name!r}.{hint} Choose one of {', '.join(ORACLES)}")
