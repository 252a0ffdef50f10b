"""Locally built vision-language models (random weights, real architectures) and model loading.

Importing this package does not import torch or transformers; the functions that need them do.
"""

from medeyes.models.factory import (
    build_tiny_model,
    cache_dir,
    default_model_dir,
    ensure_tiny_model,
    load_policy_model,
    load_processor,
    model_aliases,
    resolve_model_path,
)
from medeyes.models.presets import ARCHS, PRESET_NAMES, PRESETS, Arch, ModelPreset, get_preset

__all__ = [
    "ARCHS",
    "PRESETS",
    "PRESET_NAMES",
    "Arch",
    "ModelPreset",
    "build_tiny_model",
    "cache_dir",
    "default_model_dir",
    "ensure_tiny_model",
    "get_preset",
    "load_policy_model",
    "load_processor",
    "model_aliases",
    "resolve_model_path",
]
