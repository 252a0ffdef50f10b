"""Build small vision-language models with REAL architectures and random weights, fully offline, and load models.

:func:`build_tiny_model` writes a complete ``save_pretrained`` directory (weights, config, generation config,
processor with image processor, tokenizer and chat template) for Idefics3 (SmolVLM architecture, the embedded
default) or Qwen2.5-VL (the paper's backbone) at a :mod:`~medeyes.models.presets` size.
:func:`ensure_tiny_model` builds one into the cache (``$MEDEYES_CACHE``, default ``~/.cache/medeyes``) on first
use; :func:`load_policy_model` loads a built directory, an alias (``tiny``, ``tiny-qwen2_5_vl``, ...) or, only
when the user names one, a remote Hugging Face id.

Gotchas met here (transformers 5.24, torch 2.13 CPU, no torchvision):

1. Image processors: the default ``Idefics3ImageProcessor``/``Qwen2VLImageProcessor`` are the torchvision
   backends; without torchvision use ``Idefics3ImageProcessorPil``/``Qwen2VLImageProcessorPil``. They save
   under the same ``image_processor_type`` and ``AutoImageProcessor`` picks the PIL backend when torchvision is
   missing, so the saved directory works on machines with and without it. transformers 5.15 (OpenRLHF 0.11.2's
   pin) does neither without torchvision: its top-level PIL names and the Auto classes demand it.
   ``pil_processor_class`` imports the PIL classes from their own modules and ``load_processor`` assembles the
   processor from them.
2. ``Qwen2_5_VLProcessor`` requires a ``video_processor`` argument (``None`` is a TypeError) and
   ``Qwen2VLVideoProcessor`` needs torchvision. We save the directory in the layout of the released
   Qwen2.5-VL checkpoints: ``processor_config.json`` naming ``Qwen2_5_VLProcessor``, the image processor's
   ``preprocessor_config.json``, and NO video config (``AutoVideoProcessor`` then derives the video processor
   from the image config and the model type), so stock ``AutoProcessor`` and vLLM load it where torchvision
   is installed. Without torchvision, :func:`load_processor` builds ``ImageOnlyQwen2_5_VLProcessor`` (the same
   class minus the video attribute); that fallback serves real Qwen2.5-VL checkpoints too. Not verified here:
   the stock path with torchvision (the PyPI torchvision wheel does not load against the CPU torch build).
3. Idefics3 (FEASIBILITY 1-7): resample stays PIL LANCZOS (``resample: 1``); ``do_image_splitting=False`` and
   ``size.longest_edge == max_image_size.longest_edge == vision_config.image_size``, so one image is
   ``<fake_token_around_image><global-img>`` + ``<image>`` x ``image_seq_len`` + ``<fake_token_around_image>``;
   a non-square image is squashed to a square. ``image_seq_len`` must equal
   ``(image_size / patch_size)^2 / scale_factor^2`` or the model's image-token count check fails.
4. ``Idefics3Config`` keeps a deprecated top-level ``pad_token_id`` (default 128002, outside our vocabulary!);
   the one that matters is ``text_config.pad_token_id``; we set both, plus ``image_token_id``.
5. Qwen2.5-VL's ``mrope_section`` must sum to ``head_dim / 2``; bos/eos/pad go in ``text_config`` AND the
   generation config, or ``generate`` pads with id 0 and never stops at ``<|im_end|>``.
6. ``tokenizers`` BPE gives fewer tokens than asked when the corpus runs out of merges; the model's
   ``vocab_size`` is ``len(tokenizer)`` exactly, so no untrained, undecodable ids can be sampled.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medeyes.models.presets import ARCHS, PRESET_NAMES, Arch, ModelPreset, get_preset
from medeyes.models.processors import image_only_qwen_processor_class, load_processor, pil_processor_class
from medeyes.models.tokenizer import (
    IDEFICS3_SPECIAL_TOKENS,
    PROTOCOL_TAGS,
    QWEN2_5_VL_SPECIAL_TOKENS,
    train_bpe_tokenizer,
)
from medeyes_env.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

__all__ = [
    "FACTORY_VERSION",
    "MARKER_FILE",
    "build_tiny_model",
    "cache_dir",
    "chat_template",
    "default_model_dir",
    "ensure_tiny_model",
    "load_policy_model",
    "model_aliases",
    "resolve_model_path",
]

FACTORY_VERSION = 4
"""Bumped whenever a build changes, so cached models from an older factory are rebuilt, not reused."""

MARKER_FILE = "medeyes_model.json"
"""Written last into every built directory: its presence means the build completed."""

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def chat_template(arch: Arch) -> str:
    """Return the Jinja chat template shipped for ``arch`` (OpenAI-style content lists, several images)."""
    return importlib.resources.files("medeyes.models").joinpath("templates", f"{arch}.jinja").read_text()


def cache_dir() -> Path:
    """Root of MedEyes' local cache: ``$MEDEYES_CACHE`` or ``~/.cache/medeyes``."""
    return Path(os.environ.get("MEDEYES_CACHE") or Path.home() / ".cache" / "medeyes").expanduser()


