"""``medeyes model``: build the locally made vision-language models and look inside model directories."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medeyes.cli.common import console, friendly_errors, safe

model_app = typer.Typer(
    name="model",
    help="Build tiny random-weight VLMs offline (Idefics3 / Qwen2.5-VL) and inspect model directories.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


class ArchChoice(str, Enum):
    """Architectures the factory builds."""

    idefics3 = "idefics3"
    qwen2_5_vl = "qwen2_5_vl"


class PresetChoice(str, Enum):
    """Size presets."""

    tiny = "tiny"
    small = "small"
    large = "large"


@model_app.command("init")
@friendly_errors
def init(
    arch: Annotated[ArchChoice, typer.Option(help="Architecture: idefics3 (SmolVLM) or qwen2_5_vl.")] = (
        ArchChoice.idefics3
    ),
    preset: Annotated[
        PresetChoice, typer.Option(help="Size: tiny (<1M params), small (~15M), large (~0.5B, GPU).")
    ] = PresetChoice.tiny,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory to write; default: the cache dir ($MEDEYES_CACHE or ~/.cache/medeyes)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights (with --out).")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Write into --out even if it is not empty.")] = False,
) -> None:
    """Build a random-weight model with its processor, tokenizer and chat template, fully offline."""
    from medeyes.models.factory import build_tiny_model, ensure_tiny_model

    if out is None:
        path = ensure_tiny_model(arch.value, preset.value)  # type: ignore[arg-type]
    else:
        path = build_tiny_model(arch.value, preset.value, out_dir=out, seed=seed, overwrite=overwrite)  # type: ignore[arg-type]
    console.print(f"built {preset.value} {arch.value} model in {safe(path)}")
    console.print(f"use it with --model {safe(path)}")


def model_info(name_or_path: str) -> dict[str, Any]:
    """Facts about a model directory or alias: architecture, parameters, vocabulary, image tokens per image."""
    import torch
    from PIL import Image

    from medeyes.models.factory import MARKER_FILE, load_policy_model, resolve_model_path

    path, _ = resolve_model_path(name_or_path)
    model, processor = load_policy_model(path)
    marker_file = Path(path) / MARKER_FILE
    marker = json.loads(marker_file.read_text()) if marker_file.is_file() else {}
    info: dict[str, Any] = {
        "path": path,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(processor.tokenizer),
        "dtype": str(model.dtype).removeprefix("torch."),
        "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "preset": marker.get("preset", {}).get("name", "-"),
        "seed": marker.get("seed", "-"),
    }
    for side in (128, 512):
        image_tokens, prompt_tokens = _image_tokens(processor, Image.new("RGB", (side, side)))
        info[f"image tokens ({side}x{side})"] = image_tokens
        info[f"prompt tokens per image ({side}x{side})"] = prompt_tokens
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return info


def _image_tokens(processor: Any, image: Any) -> tuple[int, int]:
    """Image tokens the vision encoder fills, and all prompt tokens one image adds (wrappers and template included)."""
    with_image = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "q"}]}]
    without = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    text_with = processor.apply_chat_template(with_image, tokenize=False, add_generation_prompt=True)
    text_without = processor.apply_chat_template(without, tokenize=False, add_generation_prompt=True)
    ids_with = list(processor(text=[text_with], images=[[image]])["input_ids"][0])
    ids_without = list(processor(text=[text_without])["input_ids"][0])
    return ids_with.count(processor.image_token_id), len(ids_with) - len(ids_without)


@model_app.command("info")
@friendly_errors
def info(
    path: Annotated[str, typer.Argument(help="Model directory, or a built-in name such as tiny or tiny-qwen2_5_vl.")],
) -> None:
    """Show a model's architecture, parameter count, vocabulary and image tokens per image."""
    facts = model_info(path)
    table = Table(title=safe(f"model {path}"), show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        table.add_row(safe(key), f"{value:,}" if key == "parameters" else safe(value))
    console.print(table)
