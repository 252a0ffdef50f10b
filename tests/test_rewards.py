import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medeyes_env.cases import AnswerType, Box, Case, Region
from medeyes_env.episode_score import EpisodeScore
from medeyes_env.protocol import Action, parse_turn, render_turn
from medeyes_env.rewards import (
    METRIC_COMPONENTS,
    REWARD_COMPONENTS,
    REWARD_PRESETS,
    RewardConfig,
    accuracy_reward,
    box_iou,
    choice_letter,
    distinct_regions,
    diversity_reward,
    grammar_reward,
    grounding_reward,
    normalize_answer,
    region_iou,
    score_episode,
    token_recall,
    tool_reward,
)
from medeyes_env.shapes import disc_shape

A = (0.0, 0.0, 10.0, 10.0)
B = (5.0, 5.0, 15.0, 15.0)  # IoU(A, B) = 25 / 175 = 1/7
FAR = [(100.0 * i, 100.0, 100.0 * i + 20, 120.0) for i in range(6)]  # pairwise disjoint


def closed(answer: str = "yes", regions: tuple[Region, ...] = ()) -> Case:
    return Case(
        id="t/closed",
        question="Is there a nodule?",
        answer=answer,
        answer_type=AnswerType.CLOSED,
        regions=regions,
        source="test",
    )


def choice(answer: str = "left lower lobe") -> Case:
    return Case(
        id="t/choice",
        question="Where is the lesion?",
        answer=answer,
        answer_type=AnswerType.CHOICE,
        options=("right upper lobe", "left lower lobe", "heart"),
        source="test",
    )


def open_case(answer: str = "left lung") -> Case:
    return Case(id="t/open", question="Which organ?", answer=answer, answer_type=AnswerType.OPEN, source="test")


# ---- normalize_answer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("  NO!! ", "no"),
        ("The two nodules", "2 nodules"),
        ("An X-ray of the chest", "x ray of chest"),
        ("Crohn's disease", "crohns disease"),
        ("Crohn\u2019s disease", "crohns disease"),
        ("1,500 cells", "1500 cells"),
        ("2.5 cm", "2.5 cm"),
        ("2.5. ", "2.5"),
        ("left,right", "left right"),
        ("twenty-one ribs", "21 ribs"),
        ("Ninety nine", "99"),
        ("zero", "0"),
        ("twelve", "12"),
        ("none", "none"),
        ("ＹＥＳ", "yes"),
        ("50 %", "50"),
        ("a\tb\n\nc", "b c"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


# ---- box_iou --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (A, A, 1.0),
        (A, B, 25 / 175),
        (A, (2, 2, 4, 4), 4 / 100),
        (A, (10, 0, 20, 10), 0.0),  # touching edge
        (A, (50, 50, 60, 60), 0.0),
        (A, (5, 0, 5, 10), 0.0),  # zero area
        ((0, 0, 4, 2), (2, 0, 6, 2), 4 / 12),
    ],
)
def test_box_iou(a: tuple, b: tuple, expected: float) -> None:
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


