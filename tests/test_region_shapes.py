"""Regions as shapes: the Shape model, Region and Case validation, serialisation, phantom outlines, scoring."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from medeyes.cli.app import app
from medeyes.evaluation.scores import score_records
from medeyes.report.html import annotated_original
from medeyes.trajectories import Producer, TrajectoryRecord
from medeyes_env import views
from medeyes_env.cases import Case, Region
from medeyes_env.errors import SourceError
from medeyes_env.gallery import case_tile
from medeyes_env.protocol import Action
from medeyes_env.rewards import box_iou, grounding_reward, region_iou, score_episode
from medeyes_env.shapes import Shape, box_shape_iou, disc_shape
from medeyes_env.sources import open_source

SQUARE = [[[(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0), (0.0, 0.0)]]]


def _case(*regions: Region, size: tuple[int, int] | None = (100, 100), case_id: str = "t/1") -> Case:
    return Case(
        id=case_id, question="Abnormal?", answer="yes", answer_type="closed", source="t", regions=regions,
        image_size=size,
    )  # fmt: skip


def test_shape_builds_a_prepared_geometry_with_area_and_bounds() -> None:
    shape = Shape(polygons=SQUARE)
    assert shape.area == 100.0 and shape.bounds == (0.0, 0.0, 10.0, 10.0)
    assert shape.geometry.geom_type == "Polygon" and shapely.is_prepared(shape.geometry)
    unclosed = Shape(polygons=[[[(0, 0), (10, 0), (10, 10), (0, 10)]]])
    assert unclosed == shape  # a ring is closed when it is not already


@pytest.mark.parametrize(
    ("polygons", "message"),
    [
        ([[[(0, 0), (10, 10), (10, 0), (0, 10)]]], "shape is not a valid polygon (Self-intersection[5 5])"),
        ([[[(0, 0), (1, 1), (2, 2)]]], "shape is not a valid polygon (Self-intersection[1 1])"),  # no area
        ([[[(0, 0), (1, 0)]]], "shape has a ring of 2 points; a polygon ring needs 3 or more"),
        ([[[(0, 0), (math.nan, 0), (1, 1)]]], "shape has a coordinate that is not a finite number"),
        ([], "at least 1 item"),
    ],
)
def test_shape_refuses_invalid_empty_and_non_finite_polygons(polygons: list, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Shape(polygons=polygons)


def test_from_geometry_repairs_a_bow_tie_and_keeps_both_parts() -> None:
    bow_tie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    shape = Shape.from_geometry(bow_tie)
    assert shape.geometry.geom_type == "MultiPolygon" and shape.area == pytest.approx(50.0)
    with pytest.raises(ValueError, match="has no polygon with area"):
        Shape.from_geometry(shapely.LineString([(0, 0), (1, 1)]))


def test_region_takes_its_box_from_the_shape_and_refuses_a_shape_outside_its_box() -> None:
    region = Region(shape=Shape(polygons=SQUARE), label="nodule")
    assert region.box == (0.0, 0.0, 10.0, 10.0)
    assert Region.model_validate({"shape": {"polygons": SQUARE}}).box == region.box  # from JSON, too
    with pytest.raises(ValidationError, match=r"region 'nodule': its shape spans \[0.0, 0.0, 10.0, 10.0\], outside"):
        Region(box=(0, 0, 5, 5), shape=Shape(polygons=SQUARE), label="nodule")


def test_case_refuses_a_shape_outside_the_image_naming_the_case() -> None:
    big = Region(shape=disc_shape(95.0, 50.0, 10.0), label="mass")
    with pytest.raises(ValidationError, match=r"case 't/9': region \[85.0, 40.0, 105.0, 60.0\] lies outside"):
        _case(big, case_id="t/9")
    lookalike = Region(shape=disc_shape(95.0, 50.0, 10.0), label="mimic")
    with pytest.raises(ValidationError, match=r"case 't/9': the shape of region 'mimic' spans .* outside the 100x100"):
        Case(
            id="t/9", question="q", answer="no", answer_type="closed", source="t", lookalikes=(lookalike,),
            image_size=(100, 100),
        )  # fmt: skip


def test_case_with_shapes_round_trips_through_json_and_box_only_json_still_loads() -> None:
    case = _case(Region(shape=disc_shape(50.0, 50.0, 10.0), label="nodule"), Region(box=(1, 1, 5, 5)))
    again = Case.model_validate_json(case.model_dump_json())
    assert again == case
    assert again.regions[0].shape is not None and again.regions[0].shape.area == case.regions[0].shape.area
    written_before = {"id": "t/2", "question": "q", "answer": "no", "answer_type": "closed", "source": "t",
                      "regions": [{"box": [1, 1, 5, 5], "label": "abnormality"}]}  # fmt: skip
    assert Case.model_validate(written_before).regions[0].shape is None
    geojson = json.loads(case.model_dump_json())["regions"][0]["shape"]["polygons"]
    assert len(geojson) == 1 and len(geojson[0][0]) == 65  # one polygon, 64 segments, closed


def _record(**fields: object) -> TrajectoryRecord:
    base = {
        "trajectory_id": "t/1#0", "case_id": "t/1", "source": "t", "split": "test", "question": "q",
        "answer_type": "closed", "gold_answer": "yes", "image_size": (100, 100),
        "producer": Producer(kind="expert", name="expert"),
    }  # fmt: skip
    return TrajectoryRecord.model_validate(base | fields)


def test_trajectory_records_carry_shapes_and_old_records_still_load() -> None:
    disc = disc_shape(50.0, 50.0, 10.0)
    record = _record(gold_boxes=[disc.bounds, (0, 0, 5, 5)], gold_shapes=[disc, None])
    again = TrajectoryRecord.model_validate_json(record.model_dump_json())
    assert again.gold_shapes == [disc, None]
    assert [r.shape for r in again.gold_regions] == [disc, None]
    old = _record(gold_boxes=[(0, 0, 5, 5)])  # a record written before shapes has no gold_shapes
    assert old.gold_shapes == [] and old.gold_regions[0].shape is None
    with pytest.raises(ValidationError, match="gold_shapes has 1 entries for 2 gold_boxes"):
        _record(gold_boxes=[(0, 0, 5, 5), (1, 1, 6, 6)], gold_shapes=[None])


def _pixel_iou(box: tuple[float, float, float, float], cx: float, cy: float, radius: float) -> float:
    """IoU on a fine grid: the plain reference for the shapely path."""
    step = 0.05
    ys, xs = np.mgrid[0:100:step, 0:100:step] + step / 2
    disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    return float((disc & inside).sum() / (disc | inside).sum())


@pytest.mark.parametrize(
    "box",
    [(40, 40, 60, 60), (45, 45, 55, 55), (30, 30, 70, 70), (50, 50, 70, 70), (58, 40, 80, 60), (0, 0, 10, 10),
     (20, 45, 80, 55)],
)  # fmt: skip
def test_box_shape_iou_matches_a_pixel_reference(box: tuple[float, float, float, float]) -> None:
    disc = disc_shape(50.0, 50.0, 10.0, segments=256)
    assert box_shape_iou(box, disc) == pytest.approx(_pixel_iou(box, 50.0, 50.0, 10.0), abs=0.01)


def test_box_shape_iou_refuses_degenerate_and_non_finite_boxes() -> None:
    disc = disc_shape(50.0, 50.0, 10.0)
    assert box_shape_iou((50, 50, 50, 60), disc) == 0.0
    assert box_shape_iou((0, 0, 1e308, 1e308), disc) == 0.0
    assert box_shape_iou((-math.inf, 0, 60, 60), disc) == 0.0


def test_score_episode_uses_the_shape_and_leaves_box_only_cases_as_they_were() -> None:
    disc = disc_shape(50.0, 50.0, 10.0)
    shaped = _case(Region(box=disc.bounds, shape=disc))
    boxed = _case(Region(box=disc.bounds))
    drilled = [(40.0, 40.0, 60.0, 60.0)]
    with_shape = score_episode(shaped, "yes", [True, True], drilled)
    box_only = score_episode(boxed, "yes", [True, True], drilled)
    assert with_shape.components["best_iou"] == pytest.approx(math.pi / 4, abs=0.005)
    assert box_only.components["best_iou"] == 1.0 == box_iou(drilled[0], disc.bounds)
    assert grounding_reward(drilled, list(shaped.regions)) == region_iou(drilled[0], shaped.regions[0])


def test_phantom_lesions_and_mimics_carry_their_discs() -> None:
    source = open_source("phantom:look")
    seen = 0
    for index in range(12):
        case = source.case("test", index)
        for region in (*case.regions, *case.lookalikes):
            if region.label in ("effusion", "pneumothorax"):
                assert region.shape is None  # traced from a mask grid: left a box
                continue
            assert region.shape is not None
            x1, y1, x2, y2 = region.box
            sx1, sy1, sx2, sy2 = region.shape.bounds
            assert x1 <= sx1 and y1 <= sy1 and sx2 <= x2 and sy2 <= y2
            radius = (sx2 - sx1) / 2
            if sx1 > 0 and sx2 < case.image_size[0] and sy1 > 0 and sy2 < case.image_size[1]:  # not clipped
                assert abs(region.shape.area / (math.pi * radius**2) - 1) < 0.005
            seen += 1
    assert seen >= 10


def test_eval_scores_count_shapes_and_boxes_and_give_the_box_only_figures() -> None:
    disc = disc_shape(50.0, 50.0, 10.0)
    drill = Action(name="drill", boxes=[(40.0, 40.0, 60.0, 60.0)])
    step = {"index": 0, "text": "", "action": drill, "well_formed": True, "shown_boxes": [(40.0, 40.0, 60.0, 60.0)]}
    shaped = _record(
        gold_boxes=[disc.bounds, (0, 0, 5, 5)], gold_shapes=[disc, None], steps=[step],
        reward_components={"accuracy": 1.0, "best_iou": box_shape_iou((40, 40, 60, 60), disc)},
    )  # fmt: skip
    scores = score_records([shaped], "t")
    assert (scores.shape_regions, scores.box_regions) == (1, 1)
    assert scores.hit_rate == 1.0 and scores.box_hit_rate == 1.0 and scores.mean_best_box_iou == 1.0
    assert scores.mean_best_iou == pytest.approx(math.pi / 4, abs=0.005)
    boxed = _record(gold_boxes=[(40, 40, 60, 60)], steps=[step], reward_components={"best_iou": 1.0})
    plain = score_records([boxed], "t")
    assert (plain.shape_regions, plain.box_regions, plain.mean_best_box_iou) == (0, 1, None)


# ------------------------------------------------------------------------------------- SLAKE masks


def make_slake_with_masks(root: Path) -> Path:
    """A SLAKE-layout dataset of two images, each with a mask.png label map and a detection.json."""
    ys, xs = np.mgrid[0:80, 0:100]
    for name, (cx, cy) in {"xmlab1": (30, 40), "xmlab2": (60, 30)}.items():
        folder = root / "imgs" / name
        folder.mkdir(parents=True)
        Image.fromarray(np.full((80, 100, 3), 90, np.uint8)).save(folder / "source.jpg", format="PNG")
        labels = np.zeros((80, 100), np.uint8)
        labels[(xs - cx) ** 2 + (ys - cy) ** 2 <= 12**2] = 3  # the liver: a disc of radius 12
        labels[60:70, 70:95] = 7  # the lung: a rectangle
        Image.fromarray(labels).save(folder / "mask.png")
        # xywh on disk; each box a little larger than its structure, as annotators draw them.
        detections = [{"Liver": [cx - 14, cy - 14, 28, 28]}, {"Lung": [68, 58, 29, 14]}, {"Spleen": [2, 2, 10, 10]}]
        (folder / "detection.json").write_text(json.dumps(detections))
    rows = [
        {"img_name": f"{img}/source.jpg", "question": question, "answer": answer, "answer_type": kind, "q_lang": "en",
         "modality": "CT", "location": "Abdomen", "qid": i}
        for i, (img, question, answer, kind) in enumerate(
            [("xmlab1", "Does the picture contain a liver?", "Yes", "CLOSED"),
             ("xmlab2", "Does the picture contain a lung?", "Yes", "CLOSED"),
             ("xmlab1", "Where is the liver?", "Left", "OPEN"),
             ("xmlab2", "Is the liver healthy?", "Yes", "CLOSED")]
        )
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(rows[:2]))
    (root / "validate.json").write_text("[]")
    (root / "test.json").write_text(json.dumps(rows))
    return root


def test_slake_masks_become_polygons_and_box_only_labels_stay_boxes(tmp_path: Path) -> None:
    root = make_slake_with_masks(tmp_path / "Slake1.0")
    case = open_source(f"slake:{root}?regions=all").case("test", 0)
    liver, lung, spleen = case.regions
    assert liver.box == (16.0, 26.0, 44.0, 54.0) and liver.shape is not None
    assert liver.shape.area == pytest.approx(math.pi * 12**2, rel=0.05)  # traced disc, corners cut
    assert lung.shape is not None and lung.shape.bounds == (70.0, 60.0, 95.0, 70.0)
    assert spleen.shape is None  # the mask is empty inside its box: it stays a box
    boxes_only = open_source(f"slake:{root}?regions=all&shapes=0").case("test", 0)
    assert [r.shape for r in boxes_only.regions] == [None, None, None]


def test_slake_without_scikit_image_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_slake_with_masks(tmp_path / "Slake1.0")
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(SourceError, match=r"mask\.png: tracing mask outlines needs scikit-image: pip install"):
        open_source(f"slake:{root}")
    assert open_source(f"slake:{root}?shapes=0").case("test", 0).regions[0].shape is None


def test_slake_masks_through_cases_check_and_eval(tmp_path: Path) -> None:
    root = make_slake_with_masks(tmp_path / "Slake1.0")
    result = CliRunner().invoke(app, ["cases", "--data", f"slake:{root}", "--check"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "shapes/boxes" in result.output and "4/0" in result.output  # test split: 4 regions, every one a shape
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app, ["eval", "--data", f"slake:{root}", "--quiet", "--json", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "slake: gold regions scored as 4 shapes, 0 boxes; against their boxes alone" in result.output
    figures = json.loads(out.read_text())["datasets"][0]
    assert (figures["shape_regions"], figures["box_regions"], figures["grounded"]) == (4, 0, 4)
    assert figures["mean_best_iou"] is not None and figures["mean_best_box_iou"] is not None


# ------------------------------------------------------------------------------------- pictures


def _amber_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("RGB")) == views.SHAPE_COLOUR).all(axis=-1).sum())


def test_gallery_outlines_shapes_and_leaves_box_only_cases_as_boxes() -> None:
    source = open_source("phantom")
    case = next(c for c in (source.case("test", i) for i in range(20)) if c.regions and c.regions[0].shape)
    assert _amber_pixels(case_tile(case, size=256)) > 20
    boxed = case.model_copy(update={"regions": tuple(Region(box=r.box, label=r.label) for r in case.regions)})
    boxed = boxed.with_image_factory(case.load_image)
    assert _amber_pixels(case_tile(boxed, size=256)) == 0


def test_report_draws_the_gold_shape_beside_the_gold_box() -> None:
    disc = disc_shape(50.0, 50.0, 20.0)
    original = Image.new("RGB", (100, 100))
    with_shape = annotated_original(original, [disc.bounds], None, side=100, shapes=[disc])
    assert _amber_pixels(with_shape) > 50
    assert _amber_pixels(annotated_original(original, [disc.bounds], None, side=100)) == 0


# ------------------------------------------------------------------------------------- the measurement


def test_shape_iou_experiment_counts_the_drills_the_box_metric_flatters(tmp_path: Path) -> None:
    """experiments/shape_iou.py on expert drills on the phantom (seeded): the box metric flatters the drills."""
    store = tmp_path / "expert"
    result = CliRunner().invoke(
        app, ["rollout", "--n", "12", "--samples", "1", "--keep-all", "--out", str(store), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    script = Path(__file__).resolve().parents[1] / "experiments" / "shape_iou.py"
    ran = subprocess.run([sys.executable, str(script), f"expert={store}"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    (row,) = json.loads(ran.stdout)
    assert row["agent"] == "expert" and row["drills"] > 0 and row["with_shapes"] > 0
    assert row["mean_box_iou"] >= row["mean_shape_iou"] > 0.0
    assert row["box_hits"] - row["box_only_hits"] <= row["shape_hits"]


def test_jsonl_regions_may_carry_a_shape_and_a_bad_one_is_named(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    square = {"polygons": [[[[10, 10], [40, 10], [40, 30], [10, 30]]]]}
    rows = [
        {"id": "a", "image": "a.png", "question": "Nodule?", "answer": "yes", "answer_type": "closed",
         "regions": [{"shape": square, "label": "nodule"}, {"box": [50, 50, 60, 60]}]},
    ]  # fmt: skip
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    case = open_source(f"jsonl:{tmp_path / 'cases.jsonl'}").case("test", 0)
    assert case.regions[0].box == (10.0, 10.0, 40.0, 30.0) and case.regions[0].shape.area == 600.0
    assert case.regions[1].shape is None
    rows[0]["regions"] = [{"shape": {"polygons": [[[[10, 10], [40, 40], [40, 10], [10, 40]]]]}}]
    (tmp_path / "cases.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SourceError, match=r"cases\.jsonl:1: .*shape is not a valid polygon \(Self-intersection"):
        open_source(f"jsonl:{tmp_path / 'cases.jsonl'}")
