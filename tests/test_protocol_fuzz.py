"""Property tests: parse_turn never raises and its result keeps its invariants, over 10,200 generated turns."""

import json
import math
import random
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from medeyes_env.protocol import Action, BoxFormat, ParsedTurn, ProtocolLimits, parse_turn, render_turn
from medeyes_env.protocol.canonical import parse_canonical

LIMITS = ProtocolLimits()


def fuzz(examples: int) -> settings:
    """Settings of one property test: a fixed example count, no per-example deadline (shared CI cores)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


image_sizes = st.tuples(st.integers(1, 4096), st.integers(1, 4096))

# Every code point, lone surrogates and control characters included.
any_char = st.characters(exclude_categories=())

FRAGMENTS = [
    "<reasoning>", "</reasoning>", "<action>", "</action>", "<answer>", "</answer>", "<Action>", "</ANSWER>",
    "< action >", "<actoin>", "<think>", "</think>", "<feedback>", "<", ">", "/", "{", "}", "[", "]", ",", ":",
    '"', "'", '"name"', '"scan"', '"drill"', '"answer"', '"box"', '"boxes"', "NaN", "Infinity", "-Infinity", "1e999",
    "-1", "0", "0.5", "10", "255", "512", "1e308", "99999999999999999999999", "true", "null", "yes", "no", "B",
    " ", "\n", "\t", "```", "```json\n", "\x00", "\ud800", "é", "🫁", "\u202e", "\ufeff", "\r\n",
    "<loc03>", "<loc16>", "<loc99>", "<loc7>", '"<loc01><loc02><loc03><loc04>"',
]  # fmt: skip
BOX_FORMATS = [BoxFormat(), BoxFormat(kind="norm1000"), BoxFormat(kind="loc", bins=16), BoxFormat(kind="loc", bins=63)]
box_formats = st.sampled_from(BOX_FORMATS)
# One byte per fragment: far cheaper for hypothesis to generate than a list of sampled_from draws.
soup = st.binary(max_size=60).map(lambda picks: "".join(FRAGMENTS[b % len(FRAGMENTS)] for b in picks))

numbers = st.one_of(
    st.integers(-10, 5000),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1.0, 2.0),
    st.just(10**400),
)
junk_values = st.one_of(st.none(), st.booleans(), st.text(max_size=8), numbers)
coordinates = st.one_of(st.integers(-100, 5000), st.floats(-100.0, 5000.0))


def _ordered(box: list[float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


raw_boxes = st.lists(coordinates, min_size=4, max_size=4)
plausible_boxes = st.one_of(raw_boxes.map(_ordered), raw_boxes)  # inside, partly in, outside, inverted, zero-area
other_boxes = st.one_of(
    st.lists(numbers, min_size=4, max_size=4),
    st.lists(st.one_of(numbers, junk_values), min_size=0, max_size=6),
)
valid_names = st.sampled_from(["scan", "drill"])
other_names = st.one_of(st.sampled_from(["answer", "Scan", " drill ", "scann", "zoom", ""]), junk_values)


@st.composite
def structured_actions(draw: st.DrawFn) -> str:
    """Action JSON objects shaped like the real thing, with every field possibly wrong."""
    obj: dict[str, object] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        obj["name"] = draw(valid_names) if draw(st.integers(0, 3)) else draw(other_names)

    def box() -> object:
        return draw(plausible_boxes) if draw(st.integers(0, 2)) else draw(st.one_of(other_boxes, junk_values))

    choice = draw(st.integers(0, 3))
    if choice in (0, 2):
        obj["box"] = box()
    if choice in (1, 2):
        if draw(st.integers(0, 3)):
            obj["boxes"] = [box() for _ in range(draw(st.integers(0, 7)))]
        else:
            obj["boxes"] = box()
    if draw(st.integers(0, 4)) == 0:
        obj[draw(st.text(max_size=5))] = draw(junk_values)
    body = json.dumps(obj, allow_nan=True)
    reasoning = draw(st.sampled_from(["<reasoning>look</reasoning>", "", "<reasoning></reasoning>"]))
    return f"{reasoning}<action>{body}</action>"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10)),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def valid_actions(draw: st.DrawFn, size: tuple[int, int]) -> Action:
    width, height = size

    def box() -> tuple[float, float, float, float]:
        x1 = draw(st.floats(0, width, exclude_max=True))
        y1 = draw(st.floats(0, height, exclude_max=True))
        x2 = draw(st.floats(x1, width, exclude_min=True))
        y2 = draw(st.floats(y1, height, exclude_min=True))
        return (x1, y1, x2, y2)

    kind = draw(st.sampled_from(["scan", "drill", "answer"]))
    if kind == "scan":
        return Action.scan(*[box() for _ in range(draw(st.integers(1, LIMITS.max_boxes)))])
    if kind == "drill":
        return Action.drill(box())
    text = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=40))
    answer = text.replace("<", "(").strip() or "no"
    return Action.final_answer(answer)


def mutate(text: str, rng: random.Random) -> str:
    """Apply 0-4 random edits: delete, insert a protocol fragment, duplicate, swap case, random chars, double."""
    for _ in range(rng.randint(0, 4)):
        if not text:
            break
        i = rng.randrange(len(text))
        j = rng.randint(i, min(len(text), i + 12))
        op = rng.randrange(6)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + rng.choice(FRAGMENTS) + text[i:]
        elif op == 2:
            text = text[:j] + text[i:j] + text[j:]
        elif op == 3:
            text = text[:i] + text[i:j].swapcase() + text[j:]
        elif op == 4:
            junk = "".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0x110000)])) for _ in range(3))
            text = text[:i] + junk + text[j:]
        else:
            text = text * 2  # two turns in one
    return text


def check_invariants(
    turn: ParsedTurn, size: tuple[int, int], limits: ProtocolLimits = LIMITS, box_format: BoxFormat | None = None
) -> None:
    assert isinstance(turn, ParsedTurn)
    event(
        turn.error_kind or ("well_formed" if turn.well_formed else "ok, not well formed")
    )  # --hypothesis-show-statistics
    assert turn.ok != (turn.error is not None)
    assert turn.ok == (turn.action is not None)
    assert (turn.error is None) == (turn.error_kind is None)
    assert turn.error_kind != "parser_error", turn.error
    if not turn.ok:
        assert turn.error and not turn.well_formed
        return
    action = turn.action
    assert action is not None
    assert turn.well_formed == (not turn.deviations)
    width, height = size
    for x1, y1, x2, y2 in action.boxes:
        assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    if action.name == "scan":
        assert 1 <= len(action.boxes) <= limits.max_boxes
    elif action.name == "drill":
        assert len(action.boxes) == 1
    else:
        assert action.answer and action.answer == action.answer.strip()
        assert len(action.answer) <= limits.max_answer_chars and not action.boxes
    if turn.reasoning is not None:
        assert turn.reasoning == turn.reasoning.strip() and turn.reasoning
        assert len(turn.reasoning) <= limits.max_reasoning_chars
    # An executed turn renders back to protocol text that parses to the same action (norm1000 rounds to a
    # whole unit, a thousandth of a side; loc boxes are already on their grid, so they come back exactly).
    box_format = box_format or BoxFormat()
    text = render_turn(action, turn.reasoning, box_format, size)
    again = parse_turn(text, size, ProtocolLimits(max_chars=100_000), box_format)
    assert again.reasoning == turn.reasoning
    assert again.action is not None and again.action.name == action.name and again.action.answer == action.answer
    tolerance = max(size) / 1000 if box_format.kind == "norm1000" else 1e-9 * max(size)
    for box, back in zip(action.boxes, again.action.boxes, strict=True):
        assert all(abs(a - b) <= tolerance for a, b in zip(box, back, strict=True)), (box, back)


@fuzz(3500)
@given(text=st.text(any_char, max_size=300), size=image_sizes)
def test_random_text_never_raises(text: str, size: tuple[int, int]) -> None:
    check_invariants(parse_turn(text, size), size)


@fuzz(1500)
@given(text=soup, size=image_sizes, box_format=box_formats)
def test_soup_never_raises_in_every_box_format(text: str, size: tuple[int, int], box_format: BoxFormat) -> None:
    check_invariants(parse_turn(text, size, None, box_format), size, box_format=box_format)


@fuzz(1500)
@given(size=image_sizes, box_format=box_formats, rng=st.randoms(), data=st.data())
def test_mutated_valid_turns_in_every_box_format(
    size: tuple[int, int], box_format: BoxFormat, rng: random.Random, data: st.DataObject
) -> None:
    action = data.draw(valid_actions(size))
    text = render_turn(action, "Look closer.", box_format, size)
    parsed = parse_turn(text, size, None, box_format)
    assert parsed.ok, parsed.error  # what the renderer writes always parses
    check_invariants(parsed, size, box_format=box_format)
    check_invariants(parse_turn(mutate(text, rng), size, None, box_format), size, box_format=box_format)


@fuzz(2500)
@given(text=soup, size=image_sizes)
def test_tag_and_json_soup_never_raises(text: str, size: tuple[int, int]) -> None:
    check_invariants(parse_turn(text, size), size)


@fuzz(1500)
@given(size=image_sizes, reasoning=st.sampled_from(["Look closer.", "", None]), rng=st.randoms(), data=st.data())
def test_mutated_valid_turns_never_raise(
    size: tuple[int, int], reasoning: str | None, rng: random.Random, data: st.DataObject
) -> None:
    action = data.draw(valid_actions(size))
    text = render_turn(action, reasoning)
    assert parse_turn(text, size).action == action  # the unmutated turn round-trips
    check_invariants(parse_turn(mutate(text, rng), size), size)


@fuzz(600)
@given(value=json_values, size=image_sizes, wrap=st.sampled_from(["{}", "<action>{}</action>", "<answer>{}</answer>"]))
def test_random_json_never_raises(value: object, size: tuple[int, int], wrap: str) -> None:
    text = "<reasoning>r</reasoning>" + wrap.replace("{}", json.dumps(value, allow_nan=True))
    check_invariants(parse_turn(text, size), size)


@fuzz(1300)
@given(text=structured_actions(), size=image_sizes)
def test_structured_actions_with_bad_fields_never_raise(text: str, size: tuple[int, int]) -> None:
    check_invariants(parse_turn(text, size), size)


@fuzz(200)
@given(
    depth=st.integers(1, 600),
    tag=st.sampled_from(["reasoning", "action", "answer", "Action"]),
    size=image_sizes,
    tail=st.sampled_from(["", "</action>", "<answer>x</answer>"]),
)
def test_deeply_nested_tags_never_raise(depth: int, tag: str, size: tuple[int, int], tail: str) -> None:
    text = (f"<{tag}>" * depth + "x" + f"</{tag}>" * depth)[: LIMITS.max_chars - len(tail)] + tail
    turn = parse_turn(text, size)
    check_invariants(turn, size)
    if depth > 1:
        assert not turn.ok


@fuzz(600)
@given(
    text=st.text(any_char, max_size=200),
    limits=st.builds(
        ProtocolLimits,
        max_chars=st.integers(1, 300),
        max_reasoning_chars=st.integers(1, 100),
        max_boxes=st.integers(1, 5),
        max_answer_chars=st.integers(1, 20),
        max_json_chars=st.integers(1, 100),
    ),
    size=image_sizes,
)
def test_small_limits_never_raise(text: str, limits: ProtocolLimits, size: tuple[int, int]) -> None:
    check_invariants(parse_turn(text, size, limits), size, limits)


# ---- the plain-form fast path (protocol/canonical.py) gives what the full parser gives -----------------------

odd_numbers = st.sampled_from([
    "0", "1", "0.5", "1.0", "12.50", "007", "-0", "-3", "1e2", "1E+2", "2.", ".5", "1024", "4096", "99999999999",
    "123456789.123456789", "1" * 400, "NaN", "Infinity", "true", '"5"',
])  # fmt: skip
spaces = st.sampled_from(["", " ", "  ", "\n", "\t", "\r\n", " \n "])  # JSON's whitespace
odd_spaces = st.sampled_from(["\u00a0", "\u2003", "\x0b", "\x1c"])  # str.strip() takes them, JSON does not


@st.composite
def plain_turns(draw: st.DrawFn) -> str:
    """Turns in or next to the plain form: what the fast path takes, and near misses it must leave alone.

    Each part is right most of the time (``odd`` is rarely true), so about half the turns are in the plain form.
    """
    odd = lambda: draw(st.integers(0, 19)) == 0  # noqa: E731
    ws = lambda: (draw(spaces) if not odd() else draw(odd_spaces)) if draw(st.booleans()) else ""  # noqa: E731

    def number(low: int, high: int) -> str:
        if odd():
            return draw(odd_numbers)
        value = draw(st.integers(low, high))
        return str(value) if draw(st.booleans()) else f"{value}.{draw(st.integers(0, 99))}"

    def box() -> str:
        x1, y1 = draw(st.integers(0, 1000)), draw(st.integers(0, 1000))
        values = [str(x1), str(y1), number(x1 + 1, 1024), number(y1 + 1, 1024)]
        if odd():
            values = values[: draw(st.integers(0, 5))] if draw(st.booleans()) else [number(-50, 1100) for _ in values]
        return "[" + ws() + f"{ws()},{ws()}".join(values) + ws() + "]"

    reasoning = (
        "look here" if not odd() else draw(st.sampled_from(["", "  ", "a < b", "x" * 3000, "\u00a0", "A.\n\nB."]))
    )
    head = f"{ws()}<reasoning>{ws()}{reasoning}{ws()}</reasoning>{ws()}"
    kind = draw(st.sampled_from(["drill", "scan", "answer"]))
    if kind == "answer":
        answer = "yes" if not odd() else draw(st.sampled_from(["", "   ", "B", "a" * 300, "l < r", "\u00a0no", "Yes."]))
        return f"{head}<answer>{ws()}{answer}{ws()}</answer>{ws()}"
    name = kind if not odd() else draw(st.sampled_from(["Drill", " scan", "zoom", "answer", "drill", "scan"]))
    if kind == "scan":
        count = draw(st.integers(1, 3)) if not odd() else draw(st.integers(0, 7))
        key, value = "boxes", "[" + ws() + f"{ws()},{ws()}".join(box() for _ in range(count)) + ws() + "]"
    else:
        key, value = ("box" if not odd() else "boxes"), box()
    pairs = [f'"name"{ws()}:{ws()}"{name}"', f'"{key}"{ws()}:{ws()}{value}']
    if odd():
        pairs.reverse()
    if odd():
        pairs.append('"why": 1')
    body = "{" + ws() + f"{ws()},{ws()}".join(pairs) + ws() + "}"
    if odd():
        body = f"```json\n{body}\n```"
    return f"{head}<action>{ws()}{body}{ws()}</action>{ws()}"


def full_parse(text: str, size: tuple[int, int], limits: ProtocolLimits | None, box_format: BoxFormat) -> ParsedTurn:
    """parse_turn with the fast path switched off: the four-stage parser alone."""
    with mock.patch("medeyes_env.protocol.parse.parse_canonical", return_value=None):
        return parse_turn(text, size, limits, box_format)


@fuzz(3000)
@given(
    text=plain_turns(),
    size=st.sampled_from([(1024, 1024), (1024, 1024), (2000, 1100), (1000, 600), (3, 3)]) | image_sizes,
    box_format=st.sampled_from([BoxFormat(), BoxFormat(), BoxFormat(kind="norm1000")]) | box_formats,
    limits=st.sampled_from([LIMITS, LIMITS, ProtocolLimits(max_boxes=2, max_reasoning_chars=9, max_answer_chars=3)]),
    rng=st.randoms(),
    mutated=st.integers(0, 5),
)
def test_the_fast_path_gives_what_the_full_parser_gives(
    text: str,
    size: tuple[int, int],
    box_format: BoxFormat,
    limits: ProtocolLimits,
    rng: random.Random,
    mutated: int,
) -> None:
    text = mutate(text, rng) if mutated == 0 else text
    fast = parse_canonical(text, size, limits, box_format)
    event("fast path" if fast is not None else "full parser")
    full = full_parse(text, size, limits, box_format)
    turn = parse_turn(text, size, limits, box_format)
    assert turn == full and turn.model_dump() == full.model_dump()
    assert turn.model_fields_set == full.model_fields_set
    if fast is not None:
        assert fast == full and fast.well_formed and not fast.notes
        assert fast.action.model_fields_set == full.action.model_fields_set
        assert [type(v) for box in fast.action.boxes for v in box] == [float] * (4 * len(full.action.boxes))
