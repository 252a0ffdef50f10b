"""Per-token log-probabilities and entropies of the taken tokens, computed in chunks so the vocabulary fits.

:func:`masked_token_logprobs` runs the model's forward pass only where the loss mask needs a prediction;
:func:`sequence_logprobs_from_logits` and :func:`entropy_from_logits` turn logits into the ``[B, T]`` values
the objective (:mod:`medeyes.training.objective`) consumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def _logit_chunks(logits: Tensor, temperature: float, chunk_size: int) -> Iterator[tuple[int, slice, Tensor]]:
    """Yield ``(row, positions, float32 logits / temperature)`` chunks of a ``[B, T, V]`` tensor.

    Slices along ``T`` within one row are views even when ``logits`` is a non-contiguous slice such as
    ``logits[:, :-1]``, so only one chunk is ever copied to float32 at a time.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    t = logits.shape[1]
    # unbind and split, not logits[row, pos]: the backward of an indexed slice writes its gradient into a
    # zero tensor of the whole [B, T, V] input, once per chunk (rows x positions); unbind's and split's
    # backward assemble the pieces once. Same values either way.
    if t == 0:
        return
    for row, row_logits in enumerate(logits.unbind(0)):
        for start, chunk in zip(range(0, t, chunk_size), row_logits.split(chunk_size, dim=0), strict=True):
            pos = slice(start, start + chunk.shape[0])
            x = chunk.float()  # [n, V]
            yield row, pos, (x / temperature if temperature != 1.0 else x)


def sequence_logprobs_from_logits(
    logits: Tensor, target_ids: Tensor, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Log-probability of each target token under ``softmax(logits / temperature)``.

    Memory-careful: works on ``chunk_size`` positions of one row at a time as ``gather(x) - logsumexp(x)`` in
    float32, never materialising a full ``[B, T, V]`` log-softmax. (Under autograd, ``logsumexp`` still
    keeps its float32 input of every chunk for the backward pass.)

    Args:
        logits: ``[B, T, V]`` logits where position ``t`` predicts ``target_ids[:, t]`` (already shifted).
        target_ids: ``[B, T]`` long token ids; negative ids (padding such as -100) give log-prob 0.
        temperature: The sampling temperature, so ratios are taken under the distribution that sampled.
        chunk_size: Token positions per chunk.

    Returns:
        ``[B, T]`` float32 log-probabilities.

    """
    if target_ids.shape != logits.shape[:2] or logits.dim() != 3:
        raise ValueError(
            f"target_ids has shape {tuple(target_ids.shape)} and logits {tuple(logits.shape)}; logits must be "
            "[B, T, V] and target_ids [B, T] with the same B and T (shift logits/labels before calling)."
        )
    valid = target_ids >= 0  # [B, T]
    safe_ids = torch.where(valid, target_ids, torch.zeros_like(target_ids))  # [B, T]
    rows: list[list[Tensor]] = [[] for _ in range(logits.shape[0])]
    for row, pos, x in _logit_chunks(logits, temperature, chunk_size):  # x: [n, V]
        tgt = x.gather(-1, safe_ids[row, pos, None]).squeeze(-1)  # [n]
        rows[row].append(tgt - torch.logsumexp(x, dim=-1))  # [n]
    lp = _stack_rows(rows, logits)  # [B, T]
    return torch.where(valid, lp, torch.zeros_like(lp))


def _stack_rows(rows: list[list[Tensor]], logits: Tensor) -> Tensor:
    if not rows or not rows[0]:
        return torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
    return torch.stack([torch.cat(chunks) for chunks in rows])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position, in chunks, in float32.

    ``H = logsumexp(x) - sum_v softmax(x)_v * x_v``.

    Args:
        logits: ``[B, T, V]``.
        temperature: Sampling temperature (> 0).
        chunk_size: Token positions per chunk.

    Returns:
        ``[B, T]`` float32 entropies (nats).

    """
    rows: list[list[Tensor]] = [[] for _ in range(logits.shape[0])] if logits.dim() == 3 else []
    for row, _, x in _logit_chunks(logits, temperature, chunk_size):  # x: [n, V]
        p = torch.softmax(x, dim=-1)  # [n, V]
        rows[row].append(torch.logsumexp(x, dim=-1) - (p * x).sum(dim=-1))  # [n]
    return _stack_rows(rows, logits)  # [B, T]


def masked_token_logprobs(
    model: torch.nn.Module, batch: Any, dtype: torch.dtype | None, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, T-1]`` of each next token (position t predicts ids[t+1]) where the loss mask needs them.

    The LM head and log-softmax run only at the positions that predict a loss token in some row (the union
    over the batch, passed to the model as ``logits_to_keep``); every other entry is 0. For the tiny model
    this cut the backward pass 4x (full-vocabulary logits of prompt and observation tokens dominated it).
    With ``with_entropy`` also returns the per-token entropy ``[B, T-1]`` (no grad) at the same positions.
    """
    targets = batch.loss_mask[:, 1:]  # [B, T-1]
    positions = targets.any(dim=0).nonzero().squeeze(1)  # [K] positions whose next token is trained somewhere
    shape = targets.shape
    if positions.numel() == 0:
        positions = torch.tensor([shape[1] - 1], device=targets.device)
    inputs = batch.model_inputs(dtype, causal_only=True)  # right padding: no mask needed, see collate
    logits = model(**inputs, logits_to_keep=positions).logits  # [B, K, V]
    next_ids = batch.input_ids[:, positions + 1]  # [B, K]
    picked = sequence_logprobs_from_logits(logits, next_ids)  # [B, K]
    logprobs = picked.new_zeros(shape).index_copy(1, positions, picked)  # [B, T-1]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            part = entropy_from_logits(logits.detach())  # [B, K]
            entropy = part.new_zeros(shape).index_copy(1, positions, part)
    return logprobs, entropy


def recompute_old_logprobs(
    model: torch.nn.Module, episodes: list[Any], pad_id: int, n_chunks: int, device: torch.device
) -> None:
    """Replace each episode's behaviour log-probs by the current model's (``grpo.old_logprobs="recompute"``).

    The caller puts the model in eval mode (and autocast); positions outside the loss mask stay 0.
    """
    from medeyes.models.episodes import collate

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for chunk in chunks(list(range(len(episodes))), n_chunks):
            batch = collate([episodes[i] for i in chunk], pad_id).to(device)
            logprobs, _ = masked_token_logprobs(model, batch, dtype)
            for row, i in enumerate(chunk):
                e = episodes[i]
                e.meta.setdefault("behaviour_logprobs", e.old_logprobs)  # what the engine recorded (TIS reads it)
                new = torch.zeros_like(e.old_logprobs)
                new[1:] = logprobs[row, : e.length - 1].float().cpu()
                e.old_logprobs = torch.where(e.loss_mask, new, torch.zeros_like(new))


def chunks(items: list, n: int) -> Iterator[list]:
    """Split ``items`` into ``n`` nearly equal consecutive parts (fewer when there are fewer items; none for none)."""
    if not items:
        return
    n = max(1, min(n, len(items)))
    size = math.ceil(len(items) / n)
    for i in range(0, len(items), size):
        yield items[i : i + size]