def default_model_dir(arch: Arch = "idefics3", preset: str = "tiny") -> Path:
    """Where :func:`ensure_tiny_model` keeps the built model of ``arch`` at ``preset`` (seed 0)."""
    get_preset(arch, preset)
    return cache_dir() / "models" / f"{preset}-{arch}-v{FACTORY_VERSION}"


# --------------------------------------------------------------------------------------------- tokenizer


def _fast_tokenizer(arch: Arch, preset: ModelPreset) -> Any:
    from transformers import PreTrainedTokenizerFast

    if arch == "idefics3":
        raw = train_bpe_tokenizer(IDEFICS3_SPECIAL_TOKENS, preset.vocab_size)
        special = {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>"}
        extra = [t for t in IDEFICS3_SPECIAL_TOKENS if t not in special.values()]
    else:
        raw = train_bpe_tokenizer(QWEN2_5_VL_SPECIAL_TOKENS, preset.vocab_size)
        # Qwen2.5 uses <|endoftext|> as pad and (unused) bos, <|im_end|> as the chat eos.
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        extra = [t for t in QWEN2_5_VL_SPECIAL_TOKENS if t not in special.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        additional_special_tokens=extra,
        model_max_length=preset.max_position_embeddings,
        **special,
    )
    # Idefics3 prepends bos through its chat template (<|im_start|>); Qwen never adds bos.
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = False
    return tokenizer


# --------------------------------------------------------------------------------------------- builders


def build_idefics3(preset: ModelPreset) -> tuple[Any, Any]:
    """A random-weight Idefics3 model and its processor at ``preset``'s size (gotchas 1, 3 and 4 above)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    tokenizer = _fast_tokenizer("idefics3", preset)
    image_processor = pil_processor_class("Idefics3ImageProcessorPil")(
        do_image_splitting=False,
        size={"longest_edge": preset.image_size},
        max_image_size={"longest_edge": preset.image_size},
    )
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=preset.image_seq_len, chat_template=chat_template("idefics3")
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": preset.text_hidden_size,
            "intermediate_size": preset.text_intermediate_size,
            "num_hidden_layers": preset.text_layers,
            "num_attention_heads": preset.text_heads,
            "num_key_value_heads": preset.text_kv_heads,
            "max_position_embeddings": preset.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0,
            "tie_word_embeddings": preset.tie_word_embeddings,
            **ids,
        },
        vision_config={
            "hidden_size": preset.vision_hidden_size,
            "intermediate_size": preset.vision_intermediate_size,
            "num_hidden_layers": preset.vision_layers,
            "num_attention_heads": preset.vision_heads,
            "image_size": preset.image_size,
            "patch_size": preset.patch_size,
        },
        scale_factor=preset.scale_factor,
        image_token_id=processor.image_token_id,
        tie_word_embeddings=preset.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    return model, processor


def build_qwen2_5_vl(preset: ModelPreset) -> tuple[Any, Any]:
    """A random-weight Qwen2.5-VL model and its processor at ``preset``'s size (gotchas 1, 2 and 5 above)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _fast_tokenizer("qwen2_5_vl", preset)
    image_processor = pil_processor_class("Qwen2VLImageProcessorPil")(
        patch_size=preset.patch_size,
        merge_size=preset.merge_size,
        temporal_patch_size=2,
        size={"shortest_edge": preset.min_image_pixels, "longest_edge": preset.max_image_pixels},
    )
    processor = image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=chat_template("qwen2_5_vl"))
    tid = tokenizer.convert_tokens_to_ids
    mrope = preset.mrope_section or _default_mrope(preset)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": preset.text_hidden_size,
            "intermediate_size": preset.text_intermediate_size,
            "num_hidden_layers": preset.text_layers,
            "num_attention_heads": preset.text_heads,
            "num_key_value_heads": preset.text_kv_heads,
            "max_position_embeddings": preset.max_position_embeddings,
            "max_window_layers": preset.text_layers,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": preset.tie_word_embeddings,
        },
        vision_config={
            "depth": preset.vision_layers,
            "hidden_size": preset.vision_hidden_size,
            "intermediate_size": preset.vision_intermediate_size,
            "num_heads": preset.vision_heads,
            "patch_size": preset.patch_size,
            "spatial_merge_size": preset.merge_size,
            "temporal_patch_size": 2,
            "window_size": preset.window_size,
            "out_hidden_size": preset.text_hidden_size,
            "fullatt_block_indexes": list(preset.fullatt_block_indexes or []),
        },
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=preset.tie_word_embeddings,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, processor


def _default_mrope(preset: ModelPreset) -> list[int]:
    from medeyes.models.presets import default_mrope_section

    return default_mrope_section(preset.head_dim)


