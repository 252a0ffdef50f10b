"""The verl (0.9.1) agent loop with verl's own classes on CPU, generation by a real model behind verl's interface.

Real here: verl 0.9.1's ``AgentLoopBase`` (the loop's base), its registry and ``hydra.utils.instantiate`` call
exactly as ``AgentLoopWorker._run_agent_loop`` makes it, the Qwen-VL Continuous Token builder (prompt building,
assistant and context merges, mask alignment), ``AgentLoopOutput``, and ``AgentLoopWorker``'s postprocessing
code that rebuilds the multimodal tensors and M-RoPE position ids from the whole history. The tiny random
Qwen2.5-VL (``medeyes.models``) generates every token through ``tests/verl_token_server.py``, which answers
``LLMServerClient.generate``'s call. Not here: verl's vLLM/SGLang server, Ray actors, the trainer (GPU).

Runs in its own venv: ``bash scripts/install_verl.sh`` then
``.venv-verl/bin/python -m pytest -m verl tests/test_verl_agent_loop.py`` (CI stage 7).
"""

from __future__ import annotations

import asyncio
import types

import gymnasium as gym
import pytest

pytest.importorskip("verl", reason="needs verl 0.9.1: bash scripts/install_verl.sh (its own venv)")

import hydra
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForImageTextToText
from verl.experimental.agent_loop.agent_loop import (
    AgentLoopOutput,
    AgentLoopWorker,
    DictConfigWrap,
    ToolListWrap,
    _agent_loop_registry,
)
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl_token_server import TransformersTokenServer

import medeyes_env  # noqa: F401  (registers the ids)
from medeyes.models.processors import load_processor
from medeyes_env.integrations.verl_agent_loop import AGENT_LOOP_CONFIG, AGENT_NAME, MedEyesAgentLoop

pytestmark = pytest.mark.verl

DRILL = '<reasoning>centre</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>'
RESPONSE_LENGTH = 1536


@pytest.fixture(scope="module")
def tiny(tiny_models):
    path = tiny_models.path("qwen2_5_vl")
    processor = load_processor(str(path))
    # As verl's hf_processor does for Qwen2.5-VL: the model's get_rope_index bound to the processor.
    from transformers.models.qwen2_5_vl import Qwen2_5_VLModel

    processor.config = AutoConfig.from_pretrained(path)
    processor.get_rope_index = types.MethodType(Qwen2_5_VLModel.get_rope_index, processor)
    if hasattr(Qwen2_5_VLModel, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, processor)
    model = AutoModelForImageTextToText.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, processor


def make_loop(tiny, server, response_length: int = RESPONSE_LENGTH) -> MedEyesAgentLoop:
    """The loop as verl's AgentLoopWorker._run_agent_loop instantiates it: by name, through hydra."""
    model, processor = tiny
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {"prompt_length": 4096, "response_length": response_length}},
            "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
        }
    )
    return hydra.utils.instantiate(
        config=_agent_loop_registry[AGENT_NAME],
        trainer_config=DictConfigWrap(config=config),
        server_manager=server,
        tokenizer=processor.tokenizer,
        processor=processor,
        hf_model_type=model.config.model_type,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap([]),
    )


def play(tiny, server, extra_info: dict, response_length: int = RESPONSE_LENGTH) -> AgentLoopOutput:
    """One row through the loop, built and run on one event loop as the worker does (the loop keeps its loop)."""
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}

    async def main() -> AgentLoopOutput:
        loop = make_loop(tiny, server, response_length)
        return await loop.run(sampling, raw_prompt=[], extra_info=extra_info, index=0)

    return asyncio.run(main())


def postprocess(processor, output: AgentLoopOutput) -> tuple[dict, torch.Tensor]:
    """verl's own AgentLoopWorker code: multimodal tensors and position ids rebuilt from the whole history."""
    worker = AgentLoopWorker.__new__(AgentLoopWorker)  # its __init__ needs Ray and a model config; these don't
    worker.processor, worker.tokenizer, worker.mm_processor_kwargs = processor, processor.tokenizer, {}
    input_ids = torch.tensor([output.prompt_ids + output.response_ids])
    mm_inputs = worker._compute_multi_modal_inputs(output, input_ids)
    position_ids = worker._compute_position_ids(input_ids, torch.ones_like(input_ids), mm_inputs, {})
    return mm_inputs, position_ids


