"""Episode tokenisation: the loss mask is 1 exactly on generated tokens, for both streams and both model families."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from medeyes.agents.backends.transformers import TransformersBackend  # noqa: E402
from medeyes.agents.base import EpisodeContext  # noqa: E402
from medeyes.agents.expert.agent import ExpertAgent  # noqa: E402
from medeyes.agents.expert.config import ExpertConfig  # noqa: E402
from medeyes.agents.policy import PolicyAgent, SamplingConfig  # noqa: E402
from medeyes.models.episodes import (  # noqa: E402
    TurnTokens,
    collate,
    prefix_mismatches,
    tokenize_episode,
    tokenize_record,
)
from medeyes.models.factory import load_policy_model  # noqa: E402
from medeyes.rollout import RolloutConfig, run_rollout  # noqa: E402
from medeyes.training.logprobs import sequence_logprobs_from_logits  # noqa: E402
from medeyes.trajectories import TrajectoryStore  # noqa: E402
from medeyes_env.cases import Case, Region  # noqa: E402
from medeyes_env.env import EnvConfig, MedEyesEnv  # noqa: E402
from medeyes_env.errors import RecordError  # noqa: E402

ARCHS = ["idefics3", "qwen2_5_vl"]
ENV = EnvConfig(max_steps=2, view_size=128)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {arch: load_policy_model(tiny_models.path(arch)) for arch in ARCHS}


def _case() -> Case:
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8"))
    return Case(
        id="t/0",
        question="Is there a lesion?",
        answer="yes",
        answer_type="closed",
        source="t",
        regions=(Region(box=(40, 40, 90, 90)),),
        image_size=(320, 256),
    ).with_image_factory(lambda: image)


def _policy_episode(model, processor, turns=3, max_new_tokens=12):
    """A real episode of the random tiny policy through MedEyesEnv; returns messages, turns and each turn's prompt ids."""
    backend = TransformersBackend(model, processor)
    env = MedEyesEnv(source="samples", config=ENV)
    env.reset(options={"case": _case()})
    out_turns, prompts = [], []
    for t in range(turns):
        messages = env.chat_messages()
        prompts.append(backend.encode([messages])["input_ids"][0])
        out = backend.generate([messages], SamplingConfig(max_new_tokens=max_new_tokens, seed=t))[0]
        out_turns.append(TurnTokens(out.text, out.token_ids, out.logprobs))
        _, _, terminated, truncated, _ = env.step(out.text)
        if terminated or truncated:
            break
    messages = env.chat_messages()
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: last + 1], out_turns, prompts