# ---- accuracy_reward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),
        ("YES, a nodule in the left lung", "yes", 1.0),
        ("no", "yes", 0.0),
        ("yes and no", "yes", 0.0),
        ("Yes or no", "yes", 0.0),
        ("Yes, there is no doubt", "yes", 0.0),  # exclusivity: both words present
        ("no", "No", 1.0),
        ("No.", "no", 1.0),
        ("not", "no", 0.0),
        ("the answer is yes", "yes", 0.0),  # must start with yes / no
        ("maybe", "yes", 0.0),
        ("", "yes", 0.0),
        (None, "yes", 0.0),
    ],
)
def test_accuracy_closed(prediction: str | None, gold: str, expected: float) -> None:
    assert accuracy_reward(prediction, closed(gold)) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("b", 1.0),
        ("B)", 1.0),
        ("option B", 1.0),
        ("Option: B", 1.0),
        ("Answer: (B)", 1.0),
        ("The answer is B.", 1.0),
        ("B) left lower lobe", 1.0),
        ("B. Left lower lobe", 1.0),
        ("left lower lobe", 1.0),
        ("The left lower lobe.", 1.0),
        ("LEFT LOWER LOBE", 1.0),
        ("B. heart", 0.0),  # the letter and the text name different options
        ("A", 0.0),
        ("(C)", 0.0),
        ("D", 0.0),  # no such option
        ("B and C", 0.0),
        ("left lower", 0.0),
        ("heart", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_accuracy_choice(prediction: str | None, expected: float) -> None:
    assert accuracy_reward(prediction, choice()) == expected


@pytest.mark.parametrize(
    ("prediction", "exact", "recall"),
    [
        ("left lung", 1.0, 1.0),
        ("The left lung.", 1.0, 1.0),
        ("Left Lung", 1.0, 1.0),
        ("left", 0.0, 0.5),
        ("lung left", 0.0, 1.0),
        ("right lung", 0.0, 0.5),
        ("liver", 0.0, 0.0),
        (None, 0.0, 0.0),
    ],
)
def test_accuracy_open(prediction: str | None, exact: float, recall: float) -> None:
    assert accuracy_reward(prediction, open_case()) == exact
    assert accuracy_reward(prediction, open_case(), open_match="token_recall") == recall


def test_open_numbers_match_words() -> None:
    assert accuracy_reward("2", open_case("two")) == 1.0
    assert accuracy_reward("Three.", open_case("3")) == 1.0


# ---- token_recall ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("left lower lobe", "left lobe", 1.0),
        ("lobe", "left lobe", 0.5),
        ("two", "2 2", 0.5),  # multiset: one of the two gold tokens
        ("2 2 2", "two two", 1.0),
        ("", "the", 1.0),  # empty gold against empty prediction
        ("x", "the", 0.0),
        ("", "lobe", 0.0),
        (None, "lobe", 0.0),
    ],
)
def test_token_recall(prediction: str | None, gold: str, expected: float) -> None:
    assert token_recall(prediction, gold) == expected


# ---- grammar, tool ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("turns", "answered", "expected"),
    [
        ([True], True, 1.0),
        ([True, True, True, True], True, 1.0),
        ([True, False, True], True, 0.0),
        ([True, True], False, 0.0),
        ([], True, 0.0),
        ([], False, 0.0),
    ],
)
def test_grammar_reward(turns: list[bool], answered: bool, expected: float) -> None:
    assert grammar_reward(turns, answered) == expected


@pytest.mark.parametrize(
    ("correct", "used", "expected"), [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0), (False, False, 0.0)]
)
def test_tool_reward(correct: bool, used: bool, expected: float) -> None:
    assert tool_reward(correct, used) == expected


# ---- diversity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([], 0.0),
        ([A], 0.5 * 0 + 0.5 * 1 / 4),
        ([A, A], 0.5 * 0 + 0.5 * 1 / 4),
        (FAR[:2], 0.5 * 1 + 0.5 * 2 / 4),
        (FAR[:3], 0.5 * 1 + 0.5 * 3 / 4),
        (FAR[:4], 1.0),
        (FAR[:6], 1.0),
        ([A, A, FAR[0]], 0.5 * 2 / 3 + 0.5 * 2 / 4),
        ([A, B], 0.5 * 1 + 0.5 * 2 / 4),  # IoU 1/7 < 0.5: dissimilar
        # A chain: IoU(c0, c1) = IoU(c1, c2) = 80/120, IoU(c0, c2) = 60/140: one region, 1 of 3 pairs dissimilar.
        ([(0, 0, 10, 10), (2, 0, 12, 10), (4, 0, 14, 10)], 0.5 * 1 / 3 + 0.5 * 1 / 4),
    ],
)
def test_diversity_reward(boxes: list, expected: float) -> None:
    assert diversity_reward(boxes) == pytest.approx(expected)


def test_diversity_threshold_and_cap() -> None:
    assert diversity_reward([A, B], iou_threshold=0.1) == pytest.approx(0.5 * 0 + 0.5 * 1 / 4)
    assert diversity_reward(FAR[:3], max_regions=2) == 1.0
    assert diversity_reward(FAR[:1], max_regions=1) == 0.5
    with pytest.raises(ValueError, match="max_regions must be >= 1, got 0"):
        diversity_reward(FAR, max_regions=0)


def test_diversity_is_order_independent_and_bounded() -> None:
    boxes = [A, B, (0, 0, 10, 11), FAR[0], FAR[1]]
    scores = {round(diversity_reward(list(p)), 12) for p in itertools.permutations(boxes)}
    assert len(scores) == 1
    assert 0.0 <= scores.pop() <= 1.0


def test_distinct_regions() -> None:
    assert distinct_regions([]) == 0
    assert distinct_regions([A, A, A]) == 1
    assert distinct_regions(FAR) == 6
    assert distinct_regions([(0, 0, 10, 10), (2, 0, 12, 10), (4, 0, 14, 10)]) == 1


