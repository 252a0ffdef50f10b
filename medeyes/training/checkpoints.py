"""Resumable checkpoints that are data, never code: safetensors for tensors, JSON for everything else.

A run directory may come from someone else (a shared disk, a colleague's tarball), and ``medeyes train``
resumes by default, so nothing here unpickles. One checkpoint, ``<run_dir>/checkpoints/step-XXXXXXX/``::

    model.safetensors      the model's state dict
    optimizer.safetensors  every tensor of ``optimizer.state_dict()``, keyed by its path in it
    optimizer.json         the rest (param groups, nesting); a tensor is ``{"__tensor__": key}``
    rng.safetensors        the torch CPU generator state and one state per CUDA device
    rng.json               numpy's global MT19937 state and Python's ``random`` state, as integers
    state.json             step, stage, config and evaluation history

``<run_dir>/checkpoints/latest`` holds the name of the newest one, ``step-`` and digits, nothing else: an
absolute path, ``..`` or a symlink that leaves the run directory is refused with
:class:`~medeyes_env.errors.UnsafePathError`. A malformed file is a :class:`~medeyes_env.errors.RecordError`
naming it. Checkpoints of the earlier pickle format (``rng.pt``, ``optimizer.pt``) are refused, not read.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medeyes.training.config import TrainConfig
from medeyes_env.errors import ConfigError, RecordError, UnsafePathError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STEP_NAME = re.compile(r"step-[0-9]{7,12}")
"""What ``latest`` may contain: the name of a step directory next to it."""
MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest JSON file of a checkpoint read (the config and eval history are a few kB; the optimizer's a few kB)."""
MAX_DEPTH = 32
"""Deepest nesting of the optimizer structure accepted (torch's optimizers use 4)."""
LEGACY_FILES = ("rng.pt", "optimizer.pt")


def atomic_dir_write(final: Path, writer: Any) -> None:
    """Call ``writer(tmp)`` on a fresh directory next to ``final``, then move it to ``final`` in one rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        writer(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ================================================================================================ nested values


def encode_nested(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """``value`` as JSON-able data; each tensor goes to ``tensors`` under its path and is replaced by a reference.

    Dicts keep their key types (the optimizer's state is keyed by int), tuples stay tuples.

    >>> tensors = {}
    >>> encode_nested({0: {"step": torch.tensor(2.0)}, "betas": (0.9, 0.99)}, tensors)
    {'__dict__': [[0, {'__dict__': [['step', {'__tensor__': '0.step'}]]}], ['betas', {'__tuple__': [0.9, 0.99]}]]}
    >>> list(tensors)
    ['0.step']
    """
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise RecordError(f"cannot store a key of type {type(key).__name__} at {path or '<root>'}")
            items.append([key, encode_nested(item, tensors, f"{path}.{key}" if path else str(key))])
        return {"__dict__": items}
    if isinstance(value, tuple | list):
        encoded = [encode_nested(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        return {"__tuple__": encoded} if isinstance(value, tuple) else encoded
    raise RecordError(f"cannot store a {type(value).__name__} at {path or '<root>'} in a checkpoint")


def decode_nested(data: Any, tensors: dict[str, torch.Tensor], where: str, depth: int = 0) -> Any:
    """Inverse of :func:`encode_nested`; anything else raises :class:`RecordError` naming ``where``."""
    if depth > MAX_DEPTH:
        raise RecordError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode_nested(v, tensors, where, depth + 1) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        ((tag, inner),) = data.items()
        if tag == "__tensor__" and isinstance(inner, str):
            if inner not in tensors:
                raise RecordError(f"{where}: tensor {inner!r} is not in the checkpoint's safetensors file")
            return tensors[inner]
        if tag == "__tuple__" and isinstance(inner, list):
            return tuple(decode_nested(v, tensors, where, depth + 1) for v in inner)
        if tag == "__dict__" and isinstance(inner, list):
            out = {}
            for pair in inner:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int)):
                    raise RecordError(f"{where}: a dict entry must be [key, value], got {str(pair)[:80]}")
                out[pair[0]] = decode_nested(pair[1], tensors, where, depth + 1)
            return out
    raise RecordError(f"{where}: unexpected value {str(data)[:80]} (expected a tagged dict, list or scalar)")


# ================================================================================================ files


def read_json(path: Path) -> Any:
    """Parse a checkpoint JSON file; size, encoding, syntax and nesting errors become :class:`RecordError`."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise RecordError(f"{path}: {size:,} bytes, above the {MAX_JSON_BYTES:,}-byte limit of a checkpoint file")
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise RecordError(f"{path}: JSON nested too deeply") from None
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (a JSON header and raw buffers: nothing in it can run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecordError(f"{path}: missing from the checkpoint")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RecordError(f"{path}: not a valid safetensors file ({exc})") from None


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors with safetensors (cloned: tied weights share storage, which safetensors refuses)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, path)


# ================================================================================================ RNG states


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global generators' states: tensors (torch, CUDA) and JSON (numpy, Python)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    data = {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
    }
    return tensors, data


