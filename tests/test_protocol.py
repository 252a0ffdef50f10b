import re

import pytest

from medeyes_env.errors import ConfigError
from medeyes_env.protocol import (
    PROTOCOL_INSTRUCTIONS,
    Action,
    BoxFormat,
    ParsedTurn,
    ProtocolError,
    ProtocolLimits,
    parse_turn,
    protocol_instructions,
    render_turn,
)
from medeyes_env.protocol.instructions import box_wording

SIZE = (512, 384)
R = "<reasoning>The left lung looks dense.</reasoning>\n"


def act(json_text: str) -> str:
    return f"{R}<action>{json_text}</action>"


# Every malformed turn: (text, error_kind, phrase the message must contain).
MALFORMED = [
    ("x" * 4097, "oversized", "too long (oversized): 4097 characters, the limit is 4096"),
    (R + "<answer>yes\x00</answer>", "binary", "control characters"),
    ("junk \x07\x1b[31m", "binary", "control characters"),
    (R + "<answer>yes\ud800</answer>", "binary", "control characters"),
    (act("{not json}"), "bad_json", "is not valid JSON"),
    (act("{'name': 'scan', 'boxes': [[1, 2, 3, 4]]}"), "bad_json", "use double quotes"),
    (act('{"name": "drill", "box": [1, 2, 3, 4]} trailing'), "bad_json", "Extra data"),
    (act('{"name": "drill", "box": [1, 2, 3, 4], "name": "scan"}'), "bad_json", "key 'name' twice"),
    (act("[" * 1000), "bad_json", "not valid JSON"),
    (act(""), "bad_json", "the <action> tag is empty"),
    (act("[1, 2, 3, 4]"), "not_object", "must be a JSON object, got list"),
    (act('{"box": [1, 2, 3, 4]}'), "missing_name", 'has no "name" key'),
    (act('{"name": 3, "box": [1, 2, 3, 4]}'), "unknown_action", '"name" must be the string "scan" or "drill"'),
    (
        act('{"name": "scann", "boxes": [[1, 2, 3, 4]]}'),
        "unknown_action",
        "unknown action 'scann'; did you mean \"scan\"?",
    ),
    (act('{"name": "dril", "box": [1, 2, 3, 4]}'), "unknown_action", 'did you mean "drill"?'),
    (act('{"name": "segment", "box": [1, 2, 3, 4]}'), "unknown_action", "The actions are scan and drill"),
    (act('{"name": "answer", "answer": "yes"}'), "answer_as_action", "<answer>your answer</answer>, not inside"),
    (act('{"name": "drill", "box": [600, 10, 700, 20]}'), "outside_image", "lies outside the 512x384 image"),
    (act('{"name": "drill", "box": [-50, -50, 0, 0]}'), "outside_image", "lies outside"),
    (act('{"name": "drill", "box": [10, 384, 20, 400]}'), "outside_image", "lies outside"),
    (act('{"name": "drill", "box": [10, 10, 10, 20]}'), "zero_area", "box [10, 10, 10, 20] has zero area"),
    (act('{"name": "drill", "box": [30, 10, 20, 20]}'), "inverted_box", "is inverted (x2 < x1 or y2 < y1)"),
    (act('{"name": "drill", "box": [10, 30, 20, 20]}'), "inverted_box", "write the top-left corner first"),
    (
        act('{"name": "drill", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}'),
        "box_arity",
        "drill takes exactly one box, got 2",
    ),
    (act('{"name": "drill"}'), "box_arity", "drill takes exactly one box"),
    (act('{"name": "drill", "box": [1, 2, 3, 4], "boxes": [[1, 2, 3, 4]]}'), "box_arity", "not both"),
    (act('{"name": "scan", "boxes": []}'), "box_arity", '"boxes" is empty'),
    (act('{"name": "scan"}'), "box_arity", "scan needs at least one box"),
    (
        act('{"name": "scan", "boxes": [' + ", ".join(["[1, 2, 3, 4]"] * 6) + "]}"),
        "box_arity",
        "at most 5 boxes, got 6",
    ),
    (act('{"name": "scan", "boxes": [1, 2, 3, 4]}'), "bad_box", "so wrap it: [[1, 2, 3, 4]]"),
    (act('{"name": "scan", "boxes": {"a": 1}}'), "bad_box", '"boxes" must be a list of boxes'),
    (act('{"name": "drill", "box": [1, 2, 3]}'), "bad_box", "must be a list of 4 numbers, got 3 values"),
    (act('{"name": "drill", "box": {"x1": 1}}'), "bad_box", "must be a list of 4 numbers, got dict"),
    (act('{"name": "drill", "box": [1, 2, "3", 4]}'), "bad_box", "coordinates must be numbers"),
    (act('{"name": "drill", "box": [1, 2, true, 4]}'), "bad_box", "coordinates must be numbers"),
    (act('{"name": "drill", "box": [1, 2, null, 4]}'), "bad_box", "coordinates must be numbers"),
    (act('{"name": "drill", "box": [1, 2, NaN, 4]}'), "non_finite", "NaN is not allowed"),
    (act('{"name": "drill", "box": [1, 2, Infinity, 4]}'), "non_finite", "Infinity is not allowed"),
    (act('{"name": "drill", "box": [1, 2, 1e999, 4]}'), "non_finite", "not finite"),
    (act('{"name": "drill", "box": [1, 2, ' + "9" * 400 + ", 4]}"), "non_finite", "not finite"),
    (act('{"name": "drill", "box": [1, 2, ' + "9" * 5000 + ", 4]}"), "oversized", "oversized"),
    (act('{"name": "drill", "box": [1, 2, 3, 4]}') + "<answer>yes</answer>", "action_and_answer", "both an <action>"),
    (act('{"name": "drill", "box": [1, 2, 3, 4]}') * 2, "multiple_actions", "more than one <action> (2)"),
    (R + "<answer>yes</answer><answer>no</answer>", "multiple_actions", "more than one <answer>"),
    (R, "missing_action", "no <action> or <answer> tag found"),
    ("", "missing_action", "no <action> or <answer> tag found"),
    ("yes", "missing_action", "Expected <reasoning>...</reasoning> followed by exactly one of"),
    (R + "<actoin>{}</actoin>", "missing_action", "did you mean <action>?"),
    (R + "< action >{}</ action >", "missing_action", "write <action> without spaces"),
    (R + "<answer>   </answer>", "empty_answer", "the <answer> is empty"),
    (R + "<answer>" + "a" * 257 + "</answer>", "answer_too_long", "257 characters, above the limit of 256"),
    ("<reasoning>" + "r" * 2049 + "</reasoning><answer>no</answer>", "reasoning_too_long", "above the limit of 2048"),
    (act('{"name": "drill", "box": [1, 2, 3, 4], "pad": "' + "p" * 1100 + '"}'), "json_too_long", "limit of 1024"),
    (R + "<action><answer>yes</answer></action>", "nested_tag", "nested tags: <answer> inside <action>"),
    ("<reasoning>I will <reasoning> think</reasoning></reasoning><answer>no</answer>", "nested_tag", "nested"),
    (R + "<answer>yes", "unclosed_tag", "unclosed tag <answer>: it needs a closing </answer>"),
    (R + '<action>{"name": "drill", "box": [1, 2, 3, 4]}', "unclosed_tag", "unclosed tag <action>"),
    ("</reasoning><answer>no</answer>", "stray_tag", "closing tag </reasoning> has no opening"),
    (R + "<answer>yes</action>", "mismatched_tag", "closed by </action>; close it with </answer>"),
]