def assert_forward_pass_reproduces_recorded_logprobs(model, processor, episode) -> None:
    """A training forward pass over the episode gives the log-probs recorded at generation (atol 1e-4)."""
    batch = collate([episode], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    logprobs = sequence_logprobs_from_logits(logits[:, :-1], batch.input_ids[:, 1:])[0]
    mask = batch.loss_mask[0, 1:]
    assert torch.allclose(logprobs[mask], batch.old_logprobs[0, 1:][mask], atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_is_one_exactly_on_generated_tokens(models, arch):
    model, processor = models[arch]
    messages, turns, prompts = _policy_episode(model, processor)
    episode = tokenize_episode(messages, turns, processor)

    expected = torch.zeros(episode.length, dtype=torch.bool)
    for (start, end), turn in zip(episode.turn_spans, turns, strict=True):
        assert episode.input_ids[start:end].tolist() == turn.token_ids  # the sampled ids, verbatim
        assert torch.allclose(episode.old_logprobs[start:end], torch.tensor(turn.logprobs))
        expected[start:end] = True
    assert torch.equal(episode.loss_mask, expected)
    assert episode.generated_tokens == sum(len(t.token_ids) for t in turns)
    assert torch.all(episode.old_logprobs[~episode.loss_mask] == 0)
    assert episode.has_logprobs and episode.retokenized_turns == 0 and not episode.is_expert
    # The first turn's prompt is exactly what the backend fed the model (prefix property, FEASIBILITY 5).
    first = episode.turn_spans[0][0]
    assert torch.equal(episode.input_ids[:first], prompts[0])
    # Image tokens are never trained on.
    image_token = model.config.image_token_id
    assert not episode.loss_mask[episode.input_ids == image_token].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_pass_reproduces_first_turn_logprobs(models, arch):
    model, processor = models[arch]
    messages, turns, _ = _policy_episode(model, processor, turns=1)
    episode = tokenize_episode(messages, turns, processor)
    assert_forward_pass_reproduces_recorded_logprobs(model, processor, episode)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_turns_keep_the_prefix_property(models, arch):
    """Expert-style text turns: every turn's backend prompt is an exact prefix of our sequence."""
    _, processor = models[arch]
    env = MedEyesEnv(source="samples", config=ENV)
    env.reset(options={"case": _case()})
    env.step(
        '<reasoning>two spots</reasoning>\n<action>{"name": "scan", "boxes": [[0, 0, 100, 100], [40, 40, 90, 90]]}</action>'
    )
    env.step('<reasoning>look closer</reasoning>\n<action>{"name": "drill", "box": [40, 40, 90, 90]}</action>')
    env.step("<reasoning>conclude</reasoning>\n<answer>yes</answer>")
    messages = env.chat_messages()
    assert prefix_mismatches(messages, processor) == []
    texts = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    episode = tokenize_episode(messages, [TurnTokens(t) for t in texts], processor, is_expert=True)
    assert episode.is_expert and episode.retokenized_turns == 3 and not episode.has_logprobs
    decoded = [processor.tokenizer.decode(episode.input_ids[s:e]).strip() for s, e in episode.turn_spans]
    assert decoded == texts
    assert episode.image_inputs  # three images: overview, scan montage, drill zoom
    assert int((episode.input_ids == processor.image_token_id).sum()) > 0


def test_generated_end_of_turn_is_not_duplicated(models):
    model, processor = models["idefics3"]
    messages, turns, _ = _policy_episode(model, processor, turns=1)
    eos = processor.tokenizer.eos_token_id
    env = MedEyesEnv(source="samples", config=ENV)
    env.reset(options={"case": _case()})
    text = "<reasoning>x</reasoning>\n<answer>yes</answer>"
    env.step(text)
    ids = processor.tokenizer(" " + text, add_special_tokens=False)["input_ids"] + [eos]
    episode = tokenize_episode(env.chat_messages(), [TurnTokens(text, ids, [0.0] * len(ids))], processor)
    assert (
        episode.input_ids[-1].item() == eos
        and int((episode.input_ids == eos).sum())
        == int((episode.input_ids[: episode.turn_spans[0][0]] == eos).sum()) + 1
    )


def test_expert_records_from_the_store(models, tmp_path):
    _, processor = models["idefics3"]
    store = TrajectoryStore(tmp_path / "expert")
    agent = ExpertAgent("annotation", ExpertConfig(n_expert=2, t_max=2))
    result = run_rollout(agent, "phantom:easy", RolloutConfig(split="train", n=2, env=ENV), store=store)
    records = [r for r in result.records if r.kept]
    assert records
    episodes = [tokenize_record(r, store, processor) for r in records]
    for record, episode in zip(records, episodes, strict=True):
        assert episode.is_expert  # producer kind "expert" sets the stream flag
        assert len(episode.turn_spans) == len(record.steps)
        spans = [processor.tokenizer.decode(episode.input_ids[s:e]).strip() for s, e in episode.turn_spans]
        assert spans == [s.text for s in record.steps]
    batch = collate(episodes, processor.tokenizer.pad_token_id)
    assert batch.input_ids.shape == batch.loss_mask.shape == batch.attention_mask.shape
    assert batch.image_inputs["pixel_values"].shape[0] == len(episodes)
    assert batch.is_expert.all()


def test_mismatched_turns_are_refused(models):
    _, processor = models["idefics3"]
    env = MedEyesEnv(source="samples", config=ENV)
    env.reset(options={"case": _case()})
    env.step("<reasoning>x</reasoning>\n<answer>yes</answer>")
    with pytest.raises(RecordError, match="1 assistant messages but 0 turns"):
        tokenize_episode(env.chat_messages(), [], processor)
    with pytest.raises(RecordError, match="differs from the assistant message"):
        tokenize_episode(env.chat_messages(), [TurnTokens("something else")], processor)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_turn_is_generated_from_the_training_sequence(models, arch):
    """With the sampled ids of earlier turns passed back, a forward pass over the training sequence
    reproduces the log-probs of every turn, not only the first (no re-tokenisation between turns)."""
    model, processor = models[arch]
    agent = PolicyAgent(TransformersBackend(model, processor), SamplingConfig(max_new_tokens=12, seed=3))
    env = MedEyesEnv(source="samples", config=ENV)
    env.reset(options={"case": _case()})
    context = EpisodeContext(0, env.case, env.image, env.chat_messages(), 0, ENV.max_steps)
    turns = []
    for step in range(3):
        context.messages, context.step = env.chat_messages(), step
        out = agent.act([context])[0]
        turns.append(TurnTokens(out.text, out.token_ids, out.logprobs))
        _, _, terminated, truncated, _ = env.step(out.text)
        if terminated or truncated:
            break
    assert len(turns) >= 2, "the random policy ended the episode in one turn; pick another seed"
    messages = env.chat_messages()
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    episode = tokenize_episode(messages[: last + 1], turns, processor)
    assert_forward_pass_reproduces_recorded_logprobs(model, processor, episode)


def test_segment_cache_never_mixes_up_images(models):
    """The GRPO step tokenises a group's rollouts with a shared cache: each episode must keep its own pixels
    (a cache keyed on the ids of temporary image copies once handed one case's pixels to another)."""
    from medeyes.agents.random_agent import RandomAgent
    from medeyes.trajectories import MemoryStore

    _, processor = models["idefics3"]
    store = MemoryStore()
    single_turn = EnvConfig(max_steps=0, view_size=128)
    config = RolloutConfig(split="train", n=6, samples_per_case=3, env=single_turn)
    records = run_rollout(RandomAgent(), "phantom:easy", config, store=store).records
    cache: dict = {}
    cached = [tokenize_record(r, store, processor, cache=cache) for r in records]
    assert len(cache) == len({r.image for r in records}) == 6  # one encoding per distinct overview
    for record, episode in zip(records, cached, strict=True):
        fresh = tokenize_record(record, store, processor)
        assert torch.equal(episode.image_inputs["pixel_values"], fresh.image_inputs["pixel_values"])
        assert torch.equal(episode.input_ids, fresh.input_ids)