def set_rng_states(tensors: dict[str, torch.Tensor], data: Any, where: str) -> None:
    """Restore what :func:`rng_states` returned; a malformed state is a :class:`RecordError` naming ``where``."""
    try:
        numpy_state, python_state = data["numpy"], data["python"]
        keys = np.asarray(numpy_state["keys"], dtype=np.int64)
        if keys.shape != (624,) or keys.min() < 0 or keys.max() > 0xFFFFFFFF:
            raise ValueError("numpy keys must be 624 integers in [0, 2**32)")
        mt = python_state["state"]
        if not (isinstance(mt, list) and len(mt) == 625 and all(type(v) is int for v in mt)):
            raise ValueError("python state must be 625 integers")
        gauss = python_state["gauss_next"]
        if gauss is not None and type(gauss) is not float:
            raise ValueError("python gauss_next must be a float or null")
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(
            (
                str(numpy_state["kind"]),
                keys.astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
        random.setstate((int(python_state["version"]), tuple(mt), gauss))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise RecordError(f"{where}: malformed RNG state ({type(exc).__name__}: {exc})") from None


# ================================================================================================ checkpoints


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Any, extra: dict, keep: int) -> Path:
    """Write ``checkpoints/step-XXXXXXX`` atomically (model, optimizer, RNG states, ``extra``), then ``latest``."""
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        write_tensors(model.state_dict(), tmp / "model.safetensors")
        optimizer_tensors: dict[str, torch.Tensor] = {}
        encoded = encode_nested(optimizer.state_dict() if optimizer is not None else None, optimizer_tensors)
        write_tensors(optimizer_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(encoded))
        rng_tensors, rng_data = rng_states()
        write_tensors(rng_tensors, tmp / "rng.safetensors")
        (tmp / "rng.json").write_text(json.dumps(rng_data))
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2, default=str))

    atomic_dir_write(final, write)
    pointer = root / f".{LATEST_FILE}.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / LATEST_FILE)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None when there is none yet.

    Raises:
        UnsafePathError: ``latest`` names anything but a ``step-NNNNNNN`` directory inside ``run_dir``.
        RecordError: ``latest`` is unreadable.

    """
    root = run_dir / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if not pointer.exists() and not pointer.is_symlink():
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise UnsafePathError(f"{pointer} must be a plain file naming a step directory, not a link or directory")
    try:
        raw = pointer.read_bytes()[:4096].decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{pointer}: unreadable ({exc})") from None
    name = raw.strip()
    if not STEP_NAME.fullmatch(name):
        raise UnsafePathError(
            f"{pointer} names {name[:120]!r}; it must name a step directory next to it (step-0000025), never a path: "
            f"a checkpoint is only read from inside {run_dir}"
        )
    path = root / name
    inside = run_dir.resolve()
    resolved = path.resolve()
    if inside not in resolved.parents:
        raise UnsafePathError(f"{path} resolves to {resolved}, outside the run directory {inside}")
    return path if (path / "state.json").is_file() else None


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint (step, stage, config, eval history): read before any tensor is loaded."""
    legacy = [name for name in LEGACY_FILES if (path / name).exists()]
    if legacy:
        raise RecordError(
            f"{path} is in the old pickle format ({', '.join(legacy)}), which can run code when read and is no "
            "longer loaded; start over with --fresh (or resume=False)"
        )
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] < 0:
        raise RecordError(f"{path / 'state.json'}: expected an object with a non-negative integer 'step'")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load model weights and RNG states from ``path``; return its state (with the optimizer state dict)."""
    state = read_checkpoint_state(path)
    weights = read_tensors(path / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise RecordError(f"{path / 'model.safetensors'}: does not fit the model ({str(exc)[:300]})") from None
    set_rng_states(read_tensors(path / "rng.safetensors"), read_json(path / "rng.json"), str(path / "rng.json"))
    optimizer_tensors = read_tensors(path / "optimizer.safetensors")
    optimizer_json = path / "optimizer.json"
    optimizer = decode_nested(read_json(optimizer_json), optimizer_tensors, str(optimizer_json))
    if optimizer is not None and not (
        isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and "param_groups" in optimizer
    ):
        raise RecordError(f"{optimizer_json}: not an optimizer state (needs 'state' and 'param_groups')")
    state["optimizer"] = optimizer
    return state


VOLATILE_CONFIG = ("run_dir", "progress", "tensorboard", "threads")
"""Config fields a resumed run may change: where it writes and how it shows progress, not what it learns."""


def check_same_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The state of checkpoint ``path``, refused when another training config (``model_dump(mode="json")``) wrote it.

    Read before any tensor, so a mismatch costs no loading.

    Raises:
        ConfigError: the configs differ in a field outside :data:`VOLATILE_CONFIG`.

    """
    state = read_checkpoint_state(path)
    saved = dict(state.get("config", {}))
    # A config written before a field moved (expert.per_case -> expert.agent.n_expert) compares by meaning; one
    # that is not valid now stays as it is, and the comparison below refuses it.
    with contextlib.suppress(ValueError):
        saved = TrainConfig.model_validate(saved).model_dump(mode="json")
    now = dict(config)
    for volatile in VOLATILE_CONFIG:
        saved.pop(volatile, None)
        now.pop(volatile, None)
    if saved != now:
        run_dir = path.parent.parent
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different training config; resume with the same config, "
            "pass --fresh to start over, or choose another --run-dir"
        )
    return state


def save_final(final: Path, model: Any, processor: Any) -> None:
    """``save_pretrained`` model and processor to ``final`` atomically; a failure only warns (checkpoints hold it)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    try:
        atomic_dir_write(final, write)
    except Exception as exc:
        warnings.warn(f"could not save {final} ({exc}); the last checkpoint holds the weights", stacklevel=2)
