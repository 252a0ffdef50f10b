"""Run a VLM's vision encoder once per distinct image of a batch, not once per row.

A GRPO group's G rollouts of one case all start from the same overview, so a batched prefill hands the
vision tower G identical images (and every later turn repeats the overview once per rollout). Inside
:func:`shared_image_encoding` the tower's ``forward`` sees only the distinct images (exact byte equality of
the pixels and the patch mask) and its output rows are gathered back to the original order; the gather's
backward sums the rows' gradients, so a training forward may use it too.

Supported: vision towers that take a batch of whole images ``[N, C, H, W]`` (Idefics3 / SmolVLM:
``model.model.vision_model``). Qwen2.5-VL's tower takes one flat patch sequence for all images and is left
as it is (:func:`vision_tower` returns None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The per-image vision encoder of ``model`` (Idefics3-style ``vision_model``), or None when unsupported."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_model", None)
    return tower if isinstance(tower, torch.nn.Module) else None


def distinct_rows(pixel_values: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], torch.Tensor]:
    """Indices of the first occurrence of each distinct image, and for every row the index of its copy.

    Rows are equal when their pixels (and mask rows, when given) are byte-identical.

    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    >>> distinct_rows(x, None)
    ([0, 1], tensor([0, 1, 0]))

    """
    keep: list[int] = []
    groups: dict[tuple[float, float], list[int]] = {}  # fingerprint -> indices into keep
    inverse = []
    flat = pixel_values.detach().reshape(pixel_values.shape[0], -1)
    flat_mask = None if mask is None else mask.detach().reshape(mask.shape[0], -1)
    # a cheap fingerprint (two weighted sums) only proposes candidates; torch.equal decides
    weights = torch.arange(flat.shape[1], device=flat.device, dtype=torch.float64).remainder(251) + 1
    sums = torch.stack([flat.double().sum(dim=1), flat.double() @ weights], dim=1).tolist()
    for row in range(flat.shape[0]):
        key = (sums[row][0], sums[row][1])
        match = None
        for candidate in groups.get(key, []):
            first = keep[candidate]
            if torch.equal(flat[row], flat[first]) and (
                flat_mask is None or torch.equal(flat_mask[row], flat_mask[first])
            ):
                match = candidate
                break
        if match is None:
            match = len(keep)
            keep.append(row)
            groups.setdefault(key, []).append(match)
        inverse.append(match)
    return keep, torch.tensor(inverse, dtype=torch.long)


class _DedupeForward:
    """Replaces a tower's ``forward`` for the duration of the context; counts rows seen and encoded."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.original = tower.forward
        self.rows_in = 0
        self.rows_encoded = 0

    def __call__(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        keep, inverse = distinct_rows(pixel_values, patch_attention_mask)
        self.rows_in += pixel_values.shape[0]
        self.rows_encoded += len(keep)
        if len(keep) == pixel_values.shape[0]:
            return self.original(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask, **kw)
        index = torch.tensor(keep, dtype=torch.long, device=pixel_values.device)
        mask = None if patch_attention_mask is None else patch_attention_mask.index_select(0, index)
        out = self.original(pixel_values=pixel_values.index_select(0, index), patch_attention_mask=mask, **kw)
        inverse = inverse.to(pixel_values.device)
        out.last_hidden_state = out.last_hidden_state.index_select(0, inverse)  # [N, tokens, dim]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h.index_select(0, inverse) for h in out.hidden_states)
        return out


@contextlib.contextmanager
def shared_image_encoding(model: torch.nn.Module, enabled: bool = True) -> Iterator[_DedupeForward | None]:
    """Within the block, ``model``'s vision tower encodes each distinct image of a call once (module docstring).

    Yields the counter (``rows_in``, ``rows_encoded``) or None when disabled or the model is unsupported.
    """
    tower = vision_tower(model) if enabled else None
    if tower is None or "forward" in vars(tower):  # unsupported, or already wrapped by an outer block
        yield None
        return
    wrapper = _DedupeForward(tower)
    tower.forward = wrapper  # type: ignore[method-assign]
    try:
        yield wrapper
    finally:
        del tower.forward
