"""Region oracles: what the expert asks before it moves its gaze (METHOD.md section 3).

One small protocol, :class:`RegionOracle`, with the two calls of the paper's GRN:

- ``scan(image, question) -> [ScoredRegion(box, confidence), ...]``: "Please locate all abnormal regions";
- ``drill(image, box, question) -> confidence``: "Is any abnormality in this region?"

and an optional third, ``read(image, question, options, focus) -> str | None``, for facts that
regions cannot tell (the imaging modality, say); an oracle that cannot read returns ``None``.

Three implementations:

- :class:`AnnotationOracle`: the case's gold regions seen through calibrated noise, plus plausible
  distractor regions inside the anatomy. Needs labels; the only oracle that sees ``case``.
- :class:`ImageOracle`: no labels. A classical blob detector (scale-normalised determinant of the
  Hessian over a few scales, FFT Gaussian filtering, robust z-scores against the image's own
  background) with confidence from the score; the drill re-measures the region at full resolution
  and checks that the blob is solid (a filled nodule, not a ring such as a vessel seen end-on).
- :class:`VLMOracle`: any OpenAI-compatible chat endpoint (``vllm serve``): boxes as JSON for a scan,
  the probability of "yes" from the first token's log-probabilities for a drill.

Every call takes ``case`` and ``rng`` keywords: the annotation oracle reads ``case`` and draws its
noise from ``rng`` (so one seed gives one trajectory); the others ignore what they do not need.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from medeyes.agents.oracles.annotation import AnnotationOracle, AnnotationOracleConfig, match_quality
from medeyes.agents.oracles.base import OracleError, RegionOracle, ScoredRegion
from medeyes.agents.oracles.image import ImageOracle, ImageOracleConfig, contrast_maps
from medeyes.agents.oracles.vlm import VLMOracle, VLMOracleConfig, fit_image, parse_regions, user_message
from medeyes_env.errors import ConfigError

__all__ = [
    "ORACLES",
    "AnnotationOracle",
    "AnnotationOracleConfig",
    "ImageOracle",
    "ImageOracleConfig",
    "OracleError",
    "OracleName",
    "RegionOracle",
    "ScoredRegion",
    "VLMOracle",
    "VLMOracleConfig",
    "contrast_maps",
    "fit_image",
    "make_oracle",
    "match_quality",
    "parse_regions",
    "user_message",
]

OracleName = Literal["annotation", "perfect", "image", "vlm"]
ORACLES: tuple[str, ...] = ("annotation", "perfect", "image", "vlm")


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