@pytest.mark.parametrize(("text", "kind", "phrase"), MALFORMED, ids=[f"{i}-{c[1]}" for i, c in enumerate(MALFORMED)])
def test_malformed_turn_gives_error_with_message(text: str, kind: str, phrase: str) -> None:
    turn = parse_turn(text, SIZE)
    assert turn.action is None
    assert not turn.ok and not turn.well_formed
    assert turn.error_kind == kind, turn.error
    assert turn.error is not None and phrase in turn.error


@pytest.mark.parametrize(("text", "kind", "phrase"), MALFORMED, ids=[f"{i}-{c[1]}" for i, c in enumerate(MALFORMED)])
def test_every_error_shows_an_expected_form(text: str, kind: str, phrase: str) -> None:
    error = parse_turn(text, SIZE).error
    assert error is not None
    assert re.search(r"Expected <|A box is \[x1, y1, x2, y2\]|<answer>your answer</answer>", error), error


def test_whole_error_message_for_outside_box() -> None:
    turn = parse_turn(act('{"name": "drill", "box": [600, 10, 700, 20]}'), SIZE)
    assert turn.error == (
        "box [600, 10, 700, 20] lies outside the 512x384 image. A box is [x1, y1, x2, y2] in pixels of the 512x384 "
        "image with 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 384."
    )


