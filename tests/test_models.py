"""Tiny real VLMs built offline (Idefics3, Qwen2.5-VL), the transformers backend and the PolicyAgent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from medeyes.agents.backends.transformers import TransformersBackend  # noqa: E402
from medeyes.agents.base import Agent, EpisodeContext  # noqa: E402
from medeyes.agents.policy import PolicyAgent, SamplingConfig, truncate_at_stop  # noqa: E402
from medeyes.cli.model import model_app  # noqa: E402
from medeyes.models.chat import conversation_images  # noqa: E402
from medeyes.models.factory import (  # noqa: E402
    MARKER_FILE,
    build_tiny_model,
    default_model_dir,
    ensure_tiny_model,
    load_policy_model,
    resolve_model_path,
)
from medeyes.models.presets import get_preset  # noqa: E402
from medeyes_env.cases import AnswerType, Case, Region  # noqa: E402
from medeyes_env.env import MedEyesEnv  # noqa: E402
from medeyes_env.errors import ConfigError  # noqa: E402

ARCHS = ["idefics3", "qwen2_5_vl"]
ANSWER = (
    '<reasoning>The left lung shows a nodule.</reasoning><action>{"name": "drill", "box": [12, 30, 80, 96]}</action>'
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are overhead-bound: on a shared 2-core machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache(tiny_models):
    """Both tiny models, built once in the session's private cache (tests/conftest.py)."""
    return {arch: tiny_models.path(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def loaded(model_cache):
    return {arch: load_policy_model(model_cache[arch]) for arch in ARCHS}


def picture(seed: int = 0, size: tuple[int, int] = (200, 160)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def conversation(n_feedback: int = 1) -> list[dict]:
    """System, user (image + question), then assistant / user-feedback-with-image pairs, like MedEyesEnv."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful radiologist."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": picture(0)}, {"type": "text", "text": "Is there a nodule?"}],
        },
    ]
    for turn in range(n_feedback):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": ANSWER}]})
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture(turn + 1, (64, 48))},
                    {"type": "text", "text": "<feedback>Zoomed into region [12, 30, 80, 96].</feedback>"},
                ],
            }
        )
    return messages


# ------------------------------------------------------------------------------------------------ factory


@pytest.mark.parametrize("arch", ARCHS)
def test_built_model_reloads_with_its_processor_and_is_tiny(model_cache, loaded, arch):
    path = model_cache[arch]
    assert (path / MARKER_FILE).is_file() and (path / "chat_template.jinja").is_file()
    model, processor = loaded[arch]
    assert model.config.model_type == arch
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.convert_tokens_to_ids("</action>") != processor.tokenizer.unk_token_id
    assert "Pil" in type(processor.image_processor).__name__
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["arch"] == arch and marker["preset"]["name"] == "tiny" and marker["seed"] == 0


def test_idefics3_processor_follows_the_feasibility_notes(loaded):
    _, processor = loaded["idefics3"]
    image_processor = processor.image_processor
    assert image_processor.resample == 1  # PIL LANCZOS
    assert image_processor.do_image_splitting is False
    assert image_processor.size["longest_edge"] == image_processor.max_image_size["longest_edge"] == 128
    assert processor.image_seq_len == get_preset("idefics3", "tiny").image_seq_len == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_pass_with_several_images(loaded, arch):
    model, processor = loaded[arch]
    messages = conversation(n_feedback=2)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[conversation_images(messages)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_prompt_is_an_exact_token_prefix_of_the_rendered_answer(loaded, arch):
    """FEASIBILITY point 5: the prompt's tokens must be a prefix of prompt + answer tokens."""
    _, processor = loaded[arch]
    messages = conversation(n_feedback=1)
    images = [conversation_images(messages)]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(
        [*messages, {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False
    )
    prompt_ids = processor(text=[prompt], images=images)["input_ids"][0]
    full_ids = processor(text=[full], images=images)["input_ids"][0]
    assert list(full_ids[: len(prompt_ids)]) == list(prompt_ids)
    assert len(full_ids) > len(prompt_ids)


def test_same_seed_builds_identical_weights(tmp_path):
    first = build_tiny_model("qwen2_5_vl", "tiny", out_dir=tmp_path / "a", seed=3)
    second = build_tiny_model("qwen2_5_vl", "tiny", out_dir=tmp_path / "b", seed=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="exists and is not empty"):
        build_tiny_model("qwen2_5_vl", "tiny", out_dir=first)


def test_ensure_builds_once_and_aliases_resolve_to_the_cache(model_cache, tiny_cache):
    path = ensure_tiny_model("idefics3", "tiny")
    assert path == default_model_dir("idefics3", "tiny") == model_cache["idefics3"]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("idefics3", "tiny") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve_model_path("tiny") == (str(path), False)
    assert resolve_model_path("tiny-qwen2_5_vl") == (str(model_cache["qwen2_5_vl"]), False)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tiny-idefics3") and p.is_dir()]


def test_missing_model_directories_have_actionable_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as excinfo:
        load_policy_model(str(missing))
    assert str(excinfo.value).startswith(
        f"model directory {missing} not found; build one with `medeyes model init --out {missing}`"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"has no config.json; build one with `medeyes model init"):
        load_policy_model(str(empty))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file, not a model directory"):
        load_policy_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ConfigError, match="unknown model preset 'huge'; choose one of tiny, small, large"):
        build_tiny_model("idefics3", "huge", out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown model architecture 'llava'"):
        build_tiny_model("llava", "tiny", out_dir=tmp_path / "x")


def test_remote_ids_are_recognised_without_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == ("Qwen/Qwen2.5-VL-3B-Instruct", True)
    with pytest.raises(ConfigError, match="not found"):
        resolve_model_path("./Qwen/Qwen2.5-VL-3B-Instruct")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="model directory checkpoints/step-100 not found"):
        resolve_model_path("checkpoints/step-100")


# ------------------------------------------------------------------------------------------------ backend


def backend_for(loaded, arch: str) -> TransformersBackend:
    model, processor = loaded[arch]
    return TransformersBackend(model, processor)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_deterministic_and_logprobs_match_a_forward_pass(loaded, arch):
    backend = backend_for(loaded, arch)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6, stop=[])
    messages = conversation(n_feedback=1)
    first, second = backend.generate([messages], sampling)[0], backend.generate([messages], sampling)[0]
    assert first.token_ids == second.token_ids and first.logprobs == second.logprobs
    assert len(first.token_ids) == len(first.logprobs) == 6 and first.finish_reason == "length"
    # The recorded log-probs are log_softmax of the model's logits at the sampled tokens (teacher forcing).
    model, processor = loaded[arch]
    inputs = backend.encode([messages])
    ids = torch.cat([inputs["input_ids"], torch.tensor([first.token_ids])], dim=1)
    forward_inputs = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inputs:
        pad = torch.zeros(1, len(first.token_ids), dtype=inputs["mm_token_type_ids"].dtype)
        forward_inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
    with torch.no_grad():
        logits = model(**forward_inputs).logits[0, inputs["input_ids"].shape[1] - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(first.token_ids)[:, None]).squeeze(1)
    np.testing.assert_allclose(first.logprobs, expected.tolist(), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_single_generation(loaded, arch):
    backend = backend_for(loaded, arch)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=5, stop=[])
    short, long = conversation(n_feedback=0), conversation(n_feedback=2)
    alone = backend.generate([short], sampling)[0]
    batched = backend.generate([long, short], sampling)
    assert batched[1].token_ids == alone.token_ids
    np.testing.assert_allclose(batched[1].logprobs, alone.logprobs, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_processed_logprobs_are_renormalised(loaded):
    model, processor = loaded["qwen2_5_vl"]
    messages = [conversation(n_feedback=0)] * 3
    # At temperature 1, top-p only removes mass, so the sampled token's processed log-prob is >= the raw one.
    raw = SamplingConfig(temperature=1.0, top_p=0.5, seed=11, max_new_tokens=8, stop=[])
    processed = raw.model_copy(update={"logprobs_mode": "processed"})
    a = TransformersBackend(model, processor).generate(messages, raw)
    b = TransformersBackend(model, processor).generate(messages, processed)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a}) > 1, "rows of one batch should sample differently"
    for out_raw, out_processed in zip(a, b, strict=True):
        pairs = list(zip(out_raw.logprobs, out_processed.logprobs, strict=True))
        assert all(r - 1e-6 <= p <= 0.0 for r, p in pairs)
        assert any(p > r + 1e-3 for r, p in pairs)


def test_stop_strings_cut_text_and_tokens(loaded):
    backend = backend_for(loaded, "idefics3")
    greedy = backend.generate([conversation(0)], SamplingConfig(temperature=0.0, max_new_tokens=8, stop=[]))[0]
    text = backend.tokenizer.decode(greedy.token_ids[:3], skip_special_tokens=True).lstrip()
    stopped = backend.generate([conversation(0)], SamplingConfig(temperature=0.0, max_new_tokens=8, stop=[text[-2:]]))[
        0
    ]
    assert stopped.finish_reason == "stop"
    assert stopped.text.endswith(text[-2:]) and len(stopped.token_ids) <= 3
    assert stopped.token_ids == greedy.token_ids[: len(stopped.token_ids)]
    assert len(stopped.logprobs) == len(stopped.token_ids)


def test_truncate_at_stop_picks_the_earliest_end():
    assert truncate_at_stop("a</action>b</answer>", ["</answer>", "</action>"]) == ("a</action>", True)


# ------------------------------------------------------------------------------------------------ the agent


class PictureSource:
    """A small in-test case source (random pictures), so these tests need no other source to be ready."""

    name = "pictures"

    def size(self, split):
        return 4

    def case(self, split, index):
        case = Case(
            id=f"pictures/{split}/{index}",
            question="Is there a nodule in the left lung?",
            answer="yes" if index % 2 else "no",
            answer_type=AnswerType.CLOSED,
            regions=(Region(box=(20, 20, 60, 60), label="nodule"),),
            source="pictures",
            split=split,
            image_size=(200, 160),
        )
        return case.with_image_factory(lambda: picture(index))


def env_contexts(n: int, drill_first: int = 0) -> list[EpisodeContext]:
    """Contexts from the real MedEyesEnv: its system prompt, image parts and feedback turns."""
    contexts = []
    for index in range(n):
        env = MedEyesEnv(source=PictureSource(), split="test")
        env.reset(options={"case_index": index})
        if index < drill_first:
            env.step('<reasoning>closer</reasoning><action>{"name": "drill", "box": [10, 10, 120, 120]}</action>')
        contexts.append(
            EpisodeContext(
                episode_id=index,
                case=env.case,
                image=env.image,
                messages=env.chat_messages(),
                step=len(env.turns),
                max_steps=env.config.max_steps,
            )
        )
    return contexts


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_agent_returns_one_turn_per_episode_with_tokens_and_logprobs(loaded, arch):
    agent = PolicyAgent(backend_for(loaded, arch), SamplingConfig(temperature=1.0, seed=0, max_new_tokens=12))
    assert isinstance(agent, Agent)
    contexts = env_contexts(3, drill_first=2)  # two episodes with two images, one with one
    outputs = agent.act(contexts)
    assert len(outputs) == 3
    for out in outputs:
        assert out.token_ids and len(out.token_ids) == len(out.logprobs) <= 12
        assert out.finish_reason in {"stop", "length"}
        assert all(np.isfinite(out.logprobs)) and max(out.logprobs) <= 0.0
    assert agent.describe()["backend"]["type"] == "transformers"
    assert agent.describe()["sampling"]["max_new_tokens"] == 12


def teach(model, processor, messages, target: str, separator: str, max_steps: int = 100) -> float:
    """A few steps of supervised training (text side only) so the tiny model says ``target`` after ``messages``."""
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images = [conversation_images(messages)]
    prompt_len = len(processor(text=[prompt], images=images)["input_ids"][0])
    inputs = processor(text=[prompt + separator + target], images=images, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_len] = -100
    model.model.vision_model.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(max_steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.1:
            break
    model.eval()
    return loss.item()


def test_policy_stops_at_the_first_closing_tag(model_cache):
    model, processor = load_policy_model(model_cache["idefics3"])  # a private copy: this test trains it
    backend = TransformersBackend(model, processor)
    messages = conversation(n_feedback=0)
    torch.manual_seed(0)
    loss = teach(model, processor, messages, "<answer>yes</answer><answer>no</answer><answer>no", " ")
    assert loss < 0.1
    free = backend.generate([messages], SamplingConfig(temperature=0.0, max_new_tokens=10, stop=[]))[0]
    assert free.text.startswith("<answer>yes</answer><answer>no"), free.text
    agent = PolicyAgent(backend, SamplingConfig(temperature=0.0, max_new_tokens=10))
    context = env_contexts(1)[0]
    context.messages = messages
    out = agent.act([context])[0]
    assert out.text == "<answer>yes</answer>" and out.finish_reason == "stop"
    assert processor.tokenizer.convert_ids_to_tokens(out.token_ids[-1]) == "</answer>"
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert len(out.logprobs) == len(out.token_ids)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_init_and_info(tmp_path):
    runner = CliRunner()
    assert runner.invoke(model_app, ["--help"]).exit_code == 0
    out = tmp_path / "m"
    result = runner.invoke(model_app, ["init", "--arch", "qwen2_5_vl", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / MARKER_FILE).is_file()
    result = runner.invoke(model_app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "Qwen2_5_VLForConditionalGeneration" in result.output and "image tokens" in result.output
    result = runner.invoke(model_app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "not found; build one with `medeyes model init" in result.output


def test_model_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDEYES_CACHE", str(tmp_path))
    assert default_model_dir("qwen2_5_vl", "small").parent == Path(tmp_path) / "models"
    monkeypatch.delenv("MEDEYES_CACHE")
    assert str(default_model_dir()).startswith(os.path.expanduser("~"))
