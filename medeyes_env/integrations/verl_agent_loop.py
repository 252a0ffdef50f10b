"""MedEyes as a verl (0.9.x) agent loop: ``agent_name: medeyes_agent``, one MedEyes episode per dataset row.

verl's ``AgentLoopWorker`` instantiates the loop by name and calls ``run(sampling_params, **row)`` for each
row of the batch. This loop plays the episode in-process (one ``MedEyesEnv`` per row):

1. reset on the row's case (``extra_info``: ``case_index`` or ``seed``, ``split``, ``env_id``, ``env_kwargs``);
2. the prompt is the environment's own chat (system protocol, overview image and question), rendered with
   verl's Continuous Token builder (``ct_build_initial_tokens``: the processor expands the image pads);
3. each turn the policy generates through ``self.server_manager.generate(prompt_ids=..., image_data=...)``
   (verl's ``LLMServerClient``: vLLM or SGLang on GPUs), the tokens are merged as assistant tokens (loss mask
   1), their text is stepped in the environment with MedEyes' tag protocol, and the view the turn asked for
   comes back as a new user turn with its image, merged as context (mask 0) with ``ct_merge_context_msg``;
4. until the agent answers, the environment ends the episode, or ``rollout.response_length`` is spent.

It returns an ``AgentLoopOutput`` whose ``multi_modal_data["images"]`` is every image of the episode in order
(the overview, then each view), so the worker's postprocessing rebuilds ``pixel_values`` for the whole history
and the actor's forward pass sees what the rollout saw; ``reward_score`` is the episode total (0 when the
agent never answered), ``extra_fields`` carry ``medeyes_reward_components``, ``medeyes_finished`` and
``medeyes_case_id``.

Register it with verl by config (``actor_rollout_ref.rollout.agent.agent_loop_config_path`` pointing at
:data:`AGENT_LOOP_CONFIG`, the YAML beside this module) or by importing this module in the worker (the
``@register`` below). Needs ``pip install verl==0.9.1`` (``scripts/install_verl.sh``); importing
``medeyes_env`` never imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

from PIL import Image
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.profiler import simple_timer

from medeyes_env.env import MedEyesEnv
from medeyes_env.registration import ENV_IDS

AGENT_NAME = "medeyes_agent"
AGENT_LOOP_CONFIG = Path(__file__).with_name("verl_agent_loop.yaml")
"""verl's ``agent_loop_config_path`` file naming this loop (``name: medeyes_agent``)."""

__all__ = ["AGENT_LOOP_CONFIG", "AGENT_NAME", "MedEyesAgentLoop", "episode_env"]


def episode_env(extra_info: dict[str, Any] | None) -> tuple[MedEyesEnv, dict[str, Any]]:
    """The environment a row plays on and the reset options for its case.

    ``extra_info`` keys (all optional): ``env_id`` (default ``MedEyes/Phantom-v0``), ``split`` (the id's
    default), ``env_kwargs`` (EnvConfig fields), and ``case_index`` or ``seed`` (a seed draws the case).
    """
    info = dict(extra_info or {})
    env_id = info.get("env_id", "MedEyes/Phantom-v0")
    if env_id not in ENV_IDS:
        raise ValueError(f"env_id {env_id!r} is not a MedEyes id; use one of: {', '.join(sorted(ENV_IDS))}")
    kwargs = {**ENV_IDS[env_id], **dict(info.get("env_kwargs") or {})}
    if info.get("split") is not None:
        kwargs["split"] = info["split"]
    env = MedEyesEnv(**kwargs)
    reset: dict[str, Any] = {"seed": info.get("seed")}
    if info.get("case_index") is not None:
        reset["options"] = {"case_index": int(info["case_index"])}
    return env, reset


@register(AGENT_NAME)
class MedEyesAgentLoop(AgentLoopBase):
    """One MedEyes episode per row: the tag protocol, images as multi-modal data, each view a new image turn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("tools", None)  # verl hands every loop its tool list; MedEyes' tools are the environment's
        super().__init__(*args, **kwargs)
        self.response_length: int = self.rollout_config.response_length

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        """Play the row's episode and return its tokens, masks, images and reward."""
        env, reset = episode_env(kwargs.get("extra_info"))
        _, info = env.reset(**reset)
        messages = env.chat_messages()  # system protocol, then the overview image and the question
        images: list[Image.Image] = _images(messages)
        self._assert_mm_supported(True)
        metrics: dict[str, Any] = {}
        request_id = uuid4().hex  # one id per episode: the server manager keeps its turns on one server

        prompt_ids = await self.ct_build_initial_tokens(messages, images=images)
        runtime_ids, response_mask = list(prompt_ids), []
        logprobs: list[float] | None = None
        reward, finished, assistant_turns, user_turns = 0.0, False, 0, 0
        while len(response_mask) < self.response_length:
            budget = self.response_length - len(response_mask)
            with simple_timer("generate_sequences", metrics):
                output = await self.server_manager.generate(
                    request_id=request_id,
                    prompt_ids=runtime_ids,
                    sampling_params={**sampling_params, "max_tokens": budget},
                    image_data=images,
                )
            if output.log_probs and logprobs is None:
                logprobs = [0.0] * len(response_mask)
            merged, response_mask, logprobs = await self.ct_merge_assistant_token(
                runtime_ids, output.token_ids, response_mask, logprobs, assistant_logprobs=output.log_probs or None
            )
            runtime_ids = merged.token_ids
            assistant_turns += 1
            text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
            _, reward, terminated, truncated, info = env.step(text)
            if terminated or truncated:
                finished = terminated
                break
            # The environment's answer to the turn: the view it asked for (or the same one) and its feedback.
            previous = [*messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
            updated = [*previous, env.chat_messages()[-1]]
            merged, mask, merged_logprobs = await self.ct_merge_context_msg(
                previous, updated, runtime_ids, response_mask, logprobs
            )
            if len(mask) >= self.response_length:
                break  # the view does not fit: end here, as verl's tool loop does
            runtime_ids, response_mask, logprobs = merged.token_ids, mask, merged_logprobs
            messages = updated
            images = [*images, *_images(updated[-1:])]
            user_turns += 1

        response_ids = runtime_ids[len(runtime_ids) - len(response_mask) :]
        prompt_ids = runtime_ids[: len(runtime_ids) - len(response_mask)]
        components = {name: float(value) for name, value in info.get("reward_components", {}).items()}
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids[: self.response_length],
            response_mask=response_mask[: self.response_length],
            response_logprobs=logprobs[: self.response_length] if logprobs is not None else None,
            multi_modal_data={"images": images},
            reward_score=float(reward) if finished else 0.0,
            num_turns=assistant_turns + user_turns + 1,
            metrics=metrics,
            extra_fields={
                "medeyes_reward_components": components,
                "medeyes_finished": finished,
                "medeyes_case_id": info["case_id"],
            },
        )


def _images(messages: list[dict[str, Any]]) -> list[Image.Image]:
    """The PIL images of ``messages``' image parts, in order."""
    return [
        part["image"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image"
    ]
