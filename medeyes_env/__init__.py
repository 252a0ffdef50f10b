"""medeyes_env: a Gymnasium environment for progressive visual diagnosis (scan, drill, answer).

Light on purpose: numpy, pillow, shapely, pydantic and gymnasium only; no torch.
"""

from medeyes_env.cases import AnswerType, Box, Case, Region, xywh_to_xyxy
from medeyes_env.errors import MedEyesError
from medeyes_env.sources import CaseSource, available_sources, iter_cases, open_source

__version__ = "0.1.0"

__all__ = [
    "AnswerType",
    "Box",
    "Case",
    "CaseSource",
    "MedEyesError",
    "Region",
    "__version__",
    "available_sources",
    "iter_cases",
    "open_source",
    "xywh_to_xyxy",
]

from medeyes_env.registration import register_envs as _register_envs

_register_envs()