WELL_FORMED = [
    (
        act('{"name": "scan", "boxes": [[10, 20, 100, 200], [200.5, 0, 300, 50.25]]}'),
        Action.scan((10, 20, 100, 200), (200.5, 0, 300, 50.25)),
    ),
    (act('{"name": "drill", "box": [10, 20, 100, 200]}'), Action.drill((10, 20, 100, 200))),
    (act('  \n {  "box":[10,20,100,200] ,"name" :"drill"}\n '), Action.drill((10, 20, 100, 200))),
    (R + "<answer>  yes \n</answer>", Action.final_answer("yes")),
    ("\n  <reasoning> a </reasoning>  \n\n<answer>B</answer>\n", Action.final_answer("B")),
    (act('{"name": "drill", "box": [0, 0, 512, 384]}'), Action.drill((0, 0, 512, 384))),
    (R + "<answer>size < 5 mm</answer>", Action.final_answer("size < 5 mm")),
]


@pytest.mark.parametrize(("text", "expected"), WELL_FORMED)
def test_well_formed_turns(text: str, expected: Action) -> None:
    turn = parse_turn(text, SIZE)
    assert turn.ok and turn.well_formed, turn
    assert turn.error is None and turn.error_kind is None
    assert turn.action == expected
    assert turn.deviations == ()


TOLERATED = [
    ("<answer>no</answer>", "no <reasoning>"),
    ("<reasoning>  </reasoning><answer>no</answer>", "<reasoning> is empty"),
    ("<answer>no</answer><reasoning>why</reasoning>", "before the <answer>"),
    ("<reasoning>a</reasoning><reasoning>b</reasoning><answer>no</answer>", "2 <reasoning> blocks"),
    ("<Reasoning>a</Reasoning><ANSWER>no</ANSWER>", "in lower case"),
    ("<reasoning>a</REASONING><answer>no</answer>", "in lower case"),
    ("Sure! " + R + "<answer>no</answer>", "text outside the tags was ignored: 'Sure!'"),
    (R + "<answer>no</answer> Done.", "text outside the tags was ignored: 'Done.'"),
    (act('```json\n{"name": "drill", "box": [1, 2, 3, 4]}\n```'), "Markdown code fence"),
    (act('{"name": "drill", "box": [1, 2, 3, 4], "why": "dense"}'), "ignored unknown key(s) 'why'"),
    (act('{"name": "Drill", "box": [1, 2, 3, 4]}'), 'should be written "drill"'),
    (act('{"name": "drill", "boxes": [[1, 2, 3, 4]]}'), 'drill takes one "box"'),
    (act('{"name": "scan", "box": [1, 2, 3, 4]}'), 'scan takes a "boxes" list'),
]


@pytest.mark.parametrize(("text", "deviation"), TOLERATED)
def test_tolerated_turns_execute_but_are_not_well_formed(text: str, deviation: str) -> None:
    turn = parse_turn(text, SIZE)
    assert turn.ok and not turn.well_formed, turn
    assert turn.error is None
    assert any(deviation in d for d in turn.deviations), turn.deviations
    assert set(turn.deviations) <= set(turn.notes)


def test_drill_with_boxes_list_of_one_executes_as_drill() -> None:
    turn = parse_turn(act('{"name": "drill", "boxes": [[1, 2, 3, 4]]}'), SIZE)
    assert turn.action == Action.drill((1, 2, 3, 4))


def test_reasoning_is_stripped_and_joined() -> None:
    turn = parse_turn("<reasoning>\n a \n</reasoning><reasoning>b</reasoning><answer>no</answer>", SIZE)
    assert turn.reasoning == "a\n\nb"
    assert parse_turn("<answer>no</answer>", SIZE).reasoning is None


# ---- clamping -------------------------------------------------------------------------------------------------


def test_partially_outside_box_is_clamped_with_a_note() -> None:
    turn = parse_turn(act('{"name": "scan", "boxes": [[-10, 300, 100, 500], [10, 10, 20, 20]]}'), SIZE)
    assert turn.ok and turn.well_formed  # clamping is a remark, not a protocol deviation
    assert turn.action is not None
    assert turn.action.boxes == ((0.0, 300.0, 100.0, 384.0), (10.0, 10.0, 20.0, 20.0))
    assert turn.notes == ("box [-10, 300, 100, 500] was clamped to the 512x384 image: [0, 300, 100, 384]",)


def test_huge_finite_box_is_clamped_to_the_whole_image() -> None:
    turn = parse_turn(act('{"name": "drill", "box": [-1e300, -1e300, 1e300, 1e300]}'), SIZE)
    assert turn.action == Action.drill((0, 0, 512, 384))