# ---- grounding -------------------------------------------------------------------------------------------------


def test_grounding_reward() -> None:
    assert grounding_reward([A], [B]) == pytest.approx(1 / 7)
    assert grounding_reward([FAR[0], A], [B, FAR[3]]) == pytest.approx(1 / 7)
    assert grounding_reward([FAR[0], B], [B]) == 1.0
    assert grounding_reward([], [B]) == 0.0
    assert grounding_reward([A], []) == 0.0


# ---- config ----------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_paper_weights() -> None:
    config = RewardConfig()
    assert config.weights() == {"accuracy": 0.7, "grammar": 0.2, "diversity": 0.1, "grounding": 0.0, "tool": 0.0}
    assert all(field.description for field in RewardConfig.model_fields.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accuracy": 0, "grammar": 0, "diversity": 0}, "every reward weight is 0"),
        ({"accuracy": -0.1}, "greater than or equal to 0"),
        ({"tool": float("inf")}, "must be finite"),
        ({"iou_threshold": 0}, "greater than 0"),
        ({"iou_threshold": 1.5}, "less than or equal to 1"),
        ({"diversity_max_regions": 0}, "greater than or equal to 1"),
        ({"open_match": "fuzzy"}, "'exact' or 'token_recall'"),
    ],
)
def test_config_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_a_single_positive_weight() -> None:
    assert RewardConfig(accuracy=0, grammar=0, diversity=0, grounding=1).weights()["grounding"] == 1.0


def test_reward_presets() -> None:
    assert set(REWARD_PRESETS) == {"paper", "deepeyes", "paper_tool", "paper_drill_grounding"}
    assert RewardConfig.preset("paper") == RewardConfig()
    paper = {"accuracy": 0.7, "grammar": 0.2, "diversity": 0.1}
    assert RewardConfig.preset("deepeyes").weights() == {
        "accuracy": 0.8, "grammar": 0.2, "diversity": 0.0, "grounding": 0.0, "tool": 1.2
    }  # fmt: skip
    assert RewardConfig.preset("paper_tool").weights() == {**paper, "grounding": 0.0, "tool": 1.2}
    grounded = RewardConfig.preset("paper_drill_grounding")
    assert grounded.weights() == {**paper, "grounding": 0.5, "tool": 0.0} and grounded.grounding_boxes == "drill"
    assert RewardConfig.preset("deepeyes", tool=0.5).tool == 0.5
    with pytest.raises(
        ValueError, match=r"unknown reward preset 'deepeye'; choose one of paper, .*did you mean 'deepeyes'"
    ):
        RewardConfig.preset("deepeye")


def test_deepeyes_preset_pays_the_tool_bonus_only_when_correct() -> None:
    case = closed("yes", regions=(Region(box=GOLD_BOX),))
    config = RewardConfig.preset("deepeyes")
    looked = score_episode(case, "yes", [True, True], [(100, 100, 150, 150)], config)
    guessed = score_episode(case, "yes", [True], [], config)
    wrong = score_episode(case, "no", [True, True], [GOLD_BOX], config)
    assert looked.total == pytest.approx(0.8 + 0.2 + 1.2)
    assert guessed.total == pytest.approx(0.8 + 0.2)
    assert wrong.total == pytest.approx(0.2)


# ---- score_episode ---------------------------------------------------------------------------------------------

GOLD_BOX = (10.0, 10.0, 30.0, 30.0)


def test_score_episode_hand_computed() -> None:
    case = closed("yes", regions=(Region(box=GOLD_BOX),))
    result = score_episode(case, "Yes", [True, True, True], [GOLD_BOX, (100, 100, 150, 150)])
    assert result.components == {
        "accuracy": 1.0,
        "grammar": 1.0,
        "diversity": 0.75,
        "grounding": 1.0,
        "tool": 1.0,
        "token_recall": 1.0,
        "best_iou": 1.0,
    }
    assert set(result.components) == set(REWARD_COMPONENTS) | set(METRIC_COMPONENTS)
    assert result.total == pytest.approx(0.7 + 0.2 + 0.1 * 0.75)
    assert result.gold_regions == 1
    weighted = score_episode(case, "Yes", [True], [GOLD_BOX], RewardConfig(grounding=0.5, tool=0.3))
    assert weighted.total == pytest.approx(0.7 + 0.2 + 0.1 * 0.125 + 0.5 + 0.3)


