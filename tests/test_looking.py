"""Progressive looking: scans localise and only drills show detail, both sides are looked at, re-drills are counted."""

import numpy as np
import pytest
from PIL import Image

from medeyes.agents.expert.agent import ExpertAgent
from medeyes.agents.expert.config import ExpertConfig
from medeyes.agents.expert.oracles.factory import make_oracle
from medeyes.rollout import RolloutConfig, run_rollout
from medeyes.rollout_summary import summarize
from medeyes_env import views
from medeyes_env.env import EnvConfig, MedEyesEnv
from medeyes_env.protocol import Action, BoxFormat, parse_turn, render_turn
from medeyes_env.rewards import box_iou
from medeyes_env.sources import open_cases

LOOK = EnvConfig(max_steps=3, view_size=128, drill_min_side=64, box_format=BoxFormat(kind="loc", bins=16))


def _striped(size: int = 512) -> Image.Image:
    """Alternate pixel columns black and white: detail that any 4x area average removes."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, ::2] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("boxes", "inner"), [(1, (slice(20, 40), slice(20, 40))), (5, (slice(32, 56), slice(12, 36)))])
def test_a_scan_tile_shows_no_more_detail_than_the_overview(boxes, inner):
    image = _striped()
    regions = [(64.0 * i, 64.0, 64.0 * i + 64, 128.0) for i in range(boxes)]
    coarse, _ = views.scan_view(image, regions, 128, 64, "montage", detail="overview")
    fine, _ = views.scan_view(image, regions, 128, 64, "montage", detail="full")
    drill, _ = views.drill_view(image, regions[0], 128, 64)
    # ``inner``: inside the first tile (one tile of 128 px, or a 3 x 2 grid of 42 px tiles), off its frame and number
    # full-resolution tiles and the drill show the stripes; overview tiles are the overview's flat grey
    assert np.asarray(fine)[inner].std() > 40 and np.asarray(drill)[20:40, 20:40].std() > 40
    assert np.asarray(coarse)[inner].std() < 5


def test_the_environment_scans_at_overview_detail_by_default():
    assert EnvConfig().scan_detail == "overview"
    source = open_cases("phantom:look", {"families": ["presence"]})
    case = source.case("test", 0)
    box = case.lookalikes[0].box if case.lookalikes else case.regions[0].box
    shown = {}
    for detail in ("overview", "full"):
        env = MedEyesEnv(source="phantom:look", config=LOOK.model_copy(update={"scan_detail": detail}))
        env.reset(options={"case": case})
        obs, *_ = env.step(render_turn(Action.scan(box), "r", LOOK.box_format, case.load_image().size))
        assert "Scanned 1 region" in obs["text"]
        shown[detail] = np.asarray(obs["image"], dtype=float)
    assert np.abs(shown["overview"] - shown["full"]).mean() > 1.0


PRESENCE = open_cases("phantom:look", {"families": ["presence"]})


def _index(answer: str) -> int:
    """A training case with that answer whose object is off the midline (its mirror is another place)."""
    for index in range(60):
        case = PRESENCE.case("train", index)
        objects = [r.box for r in (*case.regions, *case.lookalikes)]
        if case.answer == answer and views.mirrored_boxes(objects, case.load_image().size[0]):
            return index
    raise AssertionError("no such case")


def _case(answer: str):
    return PRESENCE.case("train", _index(answer))


def _expert_rollout(answer: str, **config):
    oracle = make_oracle("annotation", lookalikes="like_gold", distractors=0.0, bilateral=True, miss_rate=0.0)
    expert = ExpertAgent(oracle, ExpertConfig(max_regions=2, t_max=3, **config))
    rollout = RolloutConfig(n=1, start=_index(answer), split="train", env=LOOK, keep_only_correct=False)
    return run_rollout(expert, PRESENCE, rollout).records


def test_the_bilateral_oracle_proposes_the_other_side_and_its_drill_finds_nothing():
    case = _case("yes")
    image = case.load_image()
    oracle = make_oracle("annotation", lookalikes="like_gold", distractors=0.0, bilateral=True, miss_rate=0.0)
    found = oracle.scan(image, case.question, case=case, rng=np.random.default_rng(0))
    gold = case.regions[0].box
    mirror = (image.width - gold[2], gold[1], image.width - gold[0], gold[3])
    assert len(found) == 2
    assert max(box_iou(r.box, gold) for r in found) > 0.3 and max(box_iou(r.box, mirror) for r in found) > 0.3
    rng = np.random.default_rng(0)
    assert oracle.drill(image, mirror, case.question, case=case, rng=rng) < 0.5
    assert oracle.drill(image, gold, case.question, case=case, rng=rng) > 0.8


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_the_expert_drills_the_other_candidate_when_a_drill_shows_nothing(answer):
    records = _expert_rollout(answer, n_expert=8, low_gain="next")
    paths = {tuple(s.action.name for s in r.steps) for r in records}
    assert all(path.count("scan") == 1 for path in paths)  # the second look needs no second scan
    if answer == "no":  # the mimic and the empty side both read low: both drilled
        assert paths == {("scan", "drill", "drill", "answer")}
    else:  # the lesion at once, or the empty side first and then the lesion
        assert ("scan", "drill", "answer") in paths and ("scan", "drill", "drill", "answer") in paths
    assert sum(r.final_answer == answer for r in records) >= 6  # the oracle's confidences are noisy
    summary = summarize(records)
    if answer == "yes":
        assert 0 < summary.first_drill_hit_share < 1
        assert summary.redrill_after_miss == 1.0 and summary.tool_steps_first_miss == 3.0
        assert summary.tool_steps_first_hit < summary.tool_steps_first_miss
    else:  # no gold box: nothing to hit
        assert summary.first_drill_hit_share is None and summary.looking_episodes == 0


def test_paper_behaviour_is_unchanged_by_default():
    """Without low_gain=next a drill that finds nothing sends the expert back to scanning (METHOD.md section 3)."""
    records = _expert_rollout("no", n_expert=4)
    assert {tuple(s.action.name for s in r.steps)[:3] for r in records} == {("scan", "drill", "scan")}


def test_bilateral_where_targets_name_both_sides_left_to_right():
    pytest.importorskip("torch")
    from medeyes.training.stages.ground_examples import grounding_examples

    case = _case("no")
    rng = np.random.default_rng(0)
    (_, plain), *_ = grounding_examples(case, LOOK, ("where",), rng, 0.1, as_turns=True)
    (_, both), *_ = grounding_examples(case, LOOK, ("where",), rng, 0.1, as_turns=True, bilateral=True)
    size = case.load_image().size
    one = parse_turn(plain, size, box_format=LOOK.box_format).action.boxes
    two = parse_turn(both, size, box_format=LOOK.box_format).action.boxes
    mimic = case.lookalikes[0].box
    mirror = (size[0] - mimic[2], mimic[1], size[0] - mimic[0], mimic[3])
    assert len(one) == 1 and len(two) == 2 and two[0][0] < two[1][0]
    assert max(box_iou(b, mimic) for b in two) > 0.4 and max(box_iou(b, mirror) for b in two) > 0.4


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_what_pairs_show_both_drilled_sides_and_answer_for_the_object(answer):
    pytest.importorskip("torch")
    from medeyes.training.stages.ground_examples import grounding_examples

    case = _case(answer)
    orders = set()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        (messages, text), *_ = grounding_examples(case, LOOK, ("what",), rng, 0.1, as_turns=True, what_pairs=True)
        images = [part["image"] for part in messages[0]["content"] if part["type"] == "image"]
        assert len(images) == 2 and f"<answer>{answer}</answer>" in text
        # the object's drill view differs from the empty side's: one of them holds the round object
        spread = [np.asarray(image.convert("L"), dtype=float).std() for image in images]
        orders.add(int(np.argmax(spread)))
    assert orders == {0, 1}  # the object's view comes first or second
