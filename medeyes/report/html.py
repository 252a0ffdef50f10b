"""One HTML file that shows trajectories step by step.

For every trajectory: the question, gold and given answers, the reward breakdown, and for every step the
original image with the step's boxes (scan boxes in their montage colours, a drill in red), the gold
boxes in green and the gold regions' exact shapes (when the source has them) in amber, the view the
environment returned, the reasoning, the action and the feedback. Buttons filter correct and incorrect
trajectories and a selector filters by question family. Images are JPEG data URLs, so the file opens
anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from medeyes.trajectories import StepRecord, TrajectoryRecord, TrajectoryStore
from medeyes_env import views
from medeyes_env.cases import Box
from medeyes_env.errors import RecordError
from medeyes_env.shapes import Shape

PANEL = 320
"""Side in pixels of every image panel in the report."""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #15171a; color: #e6e6e6; }
header { position: sticky; top: 0; background: #1f2226; padding: 10px 18px; border-bottom: 1px solid #333; z-index: 2; }
h1 { font-size: 18px; margin: 0 0 6px 0; }
.controls button, .controls select { background: #2b2f35; color: #e6e6e6; border: 1px solid #444; border-radius: 4px;
  padding: 4px 10px; margin-right: 6px; cursor: pointer; }
.controls button.active { background: #3d6fb6; border-color: #5a8ad0; }
.summary { font-size: 13px; color: #aaa; margin-top: 6px; }
main { padding: 12px 18px; }
section.traj { border: 1px solid #333; border-radius: 6px; margin-bottom: 18px; padding: 10px 14px;
  background: #1b1d21; }
section.traj.correct { border-left: 5px solid #3fbf5f; }
section.traj.incorrect { border-left: 5px solid #d9534f; }
.traj h2 { font-size: 15px; margin: 0 0 4px 0; }
.meta { font-size: 13px; color: #bbb; margin-bottom: 8px; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px; margin-left: 6px; }
.badge.ok { background: #245c33; } .badge.bad { background: #6b2725; }
.steps { display: flex; flex-direction: column; gap: 10px; }
.step { display: grid; grid-template-columns: 330px 330px 1fr; gap: 10px; align-items: start;
  border-top: 1px dashed #333; padding-top: 8px; }
.step img { width: 320px; height: 320px; image-rendering: auto; border: 1px solid #333; background: #000; }
.caption { font-size: 11px; color: #999; }
.text { font-size: 13px; white-space: pre-wrap; word-break: break-word; }
.text .label { color: #8ab4f8; font-weight: 600; }
table.rewards { border-collapse: collapse; font-size: 12px; margin-top: 6px; }
table.rewards td { border: 1px solid #333; padding: 2px 6px; }
.legend span { margin-right: 12px; font-size: 12px; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: middle; }
"""

_JS = """
(function () {
  let outcome = 'all', family = 'all';
  function apply() {
    let shown = 0;
    document.querySelectorAll('section.traj').forEach(function (s) {
      const okOutcome = outcome === 'all' || s.dataset.outcome === outcome;
      const okFamily = family === 'all' || s.dataset.family === family;
      const visible = okOutcome && okFamily;
      s.style.display = visible ? '' : 'none';
      if (visible) shown += 1;
    });
    document.getElementById('shown').textContent = shown;
  }
  document.querySelectorAll('button[data-outcome]').forEach(function (b) {
    b.addEventListener('click', function () {
      outcome = b.dataset.outcome;
      document.querySelectorAll('button[data-outcome]').forEach(function (o) {
        o.classList.toggle('active', o === b);
      });
      apply();
    });
  });
  document.getElementById('family').addEventListener('change', function (e) { family = e.target.value; apply(); });
  apply();
  window.addEventListener('load', function () {
    const images = Array.from(document.images);
    document.body.dataset.imagesTotal = images.length;
    const loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
    document.body.dataset.imagesLoaded = loaded.length;
  });
})();
"""


def _data_url(image: Image.Image, quality: int = 82) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _placed(boxes: Sequence[Box], size: tuple[int, int], side: int) -> list[Box]:
    """Boxes in pixels of the letterboxed panel; coordinates clamped to one image extent around the image first.

    A recorded box may hold 1e308: scaled, that overflows to inf, and near 2e9 PIL takes ~14 s per rectangle
    (``views.draw_boxes`` clamps again at the canvas).
    """
    extent = float(max(size))
    scale = side / extent
    dx, dy = (side - size[0] * scale) / 2, (side - size[1] * scale) / 2

    def clamp(value: float) -> float:
        return min(max(value, -extent), 2 * extent)

    return [
        (clamp(x1) * scale + dx, clamp(y1) * scale + dy, clamp(x2) * scale + dx, clamp(y2) * scale + dy)
        for x1, y1, x2, y2 in boxes
    ]


def annotated_original(
    original: Image.Image,
    gold: Sequence[Box],
    step: StepRecord | None,
    side: int = PANEL,
    shapes: Sequence[Shape | None] = (),
) -> Image.Image:
    """The original image letterboxed to ``side`` with gold boxes (green), their shapes (amber) and the step's boxes."""
    canvas = views.letterbox(original, side)
    if gold:
        canvas = views.draw_boxes(canvas, _placed(gold, original.size, side), [views.GOLD_COLOUR], width=2)
    outlines = [shape for shape in shapes if shape is not None]
    if outlines:
        scale, offset = views.letterbox_transform(original.size, side)
        canvas = views.draw_shapes(canvas, outlines, scale, offset, width=2)
    if step is not None and step.action is not None and step.action.boxes:
        placed = _placed(step.action.boxes, original.size, side)
        if step.action.name == "drill":
            canvas = views.draw_boxes(canvas, placed, [views.DRILL_COLOUR], width=2)
        else:
            canvas = views.draw_boxes(canvas, placed, views.SCAN_COLOURS, width=2, numbered=True)
    return canvas


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _rewards_table(components: dict[str, float]) -> str:
    if not components:
        return ""
    cells = "".join(f"<tr><td>{_esc(k)}</td><td>{v:.3f}</td></tr>" for k, v in components.items())
    return f'<table class="rewards">{cells}</table>'


