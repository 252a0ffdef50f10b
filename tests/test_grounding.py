"""The ground stage: grounding examples from a case's annotations, and a tiny run that trains on them."""

import math

import numpy as np
import pytest

pytest.importorskip("torch")

from medeyes.training.config import build_config, preset
from medeyes.training.metrics import read_metrics
from medeyes.training.stages.ground_examples import (
    WHAT_QUESTION,
    WHERE_QUESTION,
    candidates,
    episode_grounding_examples,
    grounding_examples,
)
from medeyes.training.trainer import train
from medeyes_env.env import EnvConfig, MedEyesEnv
from medeyes_env.protocol import BoxFormat, parse_turn
from medeyes_env.rewards import box_iou
from medeyes_env.sources import open_cases

LOC = EnvConfig(view_size=128, drill_min_side=64, box_format=BoxFormat(kind="loc", bins=16))


def _look_case(answer: str):
    source = open_cases("phantom:look", {"families": ["presence"]})
    for index in range(50):
        case = source.case("train", index)
        if case.answer == answer:
            return case
    raise AssertionError("no such case")


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_where_points_at_the_one_candidate_and_what_names_it(answer):
    case = _look_case(answer)
    (box, label), *rest = candidates(case)
    assert not rest and label == answer  # a drill view of a lesion says yes, of a mimic no
    where, what = grounding_examples(
        case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1, system_prompt=True
    )
    bare, _ = grounding_examples(case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1)
    assert [m["role"] for m in bare[0]] == ["user", "assistant"] and bare[1] == where[1]
    messages, text = where
    assert messages[0]["role"] == "system" and "location tokens" in messages[0]["content"][0]["text"]
    assert messages[1]["content"][1]["text"] == WHERE_QUESTION and messages[2]["content"][0]["text"] == text
    assert messages[1]["content"][0]["image"].size == (128, 128)  # the overview, as the environment shows it
    # The answer is the candidate's box in the environment's box format: it parses back to nearly that box.
    turn = parse_turn(f'<reasoning>r</reasoning><action>{{"name": "drill", "box": {text}}}</action>', (512, 512),
                      box_format=LOC.box_format)  # fmt: skip
    assert turn.action is not None and box_iou(turn.action.boxes[0], box) > 0.4
    messages, text = what
    assert messages[1]["content"][1]["text"] == WHAT_QUESTION and text == label


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_episode_shaped_examples_are_the_episodes_own_turns(answer):
    """ground.shape=episode: the context is what the environment shows, the target is the turn the expert writes."""
    case = _look_case(answer)
    (box, _), *_ = candidates(case)
    where, what = episode_grounding_examples(case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1)
    game = MedEyesEnv(source="phantom:look", config=LOC)
    game.reset(options={"case": case})
    opening = game.chat_messages()
    messages, text = where
    assert messages[:-1] == opening and messages[-1]["content"][0]["text"] == text
    scan = parse_turn(text, case.image_size, box_format=LOC.box_format)
    assert scan.action.name == "scan" and box_iou(scan.action.boxes[0], box) > 0.4
    messages, text = what
    assert [m["role"] for m in messages] == [*(m["role"] for m in opening), "assistant", "user", "assistant", "user",
                                             "assistant"]  # fmt: skip
    drill = parse_turn(messages[-3]["content"][0]["text"], case.image_size, box_format=LOC.box_format)
    assert drill.action.name == "drill" and box_iou(drill.action.boxes[0], box) > 0.3  # jittered, still on it
    assert "Zoomed into region" in messages[-2]["content"][1]["text"]  # the environment's own feedback
    final = parse_turn(text, case.image_size, box_format=LOC.box_format)
    assert final.action.name == "answer" and final.action.answer == answer


def test_turn_answers_are_what_the_episode_parses(tmp_path):
    """ground.shape=turns: the short probe contexts, answered with the turns an episode's parser reads."""
    case = _look_case("no")
    (box, label), *_ = candidates(case)
    where, what = grounding_examples(case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1, as_turns=True)
    bare_where, bare_what = grounding_examples(case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1)
    assert where[0][:-1] == bare_where[0][:-1] and what[0][0]["content"][1]["text"] == WHAT_QUESTION  # same context
    scan = parse_turn(where[1], case.image_size, box_format=LOC.box_format)
    assert scan.action.name == "scan" and box_iou(scan.action.boxes[0], box) > 0.4
    final = parse_turn(what[1], case.image_size, box_format=LOC.box_format)
    assert final.action.name == "answer" and final.action.answer == label == "no"