def test_normalised_coordinates_get_a_hint() -> None:
    turn = parse_turn(act('{"name": "drill", "box": [0.1, 0.2, 0.5, 0.6]}'), SIZE)
    assert turn.ok
    assert any("between 0 and 1" in note for note in turn.notes)


# ---- limits ---------------------------------------------------------------------------------------------------


def test_limits_are_configurable() -> None:
    limits = ProtocolLimits(max_chars=100, max_boxes=2, max_answer_chars=3)
    assert parse_turn("<answer>" + "y" * 100 + "</answer>", SIZE, limits).error_kind == "oversized"
    assert parse_turn("<answer>yess</answer>", SIZE, limits).error_kind == "answer_too_long"
    three = '{"name": "scan", "boxes": [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2]]}'
    assert parse_turn(f"<action>{three}</action>", SIZE, limits).error_kind == "box_arity"
    assert parse_turn(f"<action>{three}</action>", SIZE).ok


def test_one_megabyte_input_is_refused_before_parsing() -> None:
    turn = parse_turn("<reasoning>" + "<" * 1_000_000, SIZE)
    assert turn.error_kind == "oversized"
    assert "1000011 characters" in (turn.error or "")


def test_pathological_tag_soup_within_limit_is_handled() -> None:
    for text in ("<" + " " * 4000, "< " * 2000, "<reasoning>" + "<a" * 1900, "<action>" * 500, "</" * 2000):
        turn = parse_turn(text, SIZE)
        assert turn.error is not None


@pytest.mark.parametrize("kwargs", [{"max_chars": 0}, {"max_boxes": 0}, {"max_json_chars": -1}])
def test_limits_validate(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="greater than"):
        ProtocolLimits(**kwargs)


@pytest.mark.parametrize("size", [(0, 10), (10,), "512x512", (10.5, 10), (True, 10)])
def test_bad_image_size_is_a_programming_error(size: object) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        parse_turn("<answer>no</answer>", size)  # type: ignore[arg-type]


def test_non_text_input_is_an_error_not_an_exception() -> None:
    turn = parse_turn(b"<answer>no</answer>", SIZE)  # type: ignore[arg-type]
    assert turn.error_kind == "not_text"
    assert "must be text, got bytes" in (turn.error or "")


# ---- rendering ------------------------------------------------------------------------------------------------

ROUND_TRIP = [
    Action.scan((0, 0, 512, 384)),
    Action.scan((1, 2, 3, 4), (10.5, 20.25, 30.125, 40), (0.1, 0.2, 0.30000000000000004, 383.9999999)),
    Action.scan(*[(i, i, i + 10, i + 10) for i in range(5)]),
    Action.drill((100, 100, 200, 150)),
    Action.drill((1e-7, 2.5e-5, 511.99999999999994, 3.0)),
    Action.final_answer("yes"),
    Action.final_answer('left lower lobe, 2.5 cm {"json": true} <5mm'),
]


@pytest.mark.parametrize("action", ROUND_TRIP)
@pytest.mark.parametrize("reasoning", ["Look closer at the left hilum.", "", None])
def test_render_parse_round_trip(action: Action, reasoning: str | None) -> None:
    text = render_turn(action, reasoning)
    turn = parse_turn(text, SIZE)
    assert turn.action == action
    assert turn.reasoning == (reasoning or None)
    assert turn.well_formed == bool(reasoning)


def test_render_is_the_documented_form() -> None:
    text = render_turn(Action.drill((10, 20, 30.5, 40)), "Zoom in.")
    assert text == '<reasoning>Zoom in.</reasoning>\n<action>{"name": "drill", "box": [10, 20, 30.5, 40]}</action>'


@pytest.mark.parametrize("reasoning", ["use <action> next", "I <ANSWER>", "bell \x07"])
def test_render_refuses_text_that_would_not_parse_back(reasoning: str) -> None:
    with pytest.raises(ProtocolError, match="would not parse back"):
        render_turn(Action.final_answer("no"), reasoning)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "drill", "boxes": ((1, 2, 3, 4), (1, 2, 3, 4))}, "exactly one box"),
        ({"name": "scan"}, "at least one box"),
        ({"name": "answer", "answer": "  "}, "non-empty answer"),
        ({"name": "answer", "answer": "yes", "boxes": ((1, 2, 3, 4),)}, "takes no boxes"),
        ({"name": "scan", "boxes": ((3, 2, 1, 4),)}, "x2 > x1"),
        ({"name": "drill", "boxes": ((0, 0, float("nan"), 4),)}, "non-finite"),
        ({"name": "zoom", "boxes": ((1, 2, 3, 4),)}, "'scan', 'drill' or 'answer'"),
    ],
)
def test_action_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Action(**kwargs)  # type: ignore[arg-type]