def _step_html(
    record: TrajectoryRecord, step: StepRecord, original: Image.Image | None, store: TrajectoryStore | None
) -> str:
    left = right = '<div class="caption">(image not stored)</div>'
    if original is not None:
        picture = _data_url(annotated_original(original, record.gold_boxes, step, shapes=record.gold_shapes))
        left = (
            f'<img alt="step {step.index + 1} on the original" src="{picture}">'
            f'<div class="caption">original, step {step.index + 1} boxes; gold in green, its shapes in amber</div>'
        )
    if step.observation_image is not None and store is not None:
        try:
            view = store.load_image(step.observation_image).resize((PANEL, PANEL))
            right = (
                f'<img alt="view after step {step.index + 1}" src="{_data_url(view)}">'
                '<div class="caption">view returned</div>'
            )
        except RecordError:
            pass
    elif step.action is not None and step.action.name == "answer":
        right = '<div class="caption">(final answer: no view)</div>'
    action = step.action.model_dump(exclude_defaults=True) if step.action is not None else None
    body = [
        f'<div><span class="label">reasoning</span> {_esc(step.reasoning or "")}</div>',
        f'<div><span class="label">action</span> {_esc(json.dumps(action) if action else "(did not parse)")}</div>',
    ]
    if step.error:
        body.append(f'<div><span class="label">parse error</span> {_esc(step.error)}</div>')
    if step.feedback:
        body.append(f'<div><span class="label">feedback</span> {_esc(step.feedback)}</div>')
    body.append(_rewards_table(step.reward_components))
    return f'<div class="step"><div>{left}</div><div>{right}</div><div class="text">{"".join(body)}</div></div>'


def _trajectory_html(record: TrajectoryRecord, store: TrajectoryStore | None) -> str:
    original = None
    if store is not None and record.original_image is not None:
        try:
            original = store.load_image(record.original_image)
        except RecordError:
            original = None
    outcome = "correct" if record.correct else "incorrect"
    badge = '<span class="badge ok">correct</span>' if record.correct else '<span class="badge bad">incorrect</span>'
    options = f" Options: {_esc(' / '.join(record.options))}." if record.options else ""
    producer = record.producer.name + (f" ({record.producer.oracle})" if record.producer.oracle else "")
    error = f'<div class="meta">error: {_esc(record.error_type)}: {_esc(record.error)}</div>' if record.error else ""
    steps = "".join(_step_html(record, step, original, store) for step in record.steps)
    family = record.family or "-"
    return (
        f'<section class="traj {outcome}" data-outcome="{outcome}" data-family="{_esc(family)}">'
        f"<h2>{_esc(record.case_id)} #{record.sample_index}{badge}</h2>"
        f'<div class="meta">{_esc(record.question)}{options}<br>'
        f"gold: <b>{_esc(record.gold_answer)}</b> &middot; answer: <b>{_esc(record.final_answer)}</b> &middot; "
        f"family: {_esc(family)} &middot; reward {record.reward:.3f} &middot; {record.tool_steps} tool step(s) "
        f"&middot; producer: {_esc(producer)}</div>{error}"
        f"{_rewards_table(record.reward_components)}"
        f'<div class="steps">{steps}</div></section>'
    )


def render_report(
    records: Sequence[TrajectoryRecord], store: TrajectoryStore | None = None, title: str = "MedEyes trajectories"
) -> str:
    """The whole report as one HTML string."""
    families = sorted({r.family or "-" for r in records})
    correct = sum(1 for r in records if r.correct)
    family_options = "".join(f'<option value="{_esc(f)}">{_esc(f)}</option>' for f in families)
    legend = (
        '<div class="legend">'
        f'<span><i class="swatch" style="background: rgb{views.GOLD_COLOUR}"></i>gold</span>'
        f'<span><i class="swatch" style="background: rgb{views.SHAPE_COLOUR}"></i>gold shape</span>'
        f'<span><i class="swatch" style="background: rgb{views.DRILL_COLOUR}"></i>drill</span>'
        f'<span><i class="swatch" style="background: rgb{views.SCAN_COLOURS[0]}"></i>scan (numbered)</span></div>'
    )
    body = "".join(_trajectory_html(record, store) for record in records)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{_esc(title)}</h1><div class="controls">'
        '<button data-outcome="all" class="active">all</button>'
        '<button data-outcome="correct">correct</button>'
        '<button data-outcome="incorrect">incorrect</button>'
        f'<select id="family"><option value="all">every family</option>{family_options}</select></div>'
        f'<div class="summary">{len(records)} trajectories, {correct} correct; showing <span id="shown">'
        f"{len(records)}</span></div>{legend}</header>"
        f"<main>{body}</main><script>{_JS}</script></body></html>\n"
    )


def write_report(
    records: Sequence[TrajectoryRecord],
    path: str | Path,
    store: TrajectoryStore | None = None,
    title: str = "MedEyes trajectories",
) -> Path:
    """Write :func:`render_report` to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(records, store, title), encoding="utf-8")
    return path
