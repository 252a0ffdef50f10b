"""Setting up a run before its first step: the run directory, the seeds, the precision, the expert pool.

:func:`medeyes.training.trainer.train` calls these in order, then builds the :class:`Trainer` from what they return.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from medeyes.training.checkpoints import CHECKPOINTS_DIR, latest_checkpoint
from medeyes.training.config import TrainConfig
from medeyes.training.expert_data import ExpertPool, ensure_expert_trajectories
from medeyes_env.sources import CaseSource


def open_run_dir(cfg: TrainConfig, resume: bool) -> Path | None:
    """Create ``run_dir`` and write its ``config.yaml``; the checkpoint to resume from (None: start fresh)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / CHECKPOINTS_DIR).exists():
        shutil.rmtree(run_dir / CHECKPOINTS_DIR)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return checkpoint


def seed_everything(seed: int) -> None:
    """One seed for everything not derived per step (Python, NumPy's global RNG, torch)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def expert_pool(cfg: TrainConfig, source: CaseSource) -> tuple[int, ExpertPool | None]:
    """How many training cases the run uses, and their expert trajectories when a stage needs them."""
    size = source.size(cfg.train_split)
    wanted = cfg.train_cases or cfg.expert.cases
    pool_cases = min(wanted, size) if size is not None else wanted
    if "sft" not in cfg.stages and cfg.grpo.mode != "dual":
        return pool_cases, None
    store = ensure_expert_trajectories(cfg, source)
    return pool_cases, ExpertPool(store, source, cfg.train_split, pool_cases, cfg.expert.reasoning, cfg.env.box_format)


def autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """bf16 autocast for ``dtype: auto`` on CUDA; None (no autocast) otherwise."""
    if config.dtype == "auto" and str(config.device).startswith("cuda"):
        return torch.bfloat16
    return None


def param_dtype_name(config: TrainConfig) -> str:
    """The weights' dtype: auto on CUDA is float32 master weights + bf16 autocast; bfloat16 is pure bf16 weights."""
    return "bfloat16" if config.dtype == "bfloat16" else "float32"