def test_drill_grounding_scores_only_the_drilled_boxes() -> None:
    case = closed("yes", regions=(Region(box=GOLD_BOX),))
    half = (10.0, 10.0, 30.0, 50.0)  # IoU with the gold box: 400 / 800
    explored = [GOLD_BOX, (100, 100, 150, 150), half]  # scan lists the gold box and a far one, then a drill
    config = RewardConfig(grounding=1.0, grounding_boxes="drill")
    result = score_episode(case, "yes", [True] * 3, explored, config, drill_boxes=[half])
    assert result.components["grounding"] == pytest.approx(0.5)
    assert result.components["best_iou"] == 1.0  # the metric still scores every explored box
    assert score_episode(case, "yes", [True] * 3, explored, RewardConfig(grounding=1.0)).components["grounding"] == 1.0
    assert score_episode(case, "yes", [True], [], config, drill_boxes=[]).components["grounding"] == 0.0
    with pytest.raises(ValueError, match="grounding_boxes='drill' scores the drilled boxes; pass drill_boxes"):
        score_episode(case, "yes", [True], explored, config)


def test_env_pays_drill_grounding_for_drills_not_scans() -> None:
    from medeyes_env.env import EnvConfig, MedEyesEnv

    config = EnvConfig(rewards=RewardConfig.preset("paper_drill_grounding"))
    env = MedEyesEnv(config=config, split="test")
    index = 0
    while not (env.reset(options={"case_index": index}) and env.case.regions):
        index += 1
    gold, far = env.case.regions[0].box, (0.0, 0.0, 16.0, 16.0)
    assert box_iou(gold, far) == 0.0
    # The phantom's lesion is a disc inside its box: the box scores the disc's share of it, not 1.
    on_gold = region_iou(gold, env.case.regions[0])
    assert env.case.regions[0].shape is not None and 0.5 < on_gold < 0.8
    env.step(render_turn(Action.scan(gold), "compare candidates"))
    env.step(render_turn(Action.drill(far), "look closer"))
    *_, info = env.step(render_turn(Action.final_answer(env.case.answer), "conclude"))
    assert info["reward_components"]["best_iou"] == pytest.approx(on_gold)
    assert info["reward_components"]["grounding"] == 0.0
    env.reset(options={"case_index": index})
    env.step(render_turn(Action.drill(gold), "look closer"))
    *_, info = env.step(render_turn(Action.final_answer(env.case.answer), "conclude"))
    assert info["reward_components"]["grounding"] == pytest.approx(on_gold)


def test_score_episode_truncated_and_malformed() -> None:
    case = closed("yes")
    truncated = score_episode(case, None, [True, True], FAR[:2])
    assert truncated.components["accuracy"] == 0.0 and truncated.components["grammar"] == 0.0
    assert truncated.components["tool"] == 0.0 and truncated.components["token_recall"] == 0.0
    assert truncated.total == pytest.approx(0.1 * 0.75)
    malformed = score_episode(case, "yes", [True, False, True], [])
    assert malformed.components["grammar"] == 0.0 and malformed.components["diversity"] == 0.0
    assert malformed.components["tool"] == 0.0  # correct, but no tool was used
    assert malformed.total == pytest.approx(0.7)
    assert malformed.gold_regions == 0 and malformed.components["best_iou"] == 0.0


def test_score_episode_choice_letter_resolves_token_recall() -> None:
    result = score_episode(choice(), "(B)", [True], [])
    assert result.components["accuracy"] == 1.0 and result.components["token_recall"] == 1.0


def test_score_episode_open_token_recall_mode() -> None:
    config = RewardConfig(open_match="token_recall", tool=1.0)
    result = score_episode(open_case("left lower lobe"), "left lobe", [True, True], [A], config)
    assert result.components["accuracy"] == pytest.approx(2 / 3)
    assert result.components["tool"] == 0.0  # partly right is not correct
    assert result.total == pytest.approx(0.7 * 2 / 3 + 0.2 + 0.1 * 0.125)


# ---- the benchmark validated with its own gold ------------------------------------------------------------------

GOLD_CASES = [
    closed("yes", regions=(Region(box=GOLD_BOX),)),
    closed("No", regions=(Region(box=GOLD_BOX), Region(box=(50, 50, 90, 70)))),
    choice("right upper lobe"),
    choice("left lower lobe"),
    choice("heart"),
    open_case("left lung"),
    open_case("Crohn's disease, 2 lesions"),
    open_case("twenty-one"),
]


