"""Data that looks like markup or holds absurd boxes: the CLI prints it literally, the report stays fast."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.report.html import annotated_original, render_report
from medeyes.trajectories import Producer, StepRecord, TrajectoryRecord, TrajectoryStore
from medeyes_env.protocol import Action
from medeyes_env.views import draw_boxes

runner = CliRunner(env={"COLUMNS": "2000"})  # one line per row: the asserted text is not wrapped
HOSTILE = "the [/] lesion [/bold] [link=http://evil.example]click[/link] [red]red[/red] :warning:"


def _record(tid: str, **fields) -> TrajectoryRecord:
    values = dict(
        trajectory_id=tid,
        case_id="c/1",
        source="test",
        split="test",
        question=f"Is there {HOSTILE}?",
        answer_type="open",
        gold_answer=HOSTILE,
        final_answer=HOSTILE,
        image_size=(64, 64),
        producer=Producer(kind="other", name="[bold]me[/]"),
        steps=[
            StepRecord(index=0, text="t", action=None, well_formed=False, error=HOSTILE, error_kind="[x]"),
            StepRecord(index=1, text="t", action=Action.final_answer(HOSTILE), reasoning=HOSTILE, well_formed=True),
        ],
    )
    values.update(fields)
    return TrajectoryRecord(**values)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_inspect_prints_markup_in_data_literally(tmp_path):
    store = TrajectoryStore(tmp_path / "run[bold]", producer=Producer(kind="other", name="[bold]me[/]"))
    store.append(_record("[/]"))
    result = runner.invoke(app, ["inspect", str(tmp_path / "run[bold]"), "--steps"])
    assert result.exit_code == 0, result.output  # before: MarkupError, exit 1
    output = _flat(result.output)
    assert "[link=http://evil.example]click[/link]" in output and "[red]red[/red] :warning:" in output
    assert "the [/] lesion [/bold]" in output and "[bold]me[/]" in output
    assert "\x1b]8;" not in result.output  # no hyperlink escape sequence was emitted


def test_cases_prints_a_question_with_markup_literally(tmp_path):
    Image.new("L", (32, 32), 100).save(tmp_path / "a.png")
    row = {"id": "[/bold]", "image": "a.png", "question": f"Q {HOSTILE}", "answer": "yes", "answer_type": "closed"}
    (tmp_path / "cases.jsonl").write_text(json.dumps(row) + "\n")
    result = runner.invoke(app, ["cases", "--data", f"jsonl:{tmp_path / 'cases.jsonl'}", "--n", "1"])
    assert result.exit_code == 0, result.output  # before: MarkupError on [/bold]
    assert "[link=http://evil.example]click[/link]" in _flat(result.output)


def test_error_messages_holding_markup_are_printed_literally(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path), "--id", "[/]"])
    assert result.exit_code == 2
    assert "holds no trajectories.jsonl" in _flat(result.output)
    (tmp_path / "[red]x.jsonl").write_text("{not json\n")
    result = runner.invoke(app, ["inspect", str(tmp_path / "[red]x.jsonl")])
    assert result.exit_code == 2 and "[red]x.jsonl" in _flat(result.output)


def test_huge_boxes_are_clamped_to_the_canvas_before_drawing():
    canvas = draw_boxes(Image.new("RGB", (16, 16)), [(2, 3, 1e308, 1e308)], [(255, 0, 0)], width=1)
    red = np.asarray(canvas)[..., 0] > 0
    assert red[3, 2:].all() and red[3:, 2].all()  # the top and left edges, to the canvas border
    assert red.sum() == 14 + 13 - 1  # nothing else: the right and bottom edges lie off the canvas
    skipped = draw_boxes(Image.new("RGB", (8, 8)), [(float("nan"), 0, 4, 4), (0, 0, float("inf"), 4)])
    assert not np.asarray(skipped).any()


def test_report_with_absurd_boxes_draws_them_at_the_border(tmp_path):
    original = Image.new("RGB", (64, 64), (40, 40, 40))
    step = StepRecord(index=0, text="t", action=Action.drill((0, 0, 1e300, 1e300)), well_formed=True)
    picture = np.asarray(annotated_original(original, [(8.0, 8.0, 1e308, 1e308)], step, side=128))
    assert tuple(picture[16, 100]) == (60, 255, 90)  # the gold top edge (y = 8 * 2), clamped at the border
    assert tuple(picture[0, 100]) == (255, 60, 60)  # the drill's top edge
    store = TrajectoryStore(tmp_path / "run")
    digest = store.put_image(original)
    steps = [StepRecord(index=0, text="t", action=Action.scan(*[(1, 1, 1e308, 1e308)] * 3), well_formed=True), step]
    records = [
        _record(f"r{i}", original_image=digest, gold_boxes=[(1.0, 1.0, 1e308, 1e308)], steps=steps) for i in range(20)
    ]
    html = render_report(records, store, title="huge")  # before: ~14 s per rectangle, ~23 min for this report
    assert html.count('<section class="traj') == 20 and html.count('<img alt="step ') == 40
