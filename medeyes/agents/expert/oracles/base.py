"""The oracle protocol: :class:`RegionOracle` (scan, drill, read), :class:`ScoredRegion`, :class:`OracleError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from medeyes_env.cases import Box, Case
from medeyes_env.errors import MedEyesError


class OracleError(MedEyesError, RuntimeError):
    """An oracle could not answer (e.g. its server is unreachable or replied with nonsense)."""


@dataclass(frozen=True)
class ScoredRegion:
    """A candidate region and the oracle's confidence that it holds an abnormality."""

    box: Box
    confidence: float
    label: str | None = None
    """What the oracle thinks the region shows, when it says (annotation oracle: the gold label)."""
    extent: float | None = None
    """The oracle's estimate of the finding's diameter in pixels, when it has one (the box may add margin)."""


@runtime_checkable
class RegionOracle(Protocol):
    """What the GRN expert asks: where to look, and how sure it is after looking closely."""

    name: str

    def scan(
        self,
        image: Image.Image,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[ScoredRegion]:
        """Candidate abnormal regions of the whole image, most confident first."""
        ...

    def drill(
        self,
        image: Image.Image,
        box: Box,
        question: str,
        *,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """Confidence in [0, 1] that ``box`` (original pixels) holds an abnormality, after a close look."""
        ...

    def read(
        self,
        image: Image.Image,
        question: str,
        options: Sequence[str],
        *,
        focus: Box | None = None,
        case: Case | None = None,
        rng: np.random.Generator | None = None,
    ) -> str | None:
        """Answer a question regions cannot inform (modality, ...) or return None when the oracle cannot."""
        ...

    def describe(self) -> dict[str, Any]:
        """The oracle's name and configuration, stored on every trajectory it helped make."""
        ...


def rng_or_default(rng: np.random.Generator | None) -> np.random.Generator:
    """``rng``, or a generator seeded with 0 when the caller gave none (so a call without ``rng`` is repeatable)."""
    return rng if rng is not None else np.random.default_rng(0)


def clip01(value: float) -> float:
    """``value`` clipped to [0, 1], as a Python float (a confidence).

    >>> clip01(1.5), clip01(-0.2), clip01(0.25)
    (1.0, 0.0, 0.25)
    """
    return float(min(1.0, max(0.0, value)))