def build_tiny_model(
    arch: Arch = "idefics3", preset: str = "tiny", *, out_dir: Path, seed: int = 0, overwrite: bool = False
) -> Path:
    """Build a random-weight ``arch`` model at ``preset`` size into ``out_dir`` and return ``out_dir``.

    The directory holds everything ``from_pretrained`` needs: ``config.json``, ``generation_config.json``,
    ``model.safetensors``, the processor (image processor, tokenizer, ``chat_template.jinja``) and
    :data:`MARKER_FILE` with the preset, seed and factory version. Nothing is downloaded.

    Raises:
        ConfigError: unknown ``arch``/``preset``, or ``out_dir`` exists and is not empty (without ``overwrite``).

    """
    import torch
    from transformers import GenerationConfig

    spec = get_preset(arch, preset)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"model directory {out_dir} exists and is not empty; "
            "pick another directory or overwrite it (CLI: --overwrite)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = build_idefics3(spec) if arch == "idefics3" else build_qwen2_5_vl(spec)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if arch == "qwen2_5_vl":
        # Save as the stock Qwen2_5_VLProcessor (see gotcha 2): sub-processors, then the processor config.
        processor.image_processor.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "chat_template.jinja").write_text(processor.chat_template)
        (out_dir / "processor_config.json").write_text(
            json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n"
        )
    else:
        processor.save_pretrained(out_dir)
    marker = {
        "factory_version": FACTORY_VERSION,
        "arch": arch,
        "preset": spec.model_dump(),
        "seed": seed,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "image_seq_len": spec.image_seq_len,
        "vocab_size": len(tokenizer),
        "protocol_tags": PROTOCOL_TAGS,
    }
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


def ensure_tiny_model(arch: Arch = "idefics3", preset: str = "tiny") -> Path:
    """Return :func:`default_model_dir`, building the model there first if it is not complete yet.

    Safe with several processes: builds go to a temporary sibling directory that is renamed into place
    (atomic on one filesystem) under a file lock, so nobody ever sees a half-written model.
    """
    from filelock import FileLock

    target = default_model_dir(arch, preset)
    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / MARKER_FILE).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build_tiny_model(arch, preset, out_dir=tmp, seed=0, overwrite=True)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary directory
            if target.exists():  # an incomplete leftover of a crashed build
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------- loading


def model_aliases() -> dict[str, tuple[Arch, str]]:
    """Names that map to locally built models: ``tiny`` (Idefics3) and ``<preset>-<arch>`` for every preset.

    >>> model_aliases()["tiny"], model_aliases()["tiny-qwen2_5_vl"]
    (('idefics3', 'tiny'), ('qwen2_5_vl', 'tiny'))
    """
    aliases: dict[str, tuple[Arch, str]] = {}
    for preset in PRESET_NAMES:
        aliases[preset] = ("idefics3", preset)
        for arch in ARCHS:
            aliases[f"{preset}-{arch}"] = (arch, preset)
    return aliases


def resolve_model_path(name_or_path: str | Path) -> tuple[str, bool]:
    """Turn a model name into ``(path_or_repo_id, is_remote)``; build aliases on first use.

    Aliases (:func:`model_aliases`) never reach the network. An existing directory is local. A name shaped
    like ``org/name`` whose ``org`` is not a local directory is a remote Hugging Face id. Anything else is a
    missing local directory and raises :class:`ConfigError`.
    """
    name = str(name_or_path)
    aliases = model_aliases()
    if name in aliases:
        arch, preset = aliases[name]
        return str(ensure_tiny_model(arch, preset)), False
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model directory {path} has no config.json; build one with `medeyes model init --out {path}`"
            )
        return str(path), False
    if path.exists():
        raise ConfigError(f"model path {path} is a file, not a model directory; pass the directory that holds it")
    # "org/name" is a hub id unless its first part is a local directory ("checkpoints/step-100" is a typo, not
    # a download).
    if _HF_REPO_ID.match(name) and not name.startswith((".", "~")) and not Path(name.split("/")[0]).is_dir():
        return name, True
    raise ConfigError(
        f"model directory {path} not found; build one with `medeyes model init --out {path}`, "
        f"or use one of the built-in models: {', '.join(sorted(aliases))}"
    )


def load_policy_model(
    name_or_path: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load ``(model, processor)`` for generation and training, in eval mode on ``device``.

    Args:
        name_or_path: a built directory, an alias from :func:`model_aliases` (built into the cache on first use,
            never downloaded) or a remote id such as ``Qwen/Qwen2.5-VL-3B-Instruct`` (the only case that may
            reach the network).
        device: torch device string.
        dtype: ``None`` picks float32 on CPU and bfloat16 on CUDA; or a torch dtype or its name ("bfloat16").
        trust_remote_code: passed to transformers for remote models with custom code.

    Raises:
        ConfigError: the directory does not exist or is not a model directory (the message says how to build one).

    """
    import torch
    from transformers import AutoModelForImageTextToText

    path, remote = resolve_model_path(name_or_path)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"local_files_only": not remote, "trust_remote_code": trust_remote_code}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    processor = load_processor(path, **kwargs)
    return model, processor