def test_episode_shape_skips_global_questions():
    source = open_cases("phantom:look", {"families": ["modality"]})
    case = source.case("train", 0)
    assert candidates(case)  # the image holds an object, but the question is not about it
    assert episode_grounding_examples(case, LOC, ("where", "what"), np.random.default_rng(0), jitter=0.1) == []


def test_episode_shaped_ground_step_trains_only_the_last_turn(tmp_path, tiny_cache):
    data = preset("tiny").model_dump(mode="json")
    data.update(run_dir=str(tmp_path / "run"), stages=["ground"], data="phantom:look")
    data["ground"].update(shape="episode", what_share=1.0, cases=8)
    cfg = build_config(data)
    train(cfg, resume=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "train/loss" in r]
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows)
    # loss tokens: one scan turn or one answer turn per example, never the scan and drill turns before an answer
    assert all(r["train/loss_tokens"] <= cfg.ground.batch_size * 40 for r in rows)


def test_ground_stage_trains_on_the_training_split_only(tmp_path, tiny_cache):
    data = preset("tiny").model_dump(mode="json")
    data.update(run_dir=str(tmp_path / "run"), stages=["ground", "sft"])
    cfg = build_config(data)
    train(cfg, resume=False)
    rows = [r for r in read_metrics(cfg.run_dir) if "train/loss" in r]
    assert [r["train/stage"] for r in rows] == [-1.0, -1.0, 0.0, 0.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss_tokens"] > 0 for r in rows)
    # a ground step is short single-image sequences: far fewer tokens per example than an expert trajectory
    ground, sft = rows[0], rows[2]
    assert ground["train/tokens"] / cfg.ground.batch_size < sft["train/tokens"] / cfg.sft.batch_size
    # held-out grounding is measured at every evaluation
    evals = [r for r in read_metrics(cfg.run_dir) if "eval/accuracy" in r]
    assert evals and all(0.0 <= r["eval/ground/hit"] <= 1.0 and "eval/ground/iou" in r for r in evals)


def test_sft_co_trains_on_ground_examples(tmp_path, tiny_cache):
    """sft.ground_examples adds grounding examples to every SFT step on top of the same expert trajectories."""
    tokens = {}
    for extra in (0, 3):
        data = preset("tiny").model_dump(mode="json")
        data.update(run_dir=str(tmp_path / f"run{extra}"), stages=["sft"])
        data["sft"]["ground_examples"] = extra
        cfg = build_config(data)
        train(cfg, resume=False)
        tokens[extra] = [r["train/tokens"] for r in read_metrics(cfg.run_dir) if "train/tokens" in r]
    assert len(tokens[0]) == len(tokens[3]) == 2
    assert all(b > a for a, b in zip(tokens[0], tokens[3], strict=True))


def test_empty_region_examples_answer_no_and_leave_the_default_draws_alone():
    """ground.empty_share: a drill view of an empty region says "no", even on a case whose answer is yes."""
    from medeyes.training.stages.ground_examples import empty_box

    case = _look_case("yes")
    default_rng, off_rng, on_rng = (np.random.default_rng(3) for _ in range(3))
    default = grounding_examples(case, LOC, ("where", "what"), default_rng, jitter=0.1, as_turns=True)
    off = grounding_examples(case, LOC, ("where", "what"), off_rng, jitter=0.1, as_turns=True, empty_share=0.0)
    assert [text for _, text in off] == [text for _, text in default]
    assert off_rng.random() == default_rng.random()  # no extra draw: runs without the option stay bit-identical
    on = grounding_examples(case, LOC, ("where", "what"), on_rng, jitter=0.1, as_turns=True, empty_share=1.0)
    assert len(on) == 3 and on[1][1].endswith("<answer>yes</answer>") and on[2][1].endswith("<answer>no</answer>")
    assert on[2][0][0]["content"][1]["text"] == WHAT_QUESTION
    objects = [box for box, _ in candidates(case)]
    box = empty_box(objects, case.image_size, np.random.default_rng(0))
    assert box is not None and all(box_iou(box, b) == 0.0 for b in objects)
