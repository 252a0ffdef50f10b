"""Loading a model's processor without torchvision: PIL image processors and an image-only Qwen2.5-VL processor.

Gotchas 1 and 2 of :mod:`medeyes.models.factory`'s docstring explain why each piece is here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medeyes_env.errors import ConfigError

if TYPE_CHECKING:
    from transformers import ProcessorMixin


def load_processor(path: str, *, local_files_only: bool = True, trust_remote_code: bool = False) -> ProcessorMixin:
    """Load a model's processor; Qwen2.5-VL without torchvision falls back to an image-only processor."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    if not is_torchvision_available() and _processor_class(path, kwargs) in {
        "Qwen2_5_VLProcessor",
        "Qwen2VLProcessor",
    }:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = _pil_image_processor(path, kwargs) or AutoImageProcessor.from_pretrained(path, **kwargs)
        template = getattr(tokenizer, "chat_template", None)
        template_file = Path(path) / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text()
        elif not local_files_only:
            template = _remote_chat_template(path, kwargs)
        return image_only_qwen_processor_class()(image_processor, tokenizer, chat_template=template)
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (ImportError, ValueError):
        fallback = None if is_torchvision_available() else _processor_on_pil(path, kwargs)
        if fallback is None:
            raise
        return fallback


def _local_processor_config(path: str) -> dict[str, Any]:
    """``processor_config.json`` of a local model directory, with the image processor's own config merged in."""
    local = Path(path)
    config: dict[str, Any] = {}
    if (local / "processor_config.json").is_file():
        config = json.loads((local / "processor_config.json").read_text())
    if "image_processor" not in config and (local / "preprocessor_config.json").is_file():
        config["image_processor"] = json.loads((local / "preprocessor_config.json").read_text())
    return config


def _pil_image_processor(path: str, kwargs: dict[str, Any]) -> Any:
    """The image processor on the PIL backend, by class name; None when the directory names none.

    transformers 5.15 (OpenRLHF 0.11.2's pin) resolves no image processor through the Auto classes without
    torchvision, even where a PIL class exists; from 5.16 they fall back to it themselves.
    """
    name = str(_local_processor_config(path).get("image_processor", {}).get("image_processor_type", ""))
    cls = pil_processor_class(name.removesuffix("Fast") + "Pil") if name else None
    return cls.from_pretrained(path, **kwargs) if cls is not None else None


@functools.cache
def pil_processor_class(name: str) -> type | None:
    """A PIL image-processor class from its own module (5.15's lazy top-level names demand torchvision)."""
    import importlib

    import transformers

    needle = f"class {name}("
    for file in sorted((Path(transformers.__file__).parent / "models").glob("*/image_processing_pil_*.py")):
        if needle in file.read_text():
            module = importlib.import_module(f"transformers.models.{file.parent.name}.{file.stem}")
            return getattr(module, name)
    return None


def _processor_on_pil(path: str, kwargs: dict[str, Any]) -> ProcessorMixin | None:
    """A local VLM's processor built from its parts with the PIL image processor (no torchvision)."""
    import transformers
    from transformers import AutoTokenizer

    config = _local_processor_config(path)
    cls = getattr(transformers, str(config.get("processor_class", "")), None)
    image_processor = _pil_image_processor(path, kwargs)
    if cls is None or image_processor is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    extra = {k: v for k, v in config.items() if k not in {"image_processor", "processor_class", "chat_template"}}
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **extra)


def _processor_class(path: str, kwargs: dict[str, Any]) -> str | None:
    """The ``processor_class`` a local or remote model directory declares, without loading anything heavy."""
    local = Path(path)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = local / name
        if not file.is_file() and not kwargs["local_files_only"]:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(hf_hub_download(path, name))
            except Exception:
                continue
        if file.is_file():
            found = json.loads(file.read_text()).get("processor_class")
            if found:
                return str(found)
    return None


def _remote_chat_template(path: str, kwargs: dict[str, Any]) -> str | None:
    from huggingface_hub import hf_hub_download

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            text = Path(hf_hub_download(path, name)).read_text()
        except Exception:
            continue
        return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


@functools.cache
def image_only_qwen_processor_class() -> type:
    """``ImageOnlyQwen2_5_VLProcessor``: ``Qwen2_5_VLProcessor`` without its video processor (built once)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without the video processor, for machines without torchvision.

        Its ``__init__`` signature has no ``video_processor``, which is how ``ProcessorMixin`` decides the
        sub-processors it needs. Images and text behave exactly as in the parent class.
        """

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None):
            self.video_token = "<|video_pad|>"
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
                self.image_token
            )
            super(Qwen2_5_VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)

        def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
            """Refuse: saving would write a processor stock transformers cannot load; save the source dir."""
            raise ConfigError(
                "ImageOnlyQwen2_5_VLProcessor is a load-time fallback; copy the model directory it was "
                "loaded from instead of saving it"
            )

    return ImageOnlyQwen2_5_VLProcessor
