"""The OpenRLHF launch: the ``train_ppo_ray`` command line of a run, the machine check, and the entry point.

:func:`build_command` turns an :class:`~medeyes.training.openrlhf.config.OpenRLHFConfig` into the exact command:
``python -m medeyes.training.openrlhf.launch --medeyes-config <export>/medeyes_openrlhf.json <train_ppo_ray
flags>`` (``launcher="local"``), or ``ray job submit ... -- python -m openrlhf.cli.train_ppo_ray <flags>`` with
the patch hook in the job's runtime environment (``launcher="ray-job"``). :func:`main` (this module run with
``python -m``) checks the machine (:func:`preflight`), starts Ray with
:data:`~medeyes.training.openrlhf.config.SETUP_HOOK` as every worker's setup hook (so the PPO actors use the
dual-stream loss and per-stream advantages), then runs ``openrlhf.cli.train_ppo_ray`` unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from medeyes.training.openrlhf.config import (
    AGENT_FILE,
    BACKEND_FILE,
    CONFIG_ENV,
    EVAL_FILE,
    OPENRLHF_VERSION,
    PROMPTS_FILE,
    SETUP_HOOK,
    BackendConfig,
    OpenRLHFConfig,
)
from medeyes_env.errors import ConfigError

LAUNCH_MODULE = "medeyes.training.openrlhf.launch"
OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"
RAY_DEFAULT_ENV = {
    "TOKENIZERS_PARALLELISM": "true",
    "NCCL_DEBUG": "WARN",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}
"""The worker environment ``train_ppo_ray`` sets when it starts Ray itself (kept when we start Ray first)."""


def _model_path(name: str) -> str:
    from medeyes.models.factory import default_model_dir, model_aliases

    aliases = model_aliases()
    if name in aliases:
        return str(default_model_dir(*aliases[name]))
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _num(value: float) -> str:
    """A float flag value that argparse reads back exactly (``1e-06``, ``0.2``, ``1.0``)."""
    return repr(float(value))


def openrlhf_args(config: OpenRLHFConfig) -> list[str]:
    """The ``openrlhf.cli.train_ppo_ray`` flags of the run (OpenRLHF 0.11.2's dotted names)."""
    train = config.train
    backend = config.backend()
    grpo, optim, objective, sampling = train.grpo, train.grpo.optim, train.objective, train.sampling
    data, out = config.data_dir, config.output_dir
    n = backend.n_samples_per_prompt
    world = str(config.nodes), str(config.gpus_per_node)
    args = [
        "--actor.model_name_or_path", _model_path(train.model),
        "--actor.num_nodes", world[0], "--actor.num_gpus_per_node", world[1],
        "--vllm.num_engines", str(config.engines), "--vllm.tensor_parallel_size", str(config.vllm_tensor_parallel),
        "--vllm.gpu_memory_utilization", _num(config.vllm_gpu_memory_utilization),
        "--train.agent_func_path", str(data / AGENT_FILE),
        "--data.prompt_dataset", str(data / PROMPTS_FILE),
        "--data.input_key", "prompt", "--data.label_key", "label", "--data.image_key", "images",
        "--data.apply_chat_template",
        "--data.max_images_per_prompt", str(train.env.max_steps + 1 if config.feedback_images else 1),
        "--data.max_len", str(config.max_len),
        "--rollout.n_samples_per_prompt", str(n),
        "--rollout.batch_size", str(grpo.prompts_per_step),
        "--rollout.max_new_tokens", str(sampling.max_new_tokens),
        "--rollout.temperature", _num(sampling.temperature), "--rollout.top_p", _num(sampling.top_p),
        "--rollout.micro_batch_size", str(config.micro_rollout_batch_size),
        "--train.batch_size", str(grpo.prompts_per_step * n),
        "--train.micro_batch_size", str(config.micro_train_batch_size),
        "--train.num_episodes", "1", "--train.max_epochs", "1",
        "--train.seed", str(train.seed),
        # dr_grpo: OpenRLHF's own advantages without the std division (only when its own loss trains)
        "--algo.advantage.estimator",
        "dr_grpo" if not objective.scale_by_std and not config.medeyes_loss else "group_norm",
        "--algo.kl.init_coef", _num(objective.kl_coef),
        "--actor.eps_clip_low_high", _num(objective.clip_eps), _num(objective.clip_high),
        "--actor.loss_agg_mode", objective.aggregation.replace("_", "-"),
        "--actor.adam.lr", _num(optim.lr),
        "--actor.adam.betas", _num(optim.betas[0]), _num(optim.betas[1]),
        "--actor.adam.eps", _num(optim.eps), "--actor.adam.weight_decay", _num(optim.weight_decay),
        "--actor.lr_scheduler", "constant_with_warmup" if optim.schedule == "constant" else "cosine_with_min_lr",
        "--actor.lr_warmup_ratio", _num(min(1.0, optim.warmup_steps / max(1, grpo.steps))),
        "--actor.min_lr_ratio", _num(optim.min_lr_ratio),
        "--actor.max_norm", _num(optim.grad_clip or 0.0),
        "--ds.zero_stage", str(config.zero_stage), "--ds.param_dtype", "bf16",
        "--ds.attn_implementation", config.attn_implementation,
        "--ckpt.output_dir", str(out / "final"), "--ckpt.path", str(out / "ckpt"), "--ckpt.save_hf",
        "--ckpt.save_steps", str(config.save_steps if config.save_steps is not None else train.checkpoint_every or -1),
        "--logger.logging_steps", str(train.log_every),
    ]  # fmt: skip
    return args + _optional_args(config) + list(config.extra_args)


def _optional_args(config: OpenRLHFConfig) -> list[str]:
    """The flags that depend on settings being on: TensorBoard, KL, entropy, colocation, eval, ..."""
    train, objective, data = config.train, config.train.objective, config.data_dir
    world = str(config.nodes), str(config.gpus_per_node)
    args: list[str] = []
    if train.tensorboard:
        args += ["--logger.tensorboard_dir", str(config.output_dir / "tb")]
    if objective.kl_coef > 0:
        args += ["--algo.kl.use_loss", "--algo.kl.estimator", "k3"]
        args += ["--ref.num_nodes", world[0], "--ref.num_gpus_per_node", world[1]]
    if objective.entropy_coef > 0:
        args += ["--actor.entropy_coef", _num(objective.entropy_coef)]
    if config.colocate:
        args += ["--train.colocate_all", "--vllm.enable_sleep", "--ds.enable_sleep"]
    if config.gradient_checkpointing:
        args.append("--actor.gradient_checkpointing_enable")
    if config.freeze_visual_encoder:
        args.append("--actor.freeze_visual_encoder")
    if train.eval.every > 0 and (config.data_dir / EVAL_FILE).exists():
        args += [
            "--eval.dataset", str(data / EVAL_FILE), "--eval.steps", str(train.eval.every),
            "--eval.temperature", _num(train.eval.temperature), "--eval.n_samples_per_prompt", "1",
        ]  # fmt: skip
    return args


def build_command(
    config: OpenRLHFConfig, launcher: Literal["local", "ray-job"] = "local", ray_address: str | None = None
) -> list[str]:
    """The command line that trains ``config`` on OpenRLHF (argv list; :func:`shlex.join` it to print).

    ``local``: ``python -m medeyes.training.openrlhf.launch`` on the head node (it starts or joins Ray with
    the patch hook). ``ray-job``: ``ray job submit`` to ``ray_address`` with the hook in ``--runtime-env-json``.
    With ``medeyes_loss=false`` both run OpenRLHF's own trainer with no MedEyes patch.
    """
    args = openrlhf_args(config)
    backend_file = str(config.data_dir / BACKEND_FILE)
    if launcher == "local":
        if config.medeyes_loss:
            return [config.python, "-m", LAUNCH_MODULE, "--medeyes-config", backend_file, *args]
        return [config.python, "-m", OPENRLHF_MODULE, *args]
    if launcher != "ray-job":
        raise ConfigError(f"launcher must be 'local' or 'ray-job', got {launcher!r}")
    env_vars = dict(RAY_DEFAULT_ENV)
    runtime: dict[str, Any] = {"env_vars": env_vars}
    if config.medeyes_loss:
        env_vars[CONFIG_ENV] = backend_file
        runtime["worker_process_setup_hook"] = SETUP_HOOK
    head = ["ray", "job", "submit"]
    if ray_address:
        head += ["--address", ray_address]
    return [
        *head,
        "--runtime-env-json",
        json.dumps(runtime, sort_keys=True),
        "--",
        config.python,
        "-m",
        OPENRLHF_MODULE,
        *args,
    ]


def preflight() -> list[str]:
    """What this machine lacks to run OpenRLHF training (empty when it can run): CUDA, ray, vllm, deepspeed, ..."""
    import importlib.metadata
    import importlib.util

    problems = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    except ImportError:
        problems.append("torch is not installed")
    for module, hint in (
        ("ray", "pip install ray==2.55.0"),
        ("openrlhf", f"pip install openrlhf=={OPENRLHF_VERSION}"),
        ("vllm", "pip install vllm==0.29.0, the version openrlhf's vllm extra pins"),
        ("deepspeed", "pip install deepspeed==0.19.6"),
        ("flash_attn", "pip install flash-attn, a CUDA build that openrlhf.models imports"),
    ):
        if importlib.util.find_spec(module) is None:
            problems.append(f"{module} is not installed ({hint})")
    if importlib.util.find_spec("openrlhf") is not None:
        version = importlib.metadata.version("openrlhf")
        if version != OPENRLHF_VERSION:
            problems.append(f"openrlhf {version} is installed; the MedEyes patches need {OPENRLHF_VERSION}")
    return problems


def run_command(command: Sequence[str]) -> int:
    """Run a built command after :func:`preflight`; returns its exit status.

    Raises:
        ConfigError: the machine cannot run OpenRLHF training (the message lists every missing piece).

    """
    if command and command[0] != "ray":
        problems = preflight()
        if problems:
            raise ConfigError("cannot run OpenRLHF training on this machine: " + "; ".join(problems))
    elif not _which(command[0]):
        raise ConfigError("the 'ray' command is not installed here: pip install ray==2.55.0")
    return subprocess.call(list(command))


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def format_command(command: Sequence[str]) -> str:
    """The command as one shell line, wrapped before each flag for reading."""
    parts = [shlex.quote(str(p)) for p in command]
    lines, current = [], []
    for part in parts:
        if part.startswith("--") and current:
            lines.append(" ".join(current))
            current = []
        current.append(part)
    lines.append(" ".join(current))
    return " \\\n    ".join(lines)


# ================================================================================================ entry point


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medeyes.training.openrlhf.launch --medeyes-config FILE <train_ppo_ray flags>``.

    Starts (or joins, with ``RAY_ADDRESS``) Ray with the MedEyes patch hook in every worker, patches this
    process too, then runs ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with the remaining flags.
    """
    import runpy

    args = list(sys.argv[1:] if argv is None else argv)
    if "--medeyes-config" not in args or args.index("--medeyes-config") + 1 >= len(args):
        sys.exit(f"usage: python -m {LAUNCH_MODULE} --medeyes-config FILE <train_ppo_ray flags>")
    at = args.index("--medeyes-config")
    config_path = str(Path(args[at + 1]).resolve())
    rest = args[:at] + args[at + 2 :]
    BackendConfig.load(config_path)  # fail here, not in a Ray worker
    problems = preflight()
    if problems:
        sys.exit("cannot run OpenRLHF training on this machine: " + "; ".join(problems))
    import ray

    from medeyes.training.openrlhf.patches import install_openrlhf_patches

    os.environ[CONFIG_ENV] = config_path
    env_vars = {key: os.environ.get(key, value) for key, value in RAY_DEFAULT_ENV.items()}
    env_vars[CONFIG_ENV] = config_path
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK})
    install_openrlhf_patches(config_path)
    sys.argv = [OPENRLHF_MODULE, *rest]
    runpy.run_module(OPENRLHF_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