@pytest.mark.parametrize("case", GOLD_CASES, ids=[f"{c.answer_type.value}-{c.answer}" for c in GOLD_CASES])
def test_gold_answer_earns_full_accuracy(case: Case) -> None:
    assert accuracy_reward(case.answer, case) == 1.0
    assert accuracy_reward(f"  {case.answer.upper()}. ", case) == 1.0
    assert token_recall(case.answer, case.answer) == 1.0
    if case.answer_type is AnswerType.CHOICE:
        letter = choice_letter(case.options.index(case.answer))
        for form in (letter, f"({letter})", f"{letter}.", f"option {letter}", f"{letter}) {case.answer}"):
            assert accuracy_reward(form, case) == 1.0, form
        for other in range(len(case.options)):
            if case.options[other] != case.answer:
                assert accuracy_reward(choice_letter(other), case) == 0.0


@pytest.mark.parametrize("case", GOLD_CASES, ids=[f"{c.answer_type.value}-{c.answer}" for c in GOLD_CASES])
def test_gold_box_explorer_through_the_protocol_earns_full_reward(case: Case) -> None:
    """Render a perfect expert's turns, parse them back, and score: accuracy, grammar and grounding are 1."""
    size = (128, 96)
    gold = [region.box for region in case.regions]
    actions = [Action.scan(*gold)] if gold else []
    actions += [Action.drill(box) for box in gold]
    actions.append(Action.final_answer(case.answer))
    explored: list = []
    well_formed: list[bool] = []
    answer = None
    for action in actions:
        turn = parse_turn(render_turn(action, "Reasoning about the region."), size)
        assert turn.action == action
        well_formed.append(turn.well_formed)
        if turn.action.name == "answer":
            answer = turn.action.answer
        else:
            explored.extend(turn.action.boxes)
    config = RewardConfig(grounding=1.0, tool=1.0)
    result = score_episode(case, answer, well_formed, explored, config)
    assert result.components["accuracy"] == 1.0
    assert result.components["grammar"] == 1.0
    assert result.components["grounding"] == (1.0 if gold else 0.0)
    assert result.components["tool"] == (1.0 if gold else 0.0)


def test_choice_letter() -> None:
    assert [choice_letter(i) for i in range(3)] == ["A", "B", "C"]
    with pytest.raises(ValueError, match=r"0\.\.25, got 26"):
        choice_letter(26)


# ---- EpisodeScore: score_episode one turn at a time --------------------------------------------------------

coordinate = st.integers(0, 400).map(float) | st.floats(0.0, 400.0)
boxes = st.tuples(coordinate, coordinate, st.integers(1, 150), st.integers(1, 150)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
)
# A turn: well formed?, the boxes it explored (none: an answer, a refused or malformed turn), a drill?
turns = st.lists(st.tuples(st.booleans(), st.lists(boxes, max_size=5), st.booleans()), max_size=9)
golds = st.sampled_from(
    [
        (),
        (Region(box=(100.0, 100.0, 160.0, 150.0)),),
        (Region(box=(100.0, 100.0, 160.0, 150.0)), Region(box=(0.0, 0.0, 30.0, 30.0))),
        (Region(shape=disc_shape(150.0, 150.0, 40.0)), Region(box=(300.0, 10.0, 390.0, 60.0))),
    ]
)
configs = st.sampled_from(
    [
        RewardConfig(),
        RewardConfig.preset("paper_drill_grounding"),
        RewardConfig.preset("deepeyes", iou_threshold=0.2, diversity_max_regions=2),
        RewardConfig(grounding=0.3, tool=0.5, iou_threshold=1.0),
    ]
)


@settings(max_examples=400, deadline=None)
@given(turns=turns, regions=golds, config=configs, answer=st.sampled_from([None, "yes", "no", "yes, left"]))
def test_episode_score_gives_score_episodes_floats_turn_by_turn(
    turns: list[tuple[bool, list[Box], bool]], regions: tuple[Region, ...], config: RewardConfig, answer: str | None
) -> None:
    case = closed(regions=regions)
    score = EpisodeScore(case, config)
    for n, (well_formed, explored, drill) in enumerate(turns, 1):
        score.add_turn(well_formed, explored, drill)
        so_far = turns[:n]
        for final in (None, answer):  # the env asks every step, with the answer once there is one
            expected = score_episode(
                case,
                final,
                [formed for formed, _, _ in so_far],
                [box for _, explored_boxes, _ in so_far for box in explored_boxes],
                config,
                drill_boxes=[box for _, explored_boxes, is_drill in so_far if is_drill for box in explored_boxes],
            )
            assert score.breakdown(final) == expected  # == on floats: the very same values, not close ones
