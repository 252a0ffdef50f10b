"""The Ray ``worker_process_setup_hook`` that plugs the dual-stream objective into OpenRLHF 0.11.2, fail closed.

OpenRLHF has no plug-in point for the loss or the advantages: ``ActorPPOTrainer.__init__``
(``openrlhf/trainer/ray/ppo_actor.py``) builds ``PolicyLoss`` itself, and
``RemoteExperienceMaker.compute_advantages_and_returns`` (``openrlhf/trainer/ppo_utils/experience_maker.py``)
computes group advantages. :func:`install_openrlhf_patches` replaces both, in every Ray worker, when those
modules are imported, and refuses other OpenRLHF releases.

Fail closed: a MedEyes run trained with OpenRLHF's stock ``PolicyLoss`` and ``group_norm`` over mixed
expert+policy groups would learn something else without any error. So the hook refuses to run without its
config, the agent file refuses to load in a process the hook did not reach (:func:`require_patch_hook`), the
patched trainer refuses a batch whose advantages the patched experience maker did not compute, and the patched
experience maker refuses rollouts that did not come from the MedEyes agent.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from medeyes.training.objective_config import ObjectiveConfig
from medeyes.training.openrlhf.config import (
    ALLOW_UNTESTED_ENV,
    CONFIG_ENV,
    LOG_PREFIX,
    OPENRLHF_VERSION,
    SETUP_HOOK,
    BackendConfig,
)
from medeyes.training.openrlhf.loss import (
    DualStreamPolicyLoss,
    assign_dual_stream_advantages,
    expert_flags,
    reduce_like_medeyes,
)
from medeyes_env.errors import ConfigError

_HOOKED_CONFIG: list[Path] = []
"""The config :func:`install_openrlhf_patches` ran with in this process (empty: the hook did not run here)."""

LAUNCH_HINT = (
    "start the run with `medeyes openrlhf command ... --run` (or the command it prints: python -m "
    "medeyes.training.openrlhf.launch --medeyes-config <export>/medeyes_openrlhf.json ...), or `--launcher ray-job`, "
    f"whose runtime env sets {CONFIG_ENV} and worker_process_setup_hook={SETUP_HOOK}; do not run "
    "openrlhf.cli.train_ppo_ray directly"
)
"""How to launch so every Ray worker runs the hook; every fail-closed message ends with it."""

_EXPECTED_POLICY_LOSS_ARGS = (
    "self",
    "log_probs",
    "old_log_probs",
    "advantages",
    "action_mask",
    "rollout_log_probs",
    "dp_size",
    "batch_num_tokens",
    "global_batch_size",
)
_EXPECTED_TRAINING_STEP_ARGS = ("self", "experience", "kl_ctl", "step", "loss_batch_info")
_EXPECTED_ADVANTAGE_ARGS = ("self", "experiences")
_EXPECTED_AGGREGATE_ARGS = ("loss", "loss_mask", "token_level_loss", "dp_size", "batch_num_tokens", "global_batch_size")


def _check_signature(function: Callable, expected: tuple[str, ...], where: str) -> None:
    names = tuple(inspect.signature(function).parameters)
    if names != expected:
        raise ConfigError(
            f"OpenRLHF's {where} takes {names}, the MedEyes patch expects {expected}; this OpenRLHF release is not "
            f"supported (tested: {OPENRLHF_VERSION}); install openrlhf=={OPENRLHF_VERSION}"
        )


def _check_version() -> str:
    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"openrlhf is not installed; pip install openrlhf=={OPENRLHF_VERSION}") from None
    if version != OPENRLHF_VERSION and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise ConfigError(
            f"openrlhf {version} is installed; the MedEyes patches were written for {OPENRLHF_VERSION}. Install "
            f"openrlhf=={OPENRLHF_VERSION}, or set {ALLOW_UNTESTED_ENV}=1 to try (signatures are still checked)"
        )
    return version


def require_patch_hook(config_path: str | os.PathLike[str]) -> None:
    """Refuse to go on unless :func:`install_openrlhf_patches` ran in this process with ``config_path``.

    The agent file calls this in every vLLM engine actor: they run under the same Ray runtime env as the
    training actors, so an engine the hook did not reach means the trainers were not patched either.

    Raises:
        ConfigError: the hook did not run here, or ran with another config.

    """
    wanted = Path(config_path).resolve()
    if not _HOOKED_CONFIG:
        raise ConfigError(
            f"MedEyes OpenRLHF: {wanted.name} trains with the MedEyes dual-stream loss, but this process was "
            "started without the MedEyes patch hook, so OpenRLHF would train with its stock PolicyLoss and "
            f"group_norm advantages over mixed expert+policy groups. Refusing to start: {LAUNCH_HINT}"
        )
    if _HOOKED_CONFIG[0] != wanted:
        raise ConfigError(
            f"MedEyes OpenRLHF: the patch hook ran with {_HOOKED_CONFIG[0]}, the agent file names {wanted}; "
            f"{CONFIG_ENV} and --train.agent_func_path must come from the same export"
        )


def _check_advantages_patched(experience: Any) -> None:
    if LOG_PREFIX + "advantage" not in experience.info:
        raise ConfigError(
            "MedEyes OpenRLHF: this batch's advantages were not computed by the MedEyes patch (the process that "
            "made the experiences did not run the hook), so they mix the two streams. Refusing to train: " + LAUNCH_HINT
        )


def _check_medeyes_rollouts(experiences: list[Any]) -> None:
    if any(LOG_PREFIX + "is_expert" not in e.info for e in experiences):
        raise ConfigError(
            f"MedEyes OpenRLHF: rollouts without {LOG_PREFIX}is_expert reached the MedEyes advantages: pass "
            "--train.agent_func_path <export>/medeyes_agent.py (the command `medeyes openrlhf command` prints does)"
        )


def patch_ppo_actor(module: ModuleType, objective: ObjectiveConfig) -> None:
    """Make ``module.ActorPPOTrainer`` (openrlhf.trainer.ray.ppo_actor) train with the MedEyes objective.

    Its loss becomes :class:`DualStreamPolicyLoss`, its KL and entropy terms are reduced with the MedEyes
    aggregation (:func:`reduce_like_medeyes`), and ``training_step`` refuses batches whose advantages the
    patched experience maker did not write.
    """
    cls = module.ActorPPOTrainer
    if getattr(cls, "_medeyes_patched", False):
        return
    _check_signature(module.PolicyLoss.forward, _EXPECTED_POLICY_LOSS_ARGS, "PolicyLoss.forward")
    _check_signature(cls.training_step, _EXPECTED_TRAINING_STEP_ARGS, "ActorPPOTrainer.training_step")
    _check_signature(module.aggregate_loss, _EXPECTED_AGGREGATE_ARGS, "aggregate_loss")
    original_init, original_step = cls.__init__, cls.training_step

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        algo, actor = self.args.algo, self.args.actor
        if algo.advantage.is_correction_level != "off" or actor.policy_loss_type != "ppo" or actor.dual_clip:
            raise ConfigError(
                "the MedEyes dual-stream loss replaces OpenRLHF's PolicyLoss and supports none of "
                "--algo.advantage.is_correction_level, --actor.policy_loss_type gspo, --actor.dual_clip; drop them"
            )
        self.actor_loss_fn = DualStreamPolicyLoss(objective)

    @functools.wraps(original_step)
    def training_step(self: Any, experience: Any, *args: Any, **kwargs: Any) -> Any:
        loss_fn = self.actor_loss_fn
        if not isinstance(loss_fn, DualStreamPolicyLoss):
            raise ConfigError(f"MedEyes OpenRLHF: the actor's loss is {type(loss_fn).__name__}, not the MedEyes one")
        _check_advantages_patched(experience)
        loss_fn.bind(expert_flags(experience.info, len(experience.sequences)), experience.info)
        try:
            return original_step(self, experience, *args, **kwargs)
        finally:
            loss_fn.bind(None, None)

    module.aggregate_loss = reduce_like_medeyes(module.aggregate_loss, objective.aggregation)
    cls.__init__ = __init__
    cls.training_step = training_step
    cls._medeyes_patched = True


def patch_experience_maker(module: ModuleType, objective: ObjectiveConfig) -> None:
    """Make ``module.RemoteExperienceMaker`` compute decoupled per-stream advantages."""
    cls = module.RemoteExperienceMaker
    if getattr(cls, "_medeyes_patched", False):
        return
    _check_signature(cls.compute_advantages_and_returns, _EXPECTED_ADVANTAGE_ARGS, "compute_advantages_and_returns")

    @torch.no_grad()
    def compute_advantages_and_returns(self: Any, experiences: list[Any]) -> list[Any]:
        args = self.strategy.args
        if args.algo.kl.init_coef > 0 and not args.algo.kl.use_loss:
            raise ConfigError(
                "with the MedEyes advantages the KL term must be a loss: add --algo.kl.use_loss (or set "
                "--algo.kl.init_coef 0, the paper's value)"
            )
        _check_medeyes_rollouts(experiences)
        for experience in experiences:
            experience.rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
        module.apply_length_penalties(experiences, args)
        assign_dual_stream_advantages(experiences, args.rollout.n_samples_per_prompt, objective)
        return experiences

    cls.compute_advantages_and_returns = compute_advantages_and_returns
    cls._medeyes_patched = True


class _PostImportPatcher(importlib.abc.MetaPathFinder):
    """Apply a patch to a module right after it is imported (so vLLM workers never import deepspeed for it)."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def install_openrlhf_patches(config_path: str | os.PathLike[str] | None = None) -> bool:
    """Ray ``worker_process_setup_hook``: plug the dual-stream loss and advantages into OpenRLHF.

    Reads the :class:`~medeyes.training.openrlhf.config.BackendConfig` named by ``config_path`` or
    ``$MEDEYES_OPENRLHF_CONFIG``. Modules already imported are patched now; the others when they are first
    imported, so a vLLM worker that never imports the PPO actor never loads deepspeed because of this hook.
    Returns False, patching nothing, for a config with ``medeyes_loss=false`` (OpenRLHF's own loss, on purpose).

    Raises:
        ConfigError: no config (the hook is only ever set by the MedEyes launcher, so a missing config means the
            runtime env was lost: fail closed), openrlhf is not the tested release (see
            :data:`~medeyes.training.openrlhf.config.ALLOW_UNTESTED_ENV`), or its signatures moved.

    """
    path = config_path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(
            f"MedEyes OpenRLHF patch hook: no config (${CONFIG_ENV} is not set in this worker), so the MedEyes "
            f"objective cannot be installed. Refusing to start: {LAUNCH_HINT}"
        )
    backend = BackendConfig.load(path)
    if not backend.medeyes_loss:
        return False
    _check_version()
    objective = backend.objective
    patches: dict[str, Callable[[ModuleType], None]] = {
        "openrlhf.trainer.ray.ppo_actor": functools.partial(patch_ppo_actor, objective=objective),
        "openrlhf.trainer.ppo_utils.experience_maker": functools.partial(patch_experience_maker, objective=objective),
    }
    pending = {}
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            pending[name] = patch
    if pending:
        installed = [f for f in sys.meta_path if isinstance(f, _PostImportPatcher)]
        if installed:
            installed[0].patches.update(pending)
        else:
            sys.meta_path.insert(0, _PostImportPatcher(pending))
    _HOOKED_CONFIG[:] = [Path(path).resolve()]
    return True