def test_action_is_frozen_and_hashable() -> None:
    action = Action.drill((1, 2, 3, 4))
    with pytest.raises(ValueError, match="frozen"):
        action.name = "scan"  # type: ignore[misc]
    assert hash(action) == hash(Action.drill((1.0, 2.0, 3.0, 4.0)))


def test_parsed_turn_dump_includes_ok_and_well_formed() -> None:
    dumped = parse_turn("<answer>no</answer>", SIZE).model_dump()
    assert dumped["ok"] is True and dumped["well_formed"] is False
    assert ParsedTurn.model_validate({k: v for k, v in dumped.items() if k not in ("ok", "well_formed")}).ok


# ---- instructions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box_format", "concrete"),
    [
        (BoxFormat(), "[10, 20, 110, 120]"),
        (BoxFormat(kind="norm1000"), "[10, 20, 110, 120]"),
        (BoxFormat(kind="loc", bins=16), '"<loc01><loc02><loc05><loc06>"'),
    ],
)
def test_instructions_format_and_their_examples_parse(box_format: BoxFormat, concrete: str) -> None:
    text = protocol_instructions(512, 384, max_steps=4, box_format=box_format)
    assert text == PROTOCOL_INSTRUCTIONS.format(width=512, height=384, max_steps=4, **box_wording(box_format, 512, 384))
    flat = " ".join(text.split())
    assert "512 x 384 pixels" in flat and "at most 4 turns" in flat
    assert "{" in text and "{{" not in text
    examples = re.findall(r"<reasoning>.*?</reasoning>\n<(?:action|answer)>.*?</(?:action|answer)>", text)
    assert len(examples) == 3
    placeholder = box_format.placeholder()
    concrete_examples = [example.replace(placeholder, concrete) for example in examples]
    names = []
    for example in concrete_examples:
        turn = parse_turn(example, (512, 384), box_format=box_format)
        assert turn.well_formed, (example, turn.error)
        assert turn.action is not None
        names.append(turn.action.name)
    assert names == ["scan", "drill", "answer"]
    if box_format.kind == "loc":
        assert "<loc16>" in text  # the largest location token is named


def test_box_formats_convert_at_the_boundary() -> None:
    """A model's box in each format becomes the same xyxy pixels; feedback speaks the model's format."""
    size = (512, 256)
    loc = BoxFormat(kind="loc", bins=16)
    turn = parse_turn(act('{"name": "drill", "box": "<loc02><loc04><loc05><loc08>"}'), size, box_format=loc)
    assert turn.action is not None and turn.action.boxes == ((64.0, 64.0, 160.0, 128.0),)
    norm = parse_turn(
        act('{"name": "drill", "box": [125, 250, 312.5, 500]}'), size, box_format=BoxFormat(kind="norm1000")
    )
    assert norm.action is not None and norm.action.boxes == ((64.0, 64.0, 160.0, 128.0),)
    assert loc.encode((64.0, 64.0, 160.0, 128.0), size) == '"<loc02><loc04><loc05><loc08>"'
    # Pixel boxes and digits are refused in the loc format, with the expected form in the message.
    wrong = parse_turn(act('{"name": "drill", "box": [64, 64, 160, 128]}'), size, box_format=loc)
    assert wrong.error_kind == "bad_box" and "four location tokens" in (wrong.error or "")
    above = parse_turn(act('{"name": "drill", "box": "<loc02><loc04><loc17><loc08>"}'), size, box_format=loc)
    assert above.error_kind == "outside_image" and "<loc16>" in (above.error or "")
    inverted = parse_turn(act('{"name": "drill", "box": "<loc05><loc04><loc02><loc08>"}'), size, box_format=loc)
    assert inverted.error_kind == "inverted_box"
    # Rendering in another format than pixels needs the image size its units refer to.
    with pytest.raises(ProtocolError, match="image_size"):
        render_turn(Action.drill((1, 2, 3, 4)), "r", loc)


def test_instructions_follow_the_limits() -> None:
    text = protocol_instructions(100, 80, max_steps=3, limits=ProtocolLimits(max_boxes=2))
    assert "(1 to 2 boxes)" in text and "0 <= y1 < y2 <= 80" in text
    assert "(1 to 5 boxes)" in PROTOCOL_INSTRUCTIONS
