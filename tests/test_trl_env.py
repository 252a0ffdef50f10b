"""The TRL ``environment_factory`` adapter: tools against the real env, and a real GRPOTrainer run."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import pytest

import medeyes_env  # noqa: F401  (registers the ids)
from medeyes_env.integrations.trl_env import NO_GRAMMAR, MedEyesToolEnv

DRILL_BOX = [400, 400, 600, 600]


def in_process_reward(seed: int, answer: str) -> tuple[float, dict]:
    env = gym.make("MedEyes/Phantom-v0", rewards=NO_GRAMMAR).unwrapped
    env.reset(seed=seed)
    env.step('<reasoning>r</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>')
    _, reward, *_, info = env.step(f"<reasoning>r</reasoning><answer>{answer}</answer>")
    return reward, info["reward_components"]


def gold(seed: int) -> str:
    env = gym.make("MedEyes/Phantom-v0").unwrapped
    env.reset(seed=seed)
    return env.case.answer


def test_tools_play_the_episode_and_return_images():
    env = MedEyesToolEnv()
    first = env.reset(seed=4, prompt=[{"role": "user", "content": "ignored"}])  # TRL passes the whole row
    assert [part["type"] for part in first] == ["image", "text"]
    assert first[0]["image"].size == (256, 256) and "Image: 1024x1024 pixels" in first[1]["text"]
    assert env.get_reward() == 0.0
    view = env.drill(DRILL_BOX)
    assert view[0]["image"].size == (256, 256) and "Zoomed into region [400, 400, 600, 600]" in view[1]["text"]
    done = env.answer(gold(4))
    assert done[1]["text"] == "<feedback>Answer received.</feedback>"
    reward, components = in_process_reward(4, gold(4))
    assert env.get_reward() == reward == pytest.approx(0.7 + 0.1 * components["diversity"])
    assert env.components == components  # grammar is reported but weighs nothing here
    assert env.answer("again") == [{"type": "text", "text": "The episode has ended; no more tool calls are needed."}]


def test_bad_tool_arguments_are_feedback_not_crashes():
    env = MedEyesToolEnv()
    env.reset(case_index=0)
    for bad in ([1, 2, 3], "everywhere", [500, 500, 100, 100], [5000, 5000, 6000, 6000]):
        feedback = env.drill(bad)[1]["text"]
        assert feedback.startswith("<feedback>Your last turn could not be executed:"), feedback
    assert "must be a list" in env.scan("not boxes")[1]["text"] or "boxes" in env.scan("not boxes")[1]["text"]
    with pytest.raises(ValueError, match="env_id 'MedEyes/Nope-v0' is not a MedEyes id"):
        MedEyesToolEnv("MedEyes/Nope-v0")


def test_the_adapter_plays_a_served_env_the_same_way():
    pytest.importorskip("openenv", reason="needs the serve extra")
    from medeyes_env.serving.server import ServeConfig, background_server

    config = ServeConfig(port=0, env_kwargs={"rewards": {"grammar": 0.0}})
    with background_server(config) as url:
        remote = MedEyesToolEnv(url=url)
        local = MedEyesToolEnv()
        for env in (remote, local):
            env.reset(seed=5)
            env.drill(DRILL_BOX)
            env.answer(gold(5))
        assert remote.get_reward() == local.get_reward() > 0
        assert remote.components == local.components


# -- a real GRPOTrainer run -------------------------------------------------------------------------


def steering_bias(tokenizer) -> list:
    """``sequence_bias`` that makes a random tiny model call drill then answer, or answer at once; then stop.

    The first call is a coin flip between the two (equal bias where their tokens part), so rollouts of one
    prompt differ in reward (a drill earns diversity) and GRPO has an advantage to push through.

    A random model never writes a parseable tool call by chance; transformers' own ``sequence_bias``
    (passed through ``GRPOConfig.generation_kwargs``) pins the tokens that follow each context, so the
    rollouts take the tool path while the model, processor, trainer and loss stay real.
    """

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def call(name: str, arguments: dict) -> list[int]:
        return ids("<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call><|im_end|>")

    after_question = ids("y2].<|im_end|>\n<|im_start|>assistant\n")[-6:]  # the adapter's hint ends the question
    after_tool = ids("</tool_response><|im_end|>\n<|im_start|>assistant\n")[-6:]
    after_answer = ids("Answer received.</feedback>\n</tool_response><|im_end|>\n<|im_start|>assistant\n")[-22:]
    bias = []
    answer = call("answer", {"text": "no"})
    for context, target in (
        (after_question, call("drill", {"box": DRILL_BOX})),
        (after_question, answer),
        (after_tool, answer),
    ):
        bias += [[context + target[:k] + [target[k]], 100.0] for k in range(len(target))]
    bias.append([[*after_answer, tokenizer.convert_tokens_to_ids("<|im_end|>")], 300.0])
    return bias


@pytest.mark.slow
def test_grpo_trainer_runs_with_the_environment_factory_and_later_images_reach_the_loss(tmp_path, tiny_models):
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl", reason="needs the trl extra")
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText

    from medeyes.models.processors import load_processor

    path = tiny_models.path("qwen2_5_vl")  # built (if it is not yet) before the seed, so the run's draws are the same
    torch.manual_seed(0)
    processor = load_processor(str(path))
    # TRL's Qwen3-VL template renders tool calls and image tool responses; the tiny Qwen2.5-VL uses the same markers.
    processor.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3_vl.jinja").read_text()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    batches: list[dict] = []

    class Recording(trl.GRPOTrainer):
        def _compute_loss(self, model, inputs):
            batches.append({k: inputs[k] for k in ("num_images", "pixel_values", "tool_mask") if k in inputs})
            return super()._compute_loss(model, inputs)

    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Look closely."}], "seed": i} for i in range(4)])
    config = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=384,
        max_tool_calling_iterations=2,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        generation_kwargs={"sequence_bias": steering_bias(processor.tokenizer)},
    )
    trainer = Recording(
        model=model, args=config, train_dataset=rows, processing_class=processor, environment_factory=MedEyesToolEnv
    )
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if "visual" in n}
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:  # `pytest -s -m slow tests/test_trl_env.py` shows them (docs/integrations.md quotes them)
        print(
            {k: round(v, 4) for k, v in h.items() if k.split("/")[0] in ("step", "loss", "reward", "rewards", "tools")}
        )
    print("images per rollout in each loss batch:", [batch["num_images"] for batch in batches])
    assert len(logs) == 2
    assert all(h["tools/failure_frequency"] == 0.0 and "rewards/MedEyesToolEnv/mean" in h for h in logs)
    assert any(h["reward_std"] > 0 and h["grad_norm"] > 0 for h in logs)  # rollouts differed: a real update
    played = [[t.parsed.action.name for t in env._backend.env.turns] for env in trainer._environment_pool[None]]
    assert all(turns in (["drill", "answer"], ["answer"]) for turns in played)
    # Every turn's image reaches the loss: the overview, the drill's view (if any) and the answer's view.
    images = [n for batch in batches for n in batch["num_images"]]
    assert set(images) <= {2, 3} and 3 in images
    patches = batches[0]["pixel_values"].shape[0] // sum(batches[0]["num_images"])
    assert all(batch["pixel_values"].shape[0] == patches * sum(batch["num_images"]) for batch in batches)
    assert all((batch["tool_mask"] == 0).any() for batch in batches)  # tool responses are masked out of the loss
    changed = [n for n, p in model.named_parameters() if "visual" in n and not torch.equal(p, vision_before[n])]
    assert len(changed) == len(vision_before)  # the images' gradient reached every vision-tower weight
