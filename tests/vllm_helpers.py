"""Shared pieces of the vllm-marked tests: the model they serve and the conversations they send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medeyes.agents.backends.vllm_server import vllm_cpu_preset
from medeyes.models.factory import build_tiny_model


def build_vllm_model(out_dir: Path) -> Path:
    """Build the test model with the project's factory: the smallest Idefics3 preset vllm-cpu runs, seed 0."""
    return build_tiny_model("idefics3", vllm_cpu_preset(), out_dir=out_dir, seed=0)


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