def test_the_loop_is_registered_by_name_and_in_its_config_file():
    assert _agent_loop_registry[AGENT_NAME] == {"_target_": "medeyes_env.integrations.verl_agent_loop.MedEyesAgentLoop"}
    (entry,) = OmegaConf.load(AGENT_LOOP_CONFIG)  # what agent_loop_config_path loads
    assert entry.name == AGENT_NAME and entry._target_ == _agent_loop_registry[AGENT_NAME]["_target_"]


def test_a_drill_then_the_gold_answer_scores_as_in_process_with_every_image_and_mask(tiny):
    model, processor = tiny
    local = gym.make("MedEyes/Phantom-v0", split="test").unwrapped
    local.reset(options={"case_index": 3})
    answer = f"<reasoning>seen</reasoning><answer>{local.case.answer}</answer>"
    server = TransformersTokenServer(model, processor)
    server.script = [DRILL, answer]  # the model samples every token, constrained to these texts
    output = play(tiny, server, {"split": "test", "case_index": 3})

    local.step(DRILL)
    _, reward, terminated, _, info = local.step(answer)
    assert terminated and output.reward_score == reward and output.extra_fields["medeyes_finished"]
    assert output.extra_fields["medeyes_reward_components"] == info["reward_components"]
    assert output.extra_fields["medeyes_reward_components"]["accuracy"] == 1.0
    assert output.num_turns == 4  # prompt, drill, view, answer
    # Images: the overview, then the drill's view, sent to the server turn by turn and returned in order.
    assert [call["images"] for call in server.calls] == [1, 2]
    assert len(output.multi_modal_data["images"]) == 2
    # The loss mask is 1 exactly on the tokens the model generated; the view turn between them is 0.
    tokenizer = processor.tokenizer
    generated = [t for t, m in zip(output.response_ids, output.response_mask, strict=True) if m == 1]
    assert tokenizer.decode(generated, skip_special_tokens=True) == DRILL + answer
    context = [t for t, m in zip(output.response_ids, output.response_mask, strict=True) if m == 0]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in context and "Zoomed into region" in tokenizer.decode(context)
    assert len(output.response_logprobs) == len(output.response_ids)
    # verl rebuilds pixel_values for both images from the whole sequence; one pixel row per pad x merge^2.
    mm_inputs, position_ids = postprocess(processor, output)
    assert mm_inputs["image_grid_thw"].shape[0] == 2
    pads = (torch.tensor(output.prompt_ids + output.response_ids) == image_pad).sum().item()
    assert mm_inputs["pixel_values"].shape[0] == pads * processor.image_processor.merge_size**2
    assert position_ids.shape == (1, 4, len(output.prompt_ids) + len(output.response_ids))  # text + M-RoPE


def test_free_sampling_by_the_random_model_keeps_the_invariants(tiny):
    model, processor = tiny
    server = TransformersTokenServer(model, processor, seed=1)
    output = play(tiny, server, {"seed": 5, "env_kwargs": {"max_steps": 2}}, response_length=700)
    assert len(output.response_ids) == len(output.response_mask) <= 700
    assert sum(output.response_mask) > 0  # the model wrote something every turn
    images = output.multi_modal_data["images"]
    assert len(images) == len(server.calls)  # one new image per environment turn the model saw
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert all(m == 0 for t, m in zip(output.response_ids, output.response_mask, strict=True) if t == image_pad)
    if not output.extra_fields["medeyes_finished"]:
        assert output.reward_score == 0.0  # no answer, no reward
    mm_inputs, _ = postprocess(processor, output)
    assert mm_inputs["image_grid_thw"].shape[0] == len(images)
