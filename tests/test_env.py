"""MedEyesEnv through the public Gymnasium API: determinism, protocol handling, rewards, vector envs (Gymnasium's own
suite over every registered id is tests/test_gym_suite.py)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import medeyes_env  # noqa: F401  (registers the ids)
from medeyes_env.cases import AnswerType
from medeyes_env.env import EnvConfig, MedEyesEnv
from medeyes_env.errors import ConfigError


def drill(box, reasoning="look closer"):
    return f"<reasoning>{reasoning}</reasoning><action>{json.dumps({'name': 'drill', 'box': list(box)})}</action>"


def scan(boxes, reasoning="compare candidates"):
    return f"<reasoning>{reasoning}</reasoning><action>{json.dumps({'name': 'scan', 'boxes': [list(b) for b in boxes]})}</action>"


def answer(text, reasoning="decided"):
    return f"<reasoning>{reasoning}</reasoning><answer>{text}</answer>"


def gold_answer_text(case):
    return case.answer


def test_same_seed_same_episode():
    first, second = MedEyesEnv(), MedEyesEnv()
    obs_a, info_a = first.reset(seed=7)
    obs_b, info_b = second.reset(seed=7)
    assert info_a["case_id"] == info_b["case_id"]
    np.testing.assert_array_equal(obs_a["image"], obs_b["image"])
    action = drill((100, 100, 300, 300))
    step_a, step_b = first.step(action), second.step(action)
    np.testing.assert_array_equal(step_a[0]["image"], step_b[0]["image"])
    assert step_a[1:4] == step_b[1:4]
    other_ids = {MedEyesEnv().reset(seed=seed)[1]["case_id"] for seed in range(20, 25)}
    assert len(other_ids) == 5, "different seeds should draw different cases"


def test_gold_answer_after_drilling_gold_region_earns_full_reward():
    env = MedEyesEnv(split="test")
    for index in range(30):
        obs, info = env.reset(options={"case_index": index})
        case = env.case
        boxes = [r.box for r in case.regions] or [(0, 0, 200, 200)]
        obs, reward, terminated, truncated, info = env.step(drill(boxes[0]))
        assert not terminated and not truncated and reward == 0.0
        assert info["parsed_ok"] and info["action"] == "drill"
        obs, reward, terminated, truncated, info = env.step(answer(gold_answer_text(case)))
        assert terminated and not truncated
        components = info["reward_components"]
        assert components["accuracy"] == 1.0, (case.id, case.question, case.answer)
        assert components["grammar"] == 1.0
        assert reward == pytest.approx(info["reward_total"])
        if case.regions:
            assert components["best_iou"] > 0.0


def test_choice_answer_by_letter_is_accepted():
    env = MedEyesEnv(split="test")
    for index in range(200):
        env.reset(options={"case_index": index})
        if env.case.answer_type is AnswerType.CHOICE:
            letter = "ABCDEFGH"[env.case.options.index(env.case.answer)]
            *_, info = env.step(answer(letter))
            assert info["reward_components"]["accuracy"] == 1.0
            return
    pytest.fail("no CHOICE case in the first 200 test cases")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "just some words",
        '<reasoning>x</reasoning><action>{"name": "drill", "box": [1, 2</action>',
        '<reasoning>x</reasoning><action>{"name": "teleport", "box": [1, 2, 3, 4]}</action>',
        '<reasoning>x</reasoning><action>{"name": "drill", "box": [50, 50, 10, 10]}</action>',
        '<reasoning>x</reasoning><action>{"name": "drill", "box": [5000, 5000, 6000, 6000]}</action>',
        "<answer>" + "y" * 100_000 + "</answer>",
        b"\xff\xfe binary",
        None,
        12345,
    ],
)
def test_malformed_turns_become_feedback_not_exceptions(bad):
    env = MedEyesEnv(malformed_penalty=0.05)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(bad)
    assert not terminated
    assert info["parsed_ok"] is False and info["error"]
    assert reward == pytest.approx(-0.05)
    assert obs["text"].startswith("<feedback>") and "could not be executed" in obs["text"]
    assert env.observation_space.contains(obs)
    # The episode goes on, and the grammar reward of the episode is lost.
    *_, info = env.step(answer("yes"))
    assert info["reward_components"]["grammar"] == 0.0


def test_truncates_after_max_steps_without_answer():
    env = MedEyesEnv(max_steps=2)
    env.reset(seed=1)
    results = [env.step(drill((0, 0, 100, 100))) for _ in range(2)]
    assert not any(r[2] or r[3] for r in results)
    assert "must be an answer" in results[-1][0]["text"]
    obs, reward, terminated, truncated, info = env.step(drill((0, 0, 100, 100)))
    assert truncated and not terminated
    assert info["reward_components"]["accuracy"] == 0.0
    with pytest.raises(gym.error.ResetNeeded):
        env.step(answer("yes"))


def test_drill_view_is_a_full_resolution_zoom_with_minimum_side():
    env = MedEyesEnv(drill_min_side=96, view_size=256)
    env.reset(seed=3)
    obs, *_, info = env.step(drill((500, 500, 510, 505)))
    ((x1, y1, x2, y2),) = info["shown_boxes"]
    assert x2 - x1 == pytest.approx(96) and y2 - y1 == pytest.approx(96)
    assert x1 <= 500 and x2 >= 510
    expected = env.image.resize((256, 256), box=(x1, y1, x2, y2))
    assert np.abs(np.asarray(expected, dtype=int) - obs["image"]).mean() < 1


def test_scan_returns_one_view_listing_every_region():
    env = MedEyesEnv()
    env.reset(seed=4)
    boxes = [(0, 0, 200, 200), (300, 300, 500, 500), (600, 100, 800, 300)]
    obs, _, _, _, info = env.step(scan(boxes))
    assert info["action"] == "scan" and len(info["shown_boxes"]) == 3
    assert obs["text"].count("[") >= 3
    assert obs["image"].shape == (256, 256, 3)


def test_chat_messages_alternate_and_carry_every_view():
    env = MedEyesEnv()
    env.reset(seed=5)
    env.step(scan([(0, 0, 300, 300), (400, 400, 700, 700)]))
    env.step(drill((400, 400, 700, 700)))
    env.step(answer("yes"))
    messages = env.chat_messages()
    roles = [m["role"] for m in messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    images = [part for m in messages for part in m["content"] if part["type"] == "image"]
    assert len(images) == 3
    urls = env.chat_messages(image_format="data_url")
    parts = [part for m in urls for part in m["content"] if part["type"] == "image_url"]
    assert len(parts) == 3 and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_render_draws_explored_boxes():
    env = MedEyesEnv(render_mode="rgb_array")
    env.reset(seed=6)
    before = env.render()
    env.step(drill((100, 100, 400, 400)))
    after = env.render()
    assert before.shape == after.shape == (512, 512, 3)
    assert (before != after).any()


def test_bad_config_is_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="max_steps"):
        MedEyesEnv(max_steps=-1)
    with pytest.raises(ConfigError, match="view_sise"):
        MedEyesEnv(view_sise=128)
    with pytest.raises(ConfigError, match="render_mode"):
        MedEyesEnv(render_mode="human")


def test_config_object_round_trips_through_json():
    config = EnvConfig(max_steps=3, scan_mode="outline")
    assert EnvConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_make_vec_steps_four_envs(mode):
    envs = gym.make_vec("MedEyes/Phantom-v0", num_envs=4, vectorization_mode=mode)
    try:
        obs, info = envs.reset(seed=11)
        assert obs["image"].shape == (4, 256, 256, 3)
        assert len(obs["text"]) == 4
        obs, reward, terminated, truncated, info = envs.step([drill((0, 0, 256, 256))] * 4)
        assert reward.shape == (4,) and not terminated.any()
        obs, reward, terminated, truncated, info = envs.step([answer("yes")] * 4)
        assert terminated.all()
        assert ((reward >= 0) & (reward <= 1)).all()
        assert np.allclose(reward, info["reward_total"])
    finally:
        envs.close()


def test_brief_instructions_state_the_same_protocol_in_fewer_words():
    full = MedEyesEnv(config=EnvConfig(max_steps=2))
    brief = MedEyesEnv(config=EnvConfig(max_steps=2, instructions="brief"))
    full.reset(seed=3)
    brief.reset(seed=3)
    short, long = brief.unwrapped.system_prompt(), full.unwrapped.system_prompt()
    assert len(short) < len(long) / 2
    for form in ('"name": "scan"', '"name": "drill"', "<answer>", "<reasoning>", "At most 3 turns"):
        assert form in short
    # Only the system prompt differs: the episode itself (question, views, rewards) is the same.
    assert brief.unwrapped.chat_messages()[1:] == full.unwrapped.chat_messages()[1:]
    obs, reward, terminated, _, _ = brief.step(answer(gold_answer_text(brief.unwrapped.case)))
    assert terminated and reward > 0.6


def test_prompt_does_not_give_away_the_modality():
    env = MedEyesEnv(source="phantom", config=EnvConfig(max_steps=1))
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        case = env.unwrapped.case
        assert case.modality.lower() not in obs["text"].lower().split("\n")[0]


def test_no_instructions_leaves_out_the_system_message():
    """instructions="none" (tiny models trained from scratch): the episode opens with the image and question."""
    env = MedEyesEnv("phantom:look", instructions="none", box_format={"kind": "loc", "bins": 16})
    env.reset(seed=0)
    messages = env.chat_messages("pil")
    assert [m["role"] for m in messages] == ["user"] and env.system_prompt() == ""
    env.step('<reasoning>r</reasoning><action>{"name": "drill", "box": "<loc04><loc04><loc08><loc08>"}</action>')
    assert [m["role"] for m in env.chat_messages("pil")] == ["user", "assistant", "user"]


DRILL_TURN = '<reasoning>look</reasoning><action>{"name": "drill", "box": [100, 100, 300, 300]}</action>'


def _stream(env: MedEyesEnv, resets: list[dict]) -> list[bytes]:
    """Observations of a mix of streamed, seeded and named resets, each followed by one drill."""
    seen = []
    for kwargs in resets:
        obs, info = env.reset(**kwargs)
        seen += [obs["image"].tobytes(), obs["text"].encode(), info["case_id"].encode()]
        seen.append(env.step(DRILL_TURN)[0]["image"].tobytes())
    env.close()
    return seen


def test_render_ahead_gives_the_same_episodes_as_loading_at_reset():
    # streamed resets (render-ahead on) mixed with a seeded one and a named case, which must drop the guess
    resets = [{"seed": 5}, {}, {}, {"options": {"case_index": 3}}, {}, {}, {"seed": 9}, {}]
    ahead = _stream(MedEyesEnv("phantom:look", split="train"), resets)
    plain = _stream(MedEyesEnv("phantom:look", split="train", render_ahead=False), resets)
    assert ahead == plain


def test_render_ahead_survives_pickling_with_a_load_in_flight():
    import pickle

    env = MedEyesEnv("phantom:look", split="train")
    env.reset(seed=1)
    env.reset()  # starts loading the next case
    copy_ = pickle.loads(pickle.dumps(env))
    assert copy_.reset()[1]["case_id"] == env.reset()[1]["case_id"]
    env.close()
    copy_.close()


def test_a_case_that_fails_to_load_ahead_fails_at_its_own_reset_with_its_own_message(tmp_path):
    from PIL import Image

    from medeyes_env.cases import Case
    from medeyes_env.errors import ImageLoadError

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "good.png")

    class HalfMissing:
        """Even cases load, odd cases name a file that is not there."""

        name = "half"

        def size(self, split):
            return 50

        def case(self, split, index):
            image = tmp_path / ("good.png" if index % 2 == 0 else f"missing-{index}.png")
            return Case(
                id=f"half/{index}",
                question="q?",
                answer="yes",
                answer_type=AnswerType.CLOSED,
                source="half",
                split=split,
                image_path=str(image),
            )

    def outcomes(render_ahead: bool) -> list[str]:
        env = MedEyesEnv(HalfMissing(), split="test", render_ahead=render_ahead)
        seen = []
        for kwargs in [{"seed": 0}] + [{}] * 15:
            try:
                seen.append(env.reset(**kwargs)[1]["case_id"])
            except ImageLoadError as exc:
                seen.append(str(exc))
        env.close()
        return seen

    ahead = outcomes(True)
    assert ahead == outcomes(False)
    assert any("missing-" in outcome for outcome in ahead[2:])  # a failed background load, raised at its reset
