"""The trainer's GRPO update against a bare PyTorch loop on the same padded batch and model (issue 24 item 4).

One GRPO batch is collected and scored the way the ``grpo`` stage does it (``GRPOStage.collect``, ``tokenise``,
``score``: rollouts of the tiny Idefics3 on phantom cases). Then, in alternating rounds in one process:

- **trainer**: ``GRPOStage.update`` on that batch: ``Learner.accumulate`` (collate, forward under the masked
  log-prob path, entropy, ``dual_stream_loss``, backward) and ``StageOptimizer.step`` (clip, AdamW, zero grad).
- **bare**: a plain loop on a copy of the same model and the same batch, collated once: forward (full logits),
  ``log_softmax`` gathered at the completion tokens, ``-(logp * advantage)`` masked mean, backward,
  ``torch.optim.AdamW.step``.
- **bare, kept logits**: the same loop asking the model for logits only at the positions that predict a
  completion token (``logits_to_keep``), the one saving the trainer's masked log-prob path makes: the
  tighter limit.

Tokens per second count the attention mask of the batch (prompt + completion tokens), as the trainer's
``train/tokens_per_second`` does. The trainer's pieces are also timed one by one (same calls as
``Learner.accumulate``) to show where the time goes, plus the old-log-prob recompute that
``grpo.old_logprobs=recompute`` adds before the update (not in the default run)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_vs_bare.py --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def build_stage(args: argparse.Namespace, cache: Path) -> Any:
    """A Trainer built from a config as ``medeyes train`` builds it; returns its GRPO stage."""
    from trl_compare import ours_config  # this script sits beside it; run as a script, benchmarks/ is on sys.path

    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.agents.policy import PolicyAgent
    from medeyes.models.factory import ensure_tiny_model, load_policy_model
    from medeyes.training.config import build_config
    from medeyes.training.metrics import MetricsLogger
    from medeyes.training.rollout_engine import make_rollout_engine
    from medeyes.training.run_setup import expert_pool, param_dtype_name, seed_everything
    from medeyes.training.trainer import Trainer
    from medeyes_env.sources import open_cases

    model_dir = str(ensure_tiny_model("idefics3", "tiny"))
    cfg = build_config(
        ours_config(model_dir, args, cache / "run", steps=1, train_cases=args.prompts, env_max_steps=args.env_max_steps)
    )
    seed_everything(cfg.seed)
    model, processor = load_policy_model(cfg.model, device=cfg.device, dtype=param_dtype_name(cfg))
    source = open_cases(cfg.data, cfg.data_options.model_dump())
    pool_cases, experts = expert_pool(cfg, source)
    logger = MetricsLogger(cfg.run_dir, tensorboard=False)
    policy = PolicyAgent(TransformersBackend(model, processor, device=cfg.device), cfg.sampling, name="policy")
    engine = make_rollout_engine(cfg, policy, param_dtype_name(cfg), 0)
    trainer = Trainer(cfg, model, processor, policy, source, experts, logger, pool_cases, None, engine)
    trainer.optim.ensure("grpo", None)
    return trainer.stages["grpo"]


def bare_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    adv: torch.Tensor,
    keep_completion_logits: bool = False,
) -> float:
    """Forward, token-level policy gradient (logp of completion tokens x advantage, masked mean), backward, step.

    ``keep_completion_logits``: ask the model for logits only at the positions that predict a completion token
    (``logits_to_keep``), the one saving the trainer makes; the plain loop computes logits at every position.
    """
    if keep_completion_logits:  # the LM head only where a completion token is predicted, as the trainer does
        positions = batch.loss_mask[:, 1:].any(dim=0).nonzero().squeeze(1)  # [K]
        logits = model(**batch.model_inputs(None, causal_only=True), logits_to_keep=positions).logits  # [B, K, V]
        targets, mask = batch.input_ids[:, positions + 1], batch.loss_mask[:, positions + 1].float()  # [B, K]
    else:
        logits = model(**batch.model_inputs(None, causal_only=True)).logits[:, :-1]  # [B, T-1, V]
        targets, mask = batch.input_ids[:, 1:], batch.loss_mask[:, 1:].float()  # [B, T-1]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    loss = -(logp * adv[:, None] * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def trainer_pieces(stage: Any, episodes: list, advantages: torch.Tensor, rows: list[int]) -> dict[str, float]:
    """Seconds of each piece of ``GRPOStage.update``, the same calls as ``Learner.accumulate`` in order."""
    from medeyes.models.episodes import collate
    from medeyes.training.logprobs import chunks, masked_token_logprobs
    from medeyes.training.objective import dual_stream_loss

    learner, objective = stage.learner, stage.objective
    out = {k: 0.0 for k in ("collate", "forward+logprobs+entropy", "loss", "backward", "optimizer step")}
    learner.model.train()
    for chunk in chunks(rows, stage.config.grad_accum):
        t = time.perf_counter()
        batch = collate([episodes[i] for i in chunk], learner.pad_id).to(learner.device)
        out["collate"] += time.perf_counter() - t
        t = time.perf_counter()
        with learner.autocast():
            logprobs, _ = masked_token_logprobs(learner.model, batch, learner.param_dtype(), with_entropy=True)
        out["forward+logprobs+entropy"] += time.perf_counter() - t
        t = time.perf_counter()
        adv = advantages[chunk].to(learner.device)
        loss, _ = dual_stream_loss(
            logprobs, batch.old_logprobs[:, 1:], adv, batch.loss_mask[:, 1:], batch.is_expert, objective
        )
        loss = loss * len(chunk) / len(rows)
        out["loss"] += time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        out["backward"] += time.perf_counter() - t
    t = time.perf_counter()
    learner.optim.step("grpo")
    out["optimizer step"] = time.perf_counter() - t
    return out


def logprob_head(stage: Any, batch: Any, rounds: int) -> dict[str, float]:
    """Seconds (min of ``rounds``) of the log-prob step alone, forward + backward to the logits, on the real logits.

    The trainer's ``sequence_logprobs_from_logits`` works one row and chunk at a time (so the vocabulary fits);
    each row's slice sends a full-size gradient back through its own slice, so the backward grows with rows x
    kept positions. Beside it: one batched ``log_softmax`` + ``gather``, and the no-grad entropy pass.
    """
    from medeyes.training.logprobs import entropy_from_logits, sequence_logprobs_from_logits

    positions = batch.loss_mask[:, 1:].any(dim=0).nonzero().squeeze(1)  # [K]
    with torch.no_grad():
        logits = stage.learner.model(**batch.model_inputs(None, causal_only=True), logits_to_keep=positions).logits
    targets = batch.input_ids[:, positions + 1]  # [B, K]
    out = {"kept positions": float(positions.numel())}
    for name in ("chunked (trainer)", "batched log_softmax", "entropy (no grad)"):
        best = float("inf")
        for _ in range(rounds):
            x = logits.detach().requires_grad_(True)
            t = time.perf_counter()
            if name.startswith("entropy"):
                with torch.no_grad():
                    entropy_from_logits(x.detach())
            else:
                lp = (
                    sequence_logprobs_from_logits(x, targets)
                    if name.startswith("chunked")
                    else torch.log_softmax(x.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
                )
                lp.sum().backward()
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def main() -> None:
    """Collect one batch, then time the trainer's update and the bare loop in alternating rounds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--env-max-steps", type=int, default=0, help="0: single turn, as trl_compare.py")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="phantom:easy")
    parser.add_argument(
        "--data-options", default='{"families": ["presence", "modality"], "image_size": 512, "lesion_radius": [20, 36]}'
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="medeyes-bare-"))
    os.environ.setdefault("MEDEYES_CACHE", str(cache / "cache"))
    try:
        run(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace, cache: Path) -> None:
    """The measurement (module docstring)."""
    from medeyes.models.episodes import collate
    from medeyes.training.logprobs import recompute_old_logprobs
    from medeyes.training.stages.grpo import score, tokenise

    stage = build_stage(args, cache)
    learner = stage.learner
    metrics: dict[str, float] = {}
    collected = stage.collect(0, metrics)
    episodes = tokenise(collected, learner.processor, None, metrics)
    advantages, rows = score(collected, episodes, stage.config, stage.objective, metrics)
    batch = collate([episodes[i] for i in rows], learner.pad_id).to(learner.device)
    tokens = int(batch.attention_mask.sum())
    completion = int(batch.loss_mask.sum())
    adv = advantages[rows].to(learner.device)
    bare_model = copy.deepcopy(learner.model).train()
    bare_opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=args.lr)
    kept_model = copy.deepcopy(learner.model).train()
    kept_opt = torch.optim.AdamW([p for p in kept_model.parameters() if p.requires_grad], lr=args.lr)
    print(
        f"batch: {len(rows)} rows x {batch.input_ids.shape[1]} positions, {tokens} tokens, {completion} completion "
        f"tokens; rollout {metrics['train/rollout_seconds']:.1f} s; torch threads {torch.get_num_threads()}"
    )

    trainer_s: list[float] = []
    bare_s: list[float] = []
    kept_s: list[float] = []
    pieces: list[dict[str, float]] = []
    recompute_s: list[float] = []
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        t = time.perf_counter()
        stage.update(0, episodes, advantages, rows, {})
        a = time.perf_counter() - t
        t = time.perf_counter()
        bare_step(bare_model, bare_opt, batch, adv)
        b = time.perf_counter() - t
        t = time.perf_counter()
        bare_step(kept_model, kept_opt, batch, adv, keep_completion_logits=True)
        k = time.perf_counter() - t
        p = trainer_pieces(stage, episodes, advantages, rows)
        learner.model.eval()
        t = time.perf_counter()
        with learner.autocast():
            recompute_old_logprobs(learner.model, episodes, learner.pad_id, stage.config.grad_accum, learner.device)
        c = time.perf_counter() - t
        if r:
            trainer_s.append(a)
            bare_s.append(b)
            kept_s.append(k)
            pieces.append(p)
            recompute_s.append(c)
        print(
            f"round {r}: trainer {a:.3f} s, bare {b:.3f} s, bare kept {k:.3f} s{'' if r else ' (warm-up)'}", flush=True
        )

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    t_tr, t_bare, t_kept = med(trainer_s), med(bare_s), med(kept_s)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; medians of {args.rounds} alternating rounds")
    print("| path | s per update | tokens/s | vs bare |\n|---|---:|---:|---:|")
    print(f"| trainer (GRPOStage.update) | {t_tr:.3f} | {tokens / t_tr:,.0f} | {t_bare / t_tr:.2f} |")
    print(f"| bare PyTorch loop | {t_bare:.3f} | {tokens / t_bare:,.0f} | 1.00 |")
    print(
        f"| bare, logits at completion positions only | {t_kept:.3f} | {tokens / t_kept:,.0f} | {t_bare / t_kept:.2f} |"
    )
    print("\nwhere the trainer's update goes (medians of the same rounds, timed piece by piece):")
    print("| piece | s | share |\n|---|---:|---:|")
    total = sum(med([p[k] for p in pieces]) for k in pieces[0])
    for k in pieces[0]:
        v = med([p[k] for p in pieces])
        print(f"| {k} | {v:.3f} | {v / total:.0%} |")
    print(f"| old-logprob recompute (grpo.old_logprobs=recompute only) | {med(recompute_s):.3f} | - |")
    head = logprob_head(stage, batch, 3)
    print(
        f"\nthe log-prob step alone on the real logits ({len(rows)} rows x {head.pop('kept positions'):.0f} kept "
        "positions), forward + backward to the logits, best of 3:"
    )
    print("| log-prob step | s |\n|---|---:|")
    for name, v in head.items():
        print(f"| {name} | {v:.3f} |")
    result = {
        "rows": len(rows),
        "positions": int(batch.input_ids.shape[1]),
        "tokens": tokens,
        "completion_tokens": completion,
        "trainer_seconds": trainer_s,
        "bare_seconds": bare_s,
        "bare_kept_seconds": kept_s,
        "ratio": t_bare / t_tr,
        "ratio_vs_kept": t_kept / t_tr,
        "pieces": pieces,
        "recompute_seconds": recompute_s,
        "logprob_head_seconds": head,
        "load_average": load,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    print(
        f"\ntrainer / bare tokens/s: {t_bare / t_tr:.2f} (target >= 0.8); vs the kept-logits loop {t_kept / t_tr:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
